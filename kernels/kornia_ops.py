"""Kornia for the geometric preparation of a foreground bank (no custom kernel would beat it).

:func:`kernels.composite.composite` pastes RGBA foregrounds from a bank of one size ``(Hf, Wf)``.
Preparing that bank (fitting cut-outs of any size into it, optional rotation) happens once per
foreground, not per batch, so kornia's resize / rotate are the right tools (Riba et al., "Kornia:
an Open Source Differentiable Computer Vision Library for PyTorch", WACV 2020). Kornia's mix ops
(``RandomCutMixV2``, ``RandomMixUpV2``) serve as baselines in ``benchmarks/kernels.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["prepare_foregrounds"]

_OP = "prepare_foregrounds"


def prepare_foregrounds(
    foregrounds: torch.Tensor,
    size: Tuple[int, int],
    *,
    angle: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fit RGBA uint8 foregrounds (N, 4, h, w) into a (N, 4, Hf, Wf) bank for ``composite``.

    The cut-outs are resized with kornia (antialiased bilinear) to the largest size that fits
    ``size = (Hf, Wf)`` while keeping their aspect ratio, centred, and padded with fully transparent
    texels; ``angle`` (float (N,), degrees, counter-clockwise) optionally rotates them about their
    centre first (kornia ``rotate``; corners that leave the frame are cut). Resampling is done on
    premultiplied colour so transparent texels do not bleed into the edges; the result is straight
    alpha again, rounded to uint8.
    """
    from kornia.geometry.transform import resize, rotate  # lazy: kornia is only needed here

    if not isinstance(foregrounds, torch.Tensor):
        raise TypeError(f"{_OP}: foregrounds must be a torch.Tensor, got {type(foregrounds).__name__}.")
    if foregrounds.dtype != torch.uint8 or foregrounds.dim() != 4 or foregrounds.shape[1] != 4:
        raise ValueError(f"{_OP}: foregrounds must be uint8 (N, 4, h, w) RGBA, got {foregrounds.dtype} "
                         f"{tuple(foregrounds.shape)}.")
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and s > 0 for s in size)):
        raise ValueError(f"{_OP}: size must be (Hf, Wf) with positive ints, got {size!r}.")
    n, _, h, w = foregrounds.shape
    hf, wf = size
    x = foregrounds.to(torch.float32) / 255
    x = torch.cat([x[:, :3] * x[:, 3:], x[:, 3:]], dim=1)  # premultiply
    if angle is not None:
        if not isinstance(angle, torch.Tensor) or angle.shape != (n,):
            raise ValueError(f"{_OP}: angle must be a float tensor of shape ({n},), got "
                             f"{getattr(angle, 'shape', type(angle).__name__)}.")
        x = rotate(x, angle.to(device=x.device, dtype=torch.float32), mode="bilinear", padding_mode="zeros")
    factor = min(hf / h, wf / w)
    new_h, new_w = max(1, min(hf, round(h * factor))), max(1, min(wf, round(w * factor)))
    x = resize(x, (new_h, new_w), interpolation="bilinear", antialias=factor < 1)
    top, left = (hf - new_h) // 2, (wf - new_w) // 2
    x = torch.nn.functional.pad(x, (left, wf - new_w - left, top, hf - new_h - top))
    alpha = x[:, 3:].clamp(0, 1)
    rgb = torch.where(alpha > 0, x[:, :3] / alpha.clamp(min=1e-6), torch.zeros_like(x[:, :3]))
    out = torch.cat([rgb.clamp(0, 1), alpha], dim=1)
    return torch.floor(out * 255 + 0.5).to(torch.uint8)
