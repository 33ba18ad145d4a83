"""Batch-time ops, on the trainer's device: the one place recipes call to mix pixels and labels.

Each op comes in two steps, as in kornia and torchvision v2: ``sample_*_params`` draws per-sample
parameters with an explicit ``torch.Generator`` (on the generator's device, no host synchronisation), and
the op applies them. The same parameters can then be replayed on the torch reference and the Triton kernel,
logged and tested. The heavy ops dispatch to :mod:`kernels` (one fused Triton launch on CUDA, the plain
torch reference elsewhere; ``backend=`` overrides).

Formulas (DiffuseMix, Islam et al. CVPR 2024, Eq. 3-4; GenMix smooth masks):

* ``smooth_mask``: the weight of the generated image: 0 over the first half, a linear ramp of
  ``blend_width`` pixels centred on the middle, 1 over the second half; ``flip`` swaps the halves.
* ``concat_blend = (1 - lam) * (mask * generated + (1 - mask) * original) + lam * fractal``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from onlineaug import kernels
from onlineaug.kernels.concat_blend import SPLIT_CODES, SPLIT_NONE
from onlineaug.kernels.box_mix import sample_boxes
from onlineaug.seeding import sample_beta

SPLITS = {name: code for name, code in SPLIT_CODES.items() if code != SPLIT_NONE}  # the masks a recipe may draw

__all__ = [
    "SPLITS", "smooth_mask", "concat_blend", "normalize",
    "ConcatBlendParams", "sample_concat_blend_params", "concat_blend_normalize",
    "BoxMixParams", "sample_box_mix_params", "box_mix",
    "PixelMixParams", "sample_pixel_mix_params", "pixel_mix",
    "soft_labels", "one_hot_targets",
]


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return SPLITS[split]


def smooth_mask(height: int, width: int, *, split: str, flip: bool = False, blend_width: float = 0.0,
                device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (H, W) weight of the generated image in a DiffuseMix/GenMix hybrid.

    ``split="top_bottom"``: the top half is the original (0), the bottom half generated (1);
    ``"left_right"``: left original, right generated. ``blend_width`` is the width in pixels of the linear
    ramp centred on the middle (pixel centres at ``i + 0.5``); 0 gives the paper's hard mask. ``flip=True``
    swaps the halves (GenMix Table 12).
    """
    code = _check_split(split)
    if height < 1 or width < 1:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    if blend_width < 0:
        raise ValueError(f"blend_width must be >= 0 pixels, got {blend_width}")
    mask = kernels.smooth_mask_reference(height, width, code, bool(flip), float(blend_width), device=device)
    return mask[0, 0].to(dtype)


def concat_blend(original: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor, fractal: torch.Tensor,
                 lam) -> torch.Tensor:
    """``(1 - lam) * (mask * generated + (1 - mask) * original) + lam * fractal`` on float images.

    ``original``, ``generated``, ``fractal``: (B, C, H, W) (or broadcastable); ``mask``: (H, W) or
    (B, 1, H, W); ``lam``: a float or a (B,) tensor.
    """
    if not (original.is_floating_point() and generated.is_floating_point() and fractal.is_floating_point()):
        raise TypeError("concat_blend works on float images; convert uint8 with .float() / 255 first, or use "
                        "concat_blend_normalize, which takes uint8 directly")
    if original.shape != generated.shape:
        raise ValueError(f"original {tuple(original.shape)} and generated {tuple(generated.shape)} must match")
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
    if isinstance(lam, torch.Tensor) and lam.ndim == 1:
        lam = lam.view(-1, 1, 1, 1)
    hybrid = mask * generated + (1 - mask) * original
    return (1 - lam) * hybrid + lam * fractal


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ``(x / 255 - mean) / std`` in ``out_dtype``."""
    x = images.float().div_(255)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1)).to(out_dtype)


# ------------------------------------------------------------------------------------------ concat blend
@dataclasses.dataclass
class ConcatBlendParams:
    """Per-sample parameters of :func:`concat_blend_normalize` (all (B,) on one device)."""

    split: torch.Tensor  # int64: SPLIT_NONE (real sample: normalise only), SPLIT_TOP_BOTTOM, SPLIT_LEFT_RIGHT
    flip: torch.Tensor  # bool
    blend_width: torch.Tensor  # float32, pixels
    lam: torch.Tensor  # float32, fractal weight
    fractal_index: torch.Tensor  # int64


def _choose(values: Sequence[int], size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` draws, uniform over ``values``, on the generator's device (no host-to-device copy: a copy
    from pageable memory would synchronise the stream)."""
    index = torch.randint(len(values), (size,), generator=generator, device=generator.device)
    out = torch.full((size,), values[0], dtype=torch.int64, device=generator.device)
    for position, value in enumerate(values[1:], start=1):
        out = torch.where(index == position, value, out)
    return out


