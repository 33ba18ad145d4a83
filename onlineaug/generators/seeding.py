"""Seeded construction of random-weight models.

``nn.Module`` constructors initialise their weights from the global torch RNG. To make random-weight
generators reproducible without touching the caller's RNG, each component is built inside
:func:`seeded` which forks the RNG state, seeds it from ``(seed, component name)`` and restores it on
exit. The same seed, component name, device and torch version give the same weights in any process.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from onlineaug.seeding import derive_seed


@contextlib.contextmanager
def seeded(seed: int, name: str, device: torch.device | str = "cpu") -> Iterator[None]:
    """Seed the RNG that initialises weights on ``device``; restore the previous RNG state on exit."""
    device = torch.device(device)
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        value = derive_seed(seed, f"generators/{name}")  # components do not share a random stream
        torch.random.default_generator.manual_seed(value)
        if cuda_devices:
            with torch.cuda.device(cuda_devices[0]):
                torch.cuda.manual_seed(value)
        yield


def check_seed(seed: int) -> int:
    """Return ``seed`` if it is a non-negative ``int``; raise ``TypeError``/``ValueError`` otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return seed
