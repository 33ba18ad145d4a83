"""DiffuseMix / GenMix hybrid images: concatenate, blend with a fractal, normalize; one fused pass.

DiffuseMix (Islam et al., "DiffuseMix: Label-Preserving Data Augmentation with Diffusion Models",
CVPR 2024) builds a *hybrid* image from an original and its diffusion-edited version, joined along a
random horizontal or vertical split by a binary mask, then blends the hybrid with a fractal image.
GenMix (Islam et al., "GenMix: Effective Data Augmentation with Generative Diffusion Model Image
Editing", 2024) makes the seam smooth ("seamless concatenation"): ``blend_width > 0`` here. Per
sample, pixel and channel ``c``::

    m      = mask, the weight of ``generated`` (0 on one side of the seam, 1 on the other)
    hybrid = m * generated + (1 - m) * original
    out    = (1 - lam) * hybrid + lam * fractal[fractal_index]
    out    = (out - mean[c]) / std[c]

Pixels are read as uint8 and converted to ``x / 255`` in fp32. The mask is evaluated in the kernel
and never materialised. Along the split axis of length ``L``, at integer index ``i``::

    u = i + 0.5 - L / 2
    m = clamp(u / bw + 0.5, 0, 1)   if bw > 0       (a linear ramp bw pixels wide, centred)
    m = 1.0 if u >= 0 else 0.0      otherwise        (a hard seam in the middle)
    m = 1 - m                       if flip
    m = 0                           if split == SPLIT_NONE (flip ignored)

``split`` codes: ``SPLIT_NONE`` (0) makes the output just the normalized original (blended with the
fractal when ``lam > 0``), so real and synthetic samples go through one launch; ``SPLIT_TOP_BOTTOM``
(1) varies the mask along H (original on top unless flipped); ``SPLIT_LEFT_RIGHT`` (2) along W.

The Triton kernel is memory-bound by design: a 1-D grid of (sample, 32 x 32 tile) programs, each
loading its sample's parameters once, computing the mask for its tile and looping over the three
channels with contiguous (vectorised) uint8 loads and stores. ``generated`` is read only by tiles
where some ``m > 0``, ``original`` only by tiles where some ``m < 1``, the fractal only where
``lam != 0``: a split sample reads one source byte per pixel and channel except on the tiles along
the seam (these per-tile, uniform predicates keep the loads vectorised, where per-pixel predicates
would split them into byte loads).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from onlineaug.kernels import _backend

__all__ = [
    "SPLIT_NONE",
    "SPLIT_TOP_BOTTOM",
    "SPLIT_LEFT_RIGHT",
    "SPLIT_CODES",
    "concat_blend_normalize",
    "concat_blend_normalize_reference",
    "smooth_mask_reference",
]

SPLIT_NONE, SPLIT_TOP_BOTTOM, SPLIT_LEFT_RIGHT = 0, 1, 2
SPLIT_CODES = {"none": SPLIT_NONE, "top_bottom": SPLIT_TOP_BOTTOM, "left_right": SPLIT_LEFT_RIGHT}

_OP = "concat_blend_normalize"
_BLOCK_H, _BLOCK_W = 32, 32  # tile per program (224 = 7 x 32: no partial tiles at 224 px)
_NUM_WARPS = 4

tl = None  # bound to triton.language by onlineaug.kernels._backend.jit on the first launch (lazy import)


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------

def _concat_blend_kernel(
    orig_ptr, gen_ptr, frac_ptr, out_ptr,
    split_ptr, flip_ptr, bw_ptr, lam_ptr, fidx_ptr, mean_ptr, std_ptr,
    H, W, num_fractals, n_tiles_h, n_tiles_w,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles = n_tiles_h * n_tiles_w
    b = pid // n_tiles
    tile = pid % n_tiles
    HW = H * W

    # per-sample parameters, loaded once per program
    split = tl.load(split_ptr + b)
    flip = tl.load(flip_ptr + b)
    bw = tl.load(bw_ptr + b)
    lam = tl.load(lam_ptr + b)
    fidx = tl.load(fidx_ptr + b)
    valid = (split >= 0) & (split <= 2) & (fidx >= 0) & (fidx < num_fractals)
    fidx = tl.where(valid, fidx, 0)

    # a BLOCK_H x BLOCK_W tile of the image; rows of BLOCK_W contiguous (vectorisable) pixels
    rows = (tile // n_tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = (tile % n_tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    inb = (rows < H) & (cols < W)
    offs = rows * W + cols

    # m = weight of `generated`
    along_h = split == 1
    i = tl.where(along_h, rows, cols).to(tl.float32)
    half = tl.where(along_h, H * 0.5, W * 0.5)
    u = i + 0.5 - half
    safe_bw = tl.where(bw > 0.0, bw, 1.0)
    ramp = tl.minimum(tl.maximum(u / safe_bw + 0.5, 0.0), 1.0)
    step = tl.where(u >= 0.0, 1.0, 0.0)
    m = tl.where(bw > 0.0, ramp, step)
    m = tl.where(flip != 0, 1.0 - m, m)
    m = tl.where((split == 1) | (split == 2), m, 0.0)

    # Read a source only if some pixel of the tile needs it: per-tile (uniform) predicates keep the
    # loads vectorised; only tiles on the seam read both images. (tl.where, not &, on scalar
    # float comparisons: the interpreter mishandles & there.)
    need_gen = tl.max(tl.max(tl.where(inb, m, 0.0), axis=1), axis=0) > 0.0
    need_orig = tl.min(tl.min(tl.where(inb, m, 1.0), axis=1), axis=0) < 1.0
    load_gen = tl.where(need_gen, inb, False)
    load_orig = tl.where(need_orig, inb, False)
    load_frac = tl.where(lam != 0.0, inb & valid, False)
    sample_base = b.to(tl.int64) * 3 * HW
    frac_base = fidx.to(tl.int64) * 3 * HW
    for c in tl.static_range(3):
        o = tl.load(orig_ptr + sample_base + c * HW + offs, mask=load_orig, other=0).to(tl.float32) / 255.0
        g = tl.load(gen_ptr + sample_base + c * HW + offs, mask=load_gen, other=0).to(tl.float32) / 255.0
        f = tl.load(frac_ptr + frac_base + c * HW + offs, mask=load_frac, other=0).to(tl.float32) / 255.0
        hybrid = m * g + (1.0 - m) * o
        val = (1.0 - lam) * hybrid + lam * f
        mean = tl.load(mean_ptr + c)
        std = tl.load(std_ptr + c)
        val = (val - mean) / std
        val = tl.where(valid, val, float("nan"))  # unchecked bad split code / fractal_index: poison
        tl.store(out_ptr + sample_base + c * HW + offs, val.to(out_ptr.dtype.element_ty), mask=inb)


# --------------------------------------------------------------------------------------------------
# Reference twins (plain torch)
# --------------------------------------------------------------------------------------------------

def _as_param(value, dtype: torch.dtype, device, name: str) -> torch.Tensor:
    """Python scalar or (B,) tensor -> (B,) tensor of ``dtype`` on ``device`` (for smooth_mask_reference)."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            raise ValueError(f"smooth_mask_reference: {name} must be a scalar or a (B,) tensor, "
                             f"got shape {tuple(value.shape)}.")
        return value.reshape(-1).to(device=device, dtype=dtype)
    if name == "split" and isinstance(value, str):
        if value not in SPLIT_CODES:
            raise ValueError(f"smooth_mask_reference: split={value!r} is not one of {sorted(SPLIT_CODES)}.")
        value = SPLIT_CODES[value]
    if not isinstance(value, (bool, int, float)):
        raise TypeError(f"smooth_mask_reference: {name} must be a Python scalar or a tensor, "
                        f"got {type(value).__name__}.")
    return torch.tensor([value], dtype=dtype, device=device)


