"""Helpers the generating recipes share on the producer side: decoding pipeline outputs safely."""

from __future__ import annotations

import torch

from onlineaug.images import resize_uint8
from onlineaug.recipes.base import Produced


def to_uint8(pixels: torch.Tensor, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images in [0, 1] (n, 3, H, W) -> ``(uint8 images, finite)``, resized to ``size`` if given.

    ``finite`` (bool (n,)) is False for an image holding NaN or inf (an fp16 overflow in a VAE, a diverged
    sampler): such an image would otherwise become black after the uint8 cast; the caller rejects those rows.
    """
    pixels = pixels.float()
    finite = torch.isfinite(pixels).flatten(1).all(1)
    images = torch.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=0.0).clamp_(0, 1).mul_(255).round_()
    images = images.to(torch.uint8)
    if size is not None:
        images = resize_uint8(images, size)
    return images, finite.cpu()


def keep_rows(payload: dict[str, torch.Tensor], keep: torch.Tensor, reason: str) -> Produced:
    """The rows of ``payload`` where ``keep`` is True; the others rejected for ``reason``."""
    keep = keep.cpu().bool()
    rows = keep.nonzero().flatten()
    return Produced(payload={name: value[keep.to(value.device)] for name, value in payload.items()},
                    rows=rows, rejected={reason: (~keep).nonzero().flatten()} if not keep.all() else {})