def sample_concat_blend_params(active: torch.Tensor, *, splits: Sequence[str], flips: Sequence[bool],
                               blend_width: float, lam: float, num_fractals: int,
                               generator: torch.Generator) -> ConcatBlendParams:
    """Draw a mask (split and flip uniformly from the allowed sets) and a fractal for each active sample.

    Inactive samples (real ones) get ``SPLIT_NONE`` and ``lam = 0``: they are only normalised.
    """
    if not splits:
        raise ValueError("splits must name at least one of 'top_bottom', 'left_right'")
    if num_fractals < 1:
        raise ValueError("the fractal bank is empty")
    device, size = active.device, active.shape[0]
    split = _choose([_check_split(s) for s in splits], size, generator)
    flip = _choose([int(bool(f)) for f in flips], size, generator).bool()
    fractal_index = torch.randint(num_fractals, (size,), generator=generator, device=device)
    return ConcatBlendParams(
        split=torch.where(active, split, torch.full_like(split, SPLIT_NONE)),
        flip=flip & active,
        blend_width=torch.full((size,), float(blend_width), device=device),
        lam=torch.where(active, torch.full((size,), float(lam), device=device), torch.zeros(size, device=device)),
        fractal_index=fractal_index,
    )


def concat_blend_normalize(original: torch.Tensor, generated: torch.Tensor, fractals: torch.Tensor,
                           params: ConcatBlendParams, *, mean: torch.Tensor, std: torch.Tensor,
                           out_dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """Hybrid + fractal blend + normalisation of uint8 images in one pass (one launch on CUDA)."""
    return kernels.concat_blend_normalize(
        original, generated, fractals, split=params.split, flip=params.flip, blend_width=params.blend_width,
        lam=params.lam, fractal_index=params.fractal_index, mean=mean, std=std, out_dtype=out_dtype,
        backend=backend)


# --------------------------------------------------------------------------------------------- box mix
@dataclasses.dataclass
class BoxMixParams:
    partner: torch.Tensor  # int64 (B,)
    boxes: torch.Tensor  # int64 (B, 4): y0, x0, y1, x1 (half-open, may cross the border)


def _partners(size: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randperm(size, generator=generator, device=device)


def sample_box_mix_params(active: torch.Tensor, height: int, width: int, *, alpha: float,
                          generator: torch.Generator) -> BoxMixParams:
    """CutMix boxes (Yun et al. ICCV 2019): area ``(1 - lam) H W`` with ``lam ~ Beta(alpha, alpha)`` per
    sample, at a uniform centre; inactive samples get an empty box."""
    device, size = active.device, active.shape[0]
    lam = sample_beta(alpha, alpha, size, generator) if alpha > 0 else torch.ones(size, device=device)
    boxes = sample_boxes(size, height, width, lam, generator=generator)
    boxes = torch.where(active[:, None], boxes, torch.zeros_like(boxes))
    return BoxMixParams(partner=_partners(size, generator, device), boxes=boxes)


def box_mix(images: torch.Tensor, params: BoxMixParams, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Paste each sample's box from its partner; returns ``(mixed, kept_fraction)`` with exact areas."""
    return kernels.box_mix(images, params.partner, params.boxes, backend=backend)


# ------------------------------------------------------------------------------------------- pixel mix
@dataclasses.dataclass
class PixelMixParams:
    partner: torch.Tensor  # int64 (B,)
    lam: torch.Tensor  # float32 (B,): weight of the sample itself


def sample_pixel_mix_params(active: torch.Tensor, *, alpha: float, generator: torch.Generator) -> PixelMixParams:
    """Mixup (Zhang et al. ICLR 2018): ``lam ~ Beta(alpha, alpha)`` per active sample, 1 for the others."""
    device, size = active.device, active.shape[0]
    lam = sample_beta(alpha, alpha, size, generator)
    lam = torch.where(active, lam, torch.ones_like(lam))
    return PixelMixParams(partner=_partners(size, generator, device), lam=lam)


def pixel_mix(images: torch.Tensor, params: PixelMixParams, *, backend: str = "auto",
              inplace: bool = False) -> torch.Tensor:
    """Mix each sample with its partner; ``inplace``: the caller's ``images`` may hold the result (see
    :func:`kernels.pixel_mix`: on the CPU a fresh batch-sized buffer costs more than the mixing)."""
    return kernels.pixel_mix(images, params.partner, params.lam, backend=backend, inplace=inplace)


# ---------------------------------------------------------------------------------------------- labels
def soft_labels(labels: torch.Tensor, weights: torch.Tensor, num_classes: int, *,
                smoothing: float = 0.0) -> torch.Tensor:
    """(B, K) targets ``sum_j weights[:, j] * onehot(labels[:, j])``, then label smoothing."""
    return kernels.soft_labels(labels, weights, num_classes, smoothing=smoothing)


def one_hot_targets(labels: torch.Tensor, num_classes: int, *, smoothing: float = 0.0) -> torch.Tensor:
    return soft_labels(labels[:, None], torch.ones(labels.shape[0], 1, device=labels.device), num_classes,
                       smoothing=smoothing)