def smooth_mask_reference(
    height: int,
    width: int,
    split: Union[torch.Tensor, int, str],
    flip: Union[torch.Tensor, bool],
    blend_width: Union[torch.Tensor, float],
    device: Optional[Union[torch.device, str]] = None,
) -> torch.Tensor:
    """The (B, 1, H, W) float32 weight of ``generated`` (see the module docstring for the formula).

    ``split`` (int codes, or for one sample a name from ``SPLIT_CODES``), ``flip`` and ``blend_width``
    are (B,) tensors or Python scalars (then B = 1). Split codes other than 0, 1, 2 give a zero mask
    here; the public op rejects them.
    """
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise ValueError(f"smooth_mask_reference: height and width must be positive ints, got {height!r}, {width!r}.")
    if device is None:
        device = next((v.device for v in (split, flip, blend_width) if isinstance(v, torch.Tensor)), "cpu")
    split = _as_param(split, torch.int64, device, "split")
    flip = _as_param(flip, torch.bool, device, "flip")
    bw = _as_param(blend_width, torch.float32, device, "blend_width")
    if not (split.shape == flip.shape == bw.shape):
        raise ValueError(f"smooth_mask_reference: split, flip and blend_width must have the same length, got "
                         f"{tuple(split.shape)}, {tuple(flip.shape)}, {tuple(bw.shape)}.")

    def axis_mask(length: int) -> torch.Tensor:  # (B, length)
        u = torch.arange(length, dtype=torch.float32, device=device) + 0.5 - length / 2
        u = u.expand(bw.shape[0], length)
        w = bw[:, None]
        ramp = (u / torch.where(w > 0, w, torch.ones_like(w)) + 0.5).clamp(0.0, 1.0)
        step = (u >= 0).to(torch.float32)
        return torch.where(w > 0, ramp, step)

    # Flip and the zero mask of other codes are per-sample maps of the values, so they are applied to the
    # (B, H) and (B, W) axis masks (the same values as on the (B, H, W) mask) and the one full-size op is
    # the choice between the two: one (B, H, W) pass instead of six.
    valid = ((split == SPLIT_TOP_BOTTOM) | (split == SPLIT_LEFT_RIGHT))[:, None]

    def finished(axis: torch.Tensor) -> torch.Tensor:
        axis = torch.where(flip[:, None], 1.0 - axis, axis)
        return torch.where(valid, axis, torch.zeros_like(axis))

    m_h = finished(axis_mask(height))[:, :, None]
    m_w = finished(axis_mask(width))[:, None, :]
    m = torch.where((split == SPLIT_TOP_BOTTOM)[:, None, None], m_h, m_w)
    return m[:, None].contiguous()


