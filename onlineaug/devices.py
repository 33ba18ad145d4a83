"""Parsing the devices users name (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``), with clear errors."""

from __future__ import annotations

import torch


def parse_device(value, what: str = "device") -> torch.device:
    """``value`` as a CPU or CUDA ``torch.device`` that exists here; ``"cuda"`` becomes ``cuda:<current>``.

    ``what`` names the argument in error messages (e.g. ``"generator_devices"``).
    """
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{what}={value!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}={value!r} asks for CUDA but torch.cuda.is_available() is False on this "
                             f"machine; use 'cpu'")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"{what}={value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"{what}={value!r}: only 'cpu' and CUDA devices are supported")
    return device
