"""Box mixing: CutMix and the patch-wise half of DiffCoRe-Mix, per-sample boxes in one launch.

CutMix (Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
Features", ICCV 2019) pastes a box cut from a partner image; DiffCoRe-Mix uses the same patch-wise
mixing between real and diffusion-generated images (DiffCoRe-Mix: Islam and Akhtar, "Context-guided
Responsible Data Augmentation with Diffusion Models", 2025). Parameters are sampled first
(:func:`sample_boxes`, with an explicit ``torch.Generator``, on the generator's device, no host sync)
and applied second (:func:`box_mix`), so the same parameters replay on the Triton kernel and the
torch reference.

:func:`box_mix` only copies pixels: ``out[b, :, y, x] = images[partner[b], :, y, x]`` inside the box of
sample ``b`` clipped to the image, ``images[b, :, y, x]`` outside. Boxes are ``(y0, x0, y1, x1)``,
half-open, in pixels, and may extend past the borders (or be empty). ``kept_fraction[b] = 1 -
clipped_area / (H * W)`` is the fraction of pixels still from ``images[b]``: the label weight of
``b``'s own class (the partner's weight is ``1 - kept_fraction``).

Triton kernel: a 1-D grid of (sample, 32 x 32 tile) programs looping over the channels. A tile reads
``images[b]`` unless the box covers it and the partner only if the box touches it (uniform per-tile
predicates keep the loads vectorised; only tiles on the box edge read both); the program of tile 0
of a sample also writes ``kept_fraction``, so the whole op is one launch.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from onlineaug.kernels import _backend

__all__ = ["box_mix", "box_mix_reference", "sample_boxes"]

_OP = "box_mix"
_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16)
_BLOCK_H, _BLOCK_W = 32, 32  # tile per program
_NUM_WARPS = 4

tl = None  # bound to triton.language by onlineaug.kernels._backend.jit on the first launch (lazy import)


def _box_mix_kernel(
    img_ptr, out_ptr, partner_ptr, boxes_ptr, kept_ptr,
    B, H, W, n_tiles_h, n_tiles_w,
    C: tl.constexpr,  # channels: compile-time (1, 3, 4, ...), unrolled
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles = n_tiles_h * n_tiles_w
    b = pid // n_tiles
    tile = pid % n_tiles
    HW = H * W

    partner = tl.load(partner_ptr + b)
    valid = (partner >= 0) & (partner < B)
    partner = tl.where(valid, partner, 0)
    y0 = tl.maximum(tl.load(boxes_ptr + b * 4 + 0), 0)  # clip the box to the image
    x0 = tl.maximum(tl.load(boxes_ptr + b * 4 + 1), 0)
    y1 = tl.minimum(tl.load(boxes_ptr + b * 4 + 2), H)
    x1 = tl.minimum(tl.load(boxes_ptr + b * 4 + 3), W)

    # a BLOCK_H x BLOCK_W tile; which sources does it need (uniform per tile: vectorised loads)?
    r_lo = (tile // n_tiles_w) * BLOCK_H
    c_lo = (tile % n_tiles_w) * BLOCK_W
    r_hi = tl.minimum(r_lo + BLOCK_H, H)
    c_hi = tl.minimum(c_lo + BLOCK_W, W)
    touches_box = (tl.maximum(r_lo, y0) < tl.minimum(r_hi, y1)) & (tl.maximum(c_lo, x0) < tl.minimum(c_hi, x1))
    inside_box = (y0 <= r_lo) & (r_hi <= y1) & (x0 <= c_lo) & (c_hi <= x1)

    rows = r_lo + tl.arange(0, BLOCK_H)[:, None]
    cols = c_lo + tl.arange(0, BLOCK_W)[None, :]
    inb = (rows < H) & (cols < W)
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    offs = rows * W + cols
    load_own = inb & (inside_box == 0)
    load_other = inb & touches_box & valid
    own_base = img_ptr + b.to(tl.int64) * C * HW
    other_base = img_ptr + partner.to(tl.int64) * C * HW
    out_base = out_ptr + b.to(tl.int64) * C * HW
    for c in tl.static_range(C):
        own = tl.load(own_base + c * HW + offs, mask=load_own, other=0)
        other = tl.load(other_base + c * HW + offs, mask=load_other, other=0)
        tl.store(out_base + c * HW + offs, tl.where(inside, other, own), mask=inb)

    if tile == 0:
        area = tl.maximum(y1 - y0, 0) * tl.maximum(x1 - x0, 0)
        kept = 1.0 - area.to(tl.float32) / HW  # HW is promoted to fp32, as float(h * w) in the reference
        kept = tl.where(valid, kept, float("nan"))  # unchecked bad partner index: poison the label weight
        tl.store(kept_ptr + b, kept)


def box_mix_reference(images: torch.Tensor, partner: torch.Tensor, boxes: torch.Tensor):
    """Plain-torch twin of :func:`box_mix` (no validation).

    Written for the CPU, where it is what ``backend="auto"`` runs. The partners are gathered with
    ``index_select`` (one row copy per sample; ``images[partner]`` gathers element by element, ~15x slower
    at B=64, 64 px). uint8 images (no autograd) are pasted by wrap-around arithmetic,
    ``x + (p - x) * inside`` modulo 256 with ``inside`` in {0, 1}: ``torch.where(inside, p, x)`` bit for bit
    in three vectorised in-place passes, ~8x faster than ``where`` with a mask broadcast over the channels.
    Float images keep ``torch.where`` (exact, and differentiable).
    """
    b, _, h, w = images.shape
    y0 = boxes[:, 0].clamp(min=0)
    x0 = boxes[:, 1].clamp(min=0)
    y1 = boxes[:, 2].clamp(max=h)
    x1 = boxes[:, 3].clamp(max=w)
    ys = torch.arange(h, device=images.device)
    xs = torch.arange(w, device=images.device)
    in_y = (ys[None, :] >= y0[:, None]) & (ys[None, :] < y1[:, None])  # (B, H)
    in_x = (xs[None, :] >= x0[:, None]) & (xs[None, :] < x1[:, None])  # (B, W)
    others = images.index_select(0, partner)
    if images.dtype == torch.uint8:
        inside = in_y.to(torch.uint8)[:, None, :, None] * in_x.to(torch.uint8)[:, None, None, :]  # (B, 1, H, W)
        mixed = others.sub_(images).mul_(inside).add_(images)
    else:
        mixed = torch.where((in_y[:, :, None] & in_x[:, None, :])[:, None], others, images)
    area = (y1 - y0).clamp(min=0) * (x1 - x0).clamp(min=0)
    kept = 1.0 - area.to(torch.float32) / float(h * w)
    return mixed, kept


def box_mix(
    images: torch.Tensor,
    partner: torch.Tensor,
    boxes: torch.Tensor,
    *,
    backend: str = "auto",
    validate: Optional[bool] = None,
):
    """Paste ``images[partner[b]]`` into box ``b`` of ``images[b]``, for every sample in one launch.

    Args:
        images: (B, C, H, W) contiguous, uint8 / float32 / float16 / bfloat16. Not modified.
        partner: int64 (B,) in [0, B).
        boxes: int64 (B, 4) as (y0, x0, y1, x1), half-open, pixels; clipped to the image here.
        backend: "auto" | "triton" | "torch" (see :mod:`kernels._backend`).
        validate: check partner in [0, B); None = only for CPU tensors, True = always (synchronises on
            CUDA), False = never (an unchecked bad partner gives NaN kept_fraction on the Triton path).

    Returns:
        ``(mixed, kept_fraction)``: a new tensor like ``images`` (pixel-exact copies) and float32 (B,).
    """
    t = _backend.check_tensor
    t(_OP, "images", images, dtypes=_DTYPES, shape=(None, None, None, None), shape_doc="(B, C, H, W)")
    b, c, h, w = images.shape
    dev = images.device
    t(_OP, "partner", partner, dtypes=(torch.int64,), shape=(b,), shape_doc=f"(B,) = ({b},)", device=dev,
      device_of="images")
    t(_OP, "boxes", boxes, dtypes=(torch.int64,), shape=(b, 4), shape_doc=f"(B, 4) = ({b}, 4) as (y0, x0, y1, x1)",
      device=dev, device_of="images")
    if _backend.should_validate(validate, dev, _OP):
        _backend.check_index_range(_OP, "partner", partner, 0, b, f"an index into the batch of {b}")
    resolved = _backend.resolve_backend(backend, dev, _OP)
    _backend.check_no_grad(_OP, resolved, images=images)
    if resolved == "torch":
        return box_mix_reference(images, partner, boxes)

    mixed = torch.empty_like(images)
    kept = torch.empty((b,), dtype=torch.float32, device=dev)
    if images.numel() == 0:
        return mixed, kept.fill_(1.0)
    n_tiles_h, n_tiles_w = -(-h // _BLOCK_H), -(-w // _BLOCK_W)
    kernel = _backend.jit(_box_mix_kernel)
    kernel[(b * n_tiles_h * n_tiles_w,)](images, mixed, partner, boxes, kept, b, h, w, n_tiles_h, n_tiles_w,
                                         C=c, BLOCK_H=_BLOCK_H, BLOCK_W=_BLOCK_W, num_warps=_NUM_WARPS)
    return mixed, kept


def sample_boxes(
    batch_size: int,
    height: int,
    width: int,
    lam: Union[float, torch.Tensor],
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """CutMix boxes (Yun et al. 2019; timm's ``rand_bbox``): int64 (B, 4) as (y0, x0, y1, x1), unclipped.

    Each box has size ``cut_h x cut_w`` with ``cut_h = floor(H * sqrt(1 - lam))`` (same for W), so its
    unclipped area is about ``(1 - lam) * H * W``, and is centred at a uniform random pixel
    ``(cy, cx)``: ``y0 = cy - cut_h // 2``, ``y1 = y0 + cut_h``. :func:`box_mix` clips it and returns the
    exact kept fraction, which is the label weight to use (as ``correct_lam=True`` in timm).

    ``lam`` is a float or a float (B,) tensor (per-sample lambdas) in [0, 1]. Everything is drawn
    with ``generator`` on the generator's device without a host sync.
    """
    op = "sample_boxes"
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator (explicit randomness), got "
                        f"{type(generator).__name__}; pass e.g. torch.Generator(device).manual_seed(seed).")
    for name, value in (("batch_size", batch_size), ("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "batch_size" else 1):
            raise ValueError(f"{op}: {name} must be a {'non-negative' if name == 'batch_size' else 'positive'} "
                             f"int, got {value!r}.")
    dev = generator.device
    if isinstance(lam, torch.Tensor):
        _backend.check_tensor(op, "lam", lam, dtypes=(torch.float32, torch.float64), shape=(batch_size,),
                              shape_doc=f"(batch_size,) = ({batch_size},)", device=dev,
                              device_of="the generator", contiguous=False)
        if lam.device.type == "cpu":
            _backend.check_value_range(op, "lam", lam, 0.0, 1.0)
        ratio = torch.sqrt(1.0 - lam.to(torch.float32))
    else:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0.0 <= lam <= 1.0):
            raise ValueError(f"{op}: lam={lam!r} must be a float in [0, 1] or a (B,) tensor.")
        ratio = torch.full((batch_size,), math.sqrt(1.0 - lam), dtype=torch.float32, device=dev)
    cut_h = torch.floor(ratio * height).to(torch.int64)
    cut_w = torch.floor(ratio * width).to(torch.int64)
    cy = torch.randint(0, height, (batch_size,), generator=generator, device=dev)
    cx = torch.randint(0, width, (batch_size,), generator=generator, device=dev)
    y0 = cy - cut_h // 2
    x0 = cx - cut_w // 2
    return torch.stack([y0, x0, y0 + cut_h, x0 + cut_w], dim=1)