def concat_blend_normalize_reference(
    original: torch.Tensor,
    generated: torch.Tensor,
    fractals: torch.Tensor,
    *,
    split: torch.Tensor,
    flip: torch.Tensor,
    blend_width: torch.Tensor,
    lam: torch.Tensor,
    fractal_index: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Plain-torch twin of :func:`concat_blend_normalize` (materialises the mask; no validation).

    Written for the CPU, where it is what ``backend="auto"`` runs: the fractals are gathered with
    ``index_select`` (a row copy per sample, where ``fractals[fractal_index]`` gathers element by element), and
    without autograd every step after the three float conversions runs in place on those fresh tensors, in
    the formula's order (the same bits), instead of allocating a temporary per operation (on the CPU a fresh
    batch-sized float32 buffer costs more than the arithmetic: the kernel maps its pages, ~770 page faults
    per 3 MiB at B=64, 64 px).
    """
    b, _, h, w = original.shape
    m = smooth_mask_reference(h, w, split, flip, blend_width, original.device)
    lam_ = lam.to(torch.float32).view(b, 1, 1, 1)
    mean_, std_ = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
    chosen = fractals.index_select(0, fractal_index)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (blend_width, lam, mean, std)):
        o = original.to(torch.float32) / 255
        g = generated.to(torch.float32) / 255
        f = chosen.to(torch.float32) / 255
        hybrid = m * g + (1 - m) * o
        out = (1 - lam_) * hybrid + lam_ * f
        return ((out - mean_) / std_).to(out_dtype)
    # uint8 -> float32 copies, ours to overwrite; at most two live at a time (a third costs its page faults)
    hybrid = generated.to(torch.float32).div_(255).mul_(m)  # m * g
    hybrid.add_(original.to(torch.float32).div_(255).mul_(1 - m))  # + (1 - m) * o
    out = hybrid.mul_(1 - lam_).add_(chosen.to(torch.float32).div_(255).mul_(lam_))  # (1 - lam) * hybrid + lam * f
    return out.sub_(mean_).div_(std_).to(out_dtype)


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------

def _validate(original, generated, fractals, split, flip, blend_width, lam, fractal_index, mean, std,
              out_dtype, validate):
    t = _backend.check_tensor
    t(_OP, "original", original, dtypes=(torch.uint8,), shape=(None, 3, None, None), shape_doc="(B, 3, H, W)")
    b, _, h, w = original.shape
    dev = original.device
    t(_OP, "generated", generated, dtypes=(torch.uint8,), shape=(b, 3, h, w),
      shape_doc=f"(B, 3, H, W) = {(b, 3, h, w)} like original", device=dev, device_of="original")
    t(_OP, "fractals", fractals, dtypes=(torch.uint8,), shape=(None, 3, h, w),
      shape_doc=f"(F, 3, H, W) with (H, W) = {(h, w)} like original", device=dev, device_of="original")
    if fractals.shape[0] < 1:
        raise ValueError(f"{_OP}: fractals is empty (shape {tuple(fractals.shape)}); pass at least one fractal "
                         "image (use lam = 0 to disable the fractal blend).")
    for name, value, dtype in (("split", split, torch.int64), ("flip", flip, torch.bool),
                               ("blend_width", blend_width, torch.float32), ("lam", lam, torch.float32),
                               ("fractal_index", fractal_index, torch.int64)):
        t(_OP, name, value, dtypes=(dtype,), shape=(b,), shape_doc=f"(B,) = ({b},)", device=dev,
          device_of="original")
    _backend.check_out_dtype(_OP, out_dtype)
    check_values = _backend.should_validate(validate, dev, _OP)
    _backend.check_mean_std(_OP, mean, std, dev, check_values)
    if check_values:
        _backend.check_index_range(_OP, "split", split, 0, 3,
                                   "codes SPLIT_NONE=0, SPLIT_TOP_BOTTOM=1, SPLIT_LEFT_RIGHT=2")
        _backend.check_index_range(_OP, "fractal_index", fractal_index, 0, fractals.shape[0],
                                   f"an index into the {fractals.shape[0]} fractals")
        _backend.check_value_range(_OP, "lam", lam, 0.0, 1.0, " (the fractal blend weight)")
        if not bool(torch.isfinite(blend_width).all()):
            raise ValueError(f"{_OP}: blend_width has non-finite values; pass widths in pixels (0 = hard seam).")


def concat_blend_normalize(
    original: torch.Tensor,
    generated: torch.Tensor,
    fractals: torch.Tensor,
    *,
    split: torch.Tensor,
    flip: torch.Tensor,
    blend_width: torch.Tensor,
    lam: torch.Tensor,
    fractal_index: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """DiffuseMix hybrid + fractal blend + normalize for a whole batch in one kernel launch.

    Args:
        original, generated: uint8 (B, 3, H, W), contiguous, same device.
        fractals: uint8 (F, 3, H, W) bank, F >= 1.
        split: int64 (B,) codes SPLIT_NONE / SPLIT_TOP_BOTTOM / SPLIT_LEFT_RIGHT.
        flip: bool (B,), swaps the two sides. blend_width: float32 (B,) seam ramp width in pixels.
        lam: float32 (B,) fractal weight in [0, 1]. fractal_index: int64 (B,) in [0, F).
        mean, std: float32 (3,) in [0, 1] pixel units.
        out_dtype: torch.float32, torch.float16 or torch.bfloat16.
        backend: "auto" | "triton" | "torch" (see :mod:`kernels._backend`).
        validate: value-range checks (split codes, fractal_index, lam, std); None = only for CPU
            tensors, True = always (synchronises on CUDA), False = never. Unchecked bad split codes or
            fractal indices give NaN for that sample on the Triton path.

    Returns:
        (B, 3, H, W) tensor of ``out_dtype``.
    """
    _validate(original, generated, fractals, split, flip, blend_width, lam, fractal_index, mean, std,
              out_dtype, validate)
    if _backend.resolve_backend(backend, original.device, _OP) == "torch":
        return concat_blend_normalize_reference(
            original, generated, fractals, split=split, flip=flip, blend_width=blend_width, lam=lam,
            fractal_index=fractal_index, mean=mean, std=std, out_dtype=out_dtype)

    b, _, h, w = original.shape
    out = torch.empty((b, 3, h, w), dtype=out_dtype, device=original.device)
    if out.numel() == 0:
        return out
    n_tiles_h, n_tiles_w = -(-h // _BLOCK_H), -(-w // _BLOCK_W)
    kernel = _backend.jit(_concat_blend_kernel)
    kernel[(b * n_tiles_h * n_tiles_w,)](
        original, generated, fractals, out,
        split, flip.view(torch.uint8), blend_width, lam, fractal_index, mean, std,
        h, w, fractals.shape[0], n_tiles_h, n_tiles_w,
        BLOCK_H=_BLOCK_H, BLOCK_W=_BLOCK_W, num_warps=_NUM_WARPS,
    )
    return out
