"""Cut-and-paste compositing of up to two RGBA foregrounds per sample (De-DA), one launch per batch.

De-DA (Chen et al., "Decoupled Data Augmentation for Improving Image Classification", arXiv
2411.02592, 2024: the class-dependent part is edited by a diffusion model and recombined online with
varied class-independent backgrounds) needs the paste step at batch time: each
sample ``b`` gets a background and up to two foreground layers from an RGBA bank, each scaled,
placed, optionally mirrored, and alpha-composited, the second layer over the first.

Geometry, per layer: the foreground ``(4, Hf, Wf)`` is drawn into a box of size
``scale * H`` by ``scale * W`` centred at ``(cy, cx)`` (output pixel coordinates). For output pixel
``(y, x)`` the source coordinates are::

    sy = ((y + 0.5 - cy) / (scale * H) + 0.5) * Hf - 0.5
    sx = ((x + 0.5 - cx) / (scale * W) + 0.5) * Wf - 0.5,   sx -> Wf - 1 - sx if flip

sampled bilinearly with zeros outside (so alpha is 0 outside the box). This equals
``F.grid_sample(fg, grid, mode="bilinear", padding_mode="zeros", align_corners=False)`` with
``grid = (gx, gy)``, ``gy = 2 (y + 0.5 - cy) / (scale H)``, ``gx = ±2 (x + 0.5 - cx) / (scale W)``
(minus when flipped), i.e. ``F.affine_grid`` with ``theta = [[±1/s, 0, ±(W - 2 cx) / (s W)],
[0, 1/s, (H - 2 cy) / (s H)]]``; the reference uses grid_sample and the kernel evaluates the same
float operations in the same order (IEEE division and no FMA contraction on the GPU).

Compositing uses straight (non-premultiplied) alpha, in [0, 1] units: RGB and A are sampled
bilinearly, then ``out = a1 * fg1 + (1 - a1) * bg`` and ``out = a2 * fg2 + (1 - a2) * out``.
(Straight alpha lets the RGB of fully transparent texels bleed into the antialiased edge; give
transparent texels a sensible colour, e.g. the edge colour, or black, when preparing the bank.)
Then optionally ``(out - mean[c]) / std[c]``, stored in ``out_dtype``.

``visible`` (float32, (B, 2)) is the visible area of each layer as a fraction of the image:
``sum(a1 * (1 - a2)) / (H W)`` and ``sum(a2) / (H W)``; use it to weight labels or drop samples whose
foreground is hidden. The kernel reduces per program and adds with atomics, so the sums are exact
up to fp32 rounding in a non-deterministic order (about 1e-6 relative).

``fg_index[b, l] = -1`` means no foreground in that layer. Kornia handles the geometric preparation
of the bank (see :mod:`kernels.kornia_ops`); this kernel is the fused batch-time paste.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from onlineaug.kernels import _backend

__all__ = ["composite", "composite_reference"]

_OP = "composite"
_BLOCK = 512  # pixels per program on the GPU (16 bilinear taps per pixel and layer: keep registers low)
_BLOCK_INTERPRET = 1024  # Triton's CPU interpreter pays Python overhead per op and program: fewer programs
_NUM_WARPS = 4

tl = None  # bound to triton.language by onlineaug.kernels._backend.jit on the first launch (lazy import)


def _composite_kernel(
    bg_ptr, fg_ptr, out_ptr, vis_ptr,
    idx_ptr, scale_ptr, center_ptr, flip_ptr, mean_ptr, std_ptr,
    N, H, W, Hf, Wf, n_blocks,
    NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // n_blocks
    blk = pid % n_blocks
    HW = H * W
    HWf = Hf * Wf

    offs = blk * BLOCK + tl.arange(0, BLOCK)
    inb = offs < HW
    y = offs // W
    x = offs - y * W
    yc = y.to(tl.float32) + 0.5
    xc = x.to(tl.float32) + 0.5

    bg_base = b.to(tl.int64) * 3 * HW
    red = tl.load(bg_ptr + bg_base + offs, mask=inb, other=0).to(tl.float32) / 255.0
    green = tl.load(bg_ptr + bg_base + HW + offs, mask=inb, other=0).to(tl.float32) / 255.0
    blue = tl.load(bg_ptr + bg_base + 2 * HW + offs, mask=inb, other=0).to(tl.float32) / 255.0

    a1 = tl.zeros([BLOCK], dtype=tl.float32)
    a2 = tl.zeros([BLOCK], dtype=tl.float32)
    valid = b >= 0  # becomes False when a layer has an (unchecked) bad fg_index
    for layer in tl.static_range(2):
        idx = tl.load(idx_ptr + b * 2 + layer)
        valid = valid & (idx >= -1) & (idx < N)
        active = (idx >= 0) & (idx < N)
        idx = tl.where(active, idx, 0)
        s = tl.load(scale_ptr + b * 2 + layer)
        cy = tl.load(center_ptr + b * 4 + layer * 2)
        cx = tl.load(center_ptr + b * 4 + layer * 2 + 1)
        flip = tl.load(flip_ptr + b * 2 + layer)

        # normalised grid coordinates, then grid_sample's unnormalisation (align_corners=False)
        gy = tl.math.div_rn(yc - cy, s * H) * 2.0
        gx = tl.math.div_rn(xc - cx, s * W) * 2.0
        gx = tl.where(flip != 0, -gx, gx)
        sy = (gy + 1.0) * (Hf * 0.5) - 0.5
        sx = (gx + 1.0) * (Wf * 0.5) - 0.5
        y0f = tl.floor(sy)
        x0f = tl.floor(sx)
        wy1 = sy - y0f
        wx1 = sx - x0f
        wy0 = 1.0 - wy1
        wx0 = 1.0 - wx1
        # tap validity on floats (no int overflow for far-away coordinates), then safe int indices
        ok = inb & active
        ok_y0 = (y0f >= 0.0) & (y0f <= Hf - 1.0)
        ok_y1 = (y0f >= -1.0) & (y0f <= Hf - 2.0)
        ok_x0 = (x0f >= 0.0) & (x0f <= Wf - 1.0)
        ok_x1 = (x0f >= -1.0) & (x0f <= Wf - 2.0)
        y0 = tl.minimum(tl.maximum(y0f, -1.0), Hf - 1.0).to(tl.int32)
        x0 = tl.minimum(tl.maximum(x0f, -1.0), Wf - 1.0).to(tl.int32)
        base = fg_ptr + idx.to(tl.int64) * 4 * HWf
        p00 = base + y0 * Wf + x0
        p01 = p00 + 1
        p10 = p00 + Wf
        p11 = p10 + 1
        m00 = ok & ok_y0 & ok_x0
        m01 = ok & ok_y0 & ok_x1
        m10 = ok & ok_y1 & ok_x0
        m11 = ok & ok_y1 & ok_x1
        w00 = wy0 * wx0
        w01 = wy0 * wx1
        w10 = wy1 * wx0
        w11 = wy1 * wx1

        a = (w00 * tl.load(p00 + 3 * HWf, mask=m00, other=0).to(tl.float32)
             + w01 * tl.load(p01 + 3 * HWf, mask=m01, other=0).to(tl.float32)
             + w10 * tl.load(p10 + 3 * HWf, mask=m10, other=0).to(tl.float32)
             + w11 * tl.load(p11 + 3 * HWf, mask=m11, other=0).to(tl.float32)) / 255.0
        fr = (w00 * tl.load(p00, mask=m00, other=0).to(tl.float32)
              + w01 * tl.load(p01, mask=m01, other=0).to(tl.float32)
              + w10 * tl.load(p10, mask=m10, other=0).to(tl.float32)
              + w11 * tl.load(p11, mask=m11, other=0).to(tl.float32)) / 255.0
        fgr = (w00 * tl.load(p00 + HWf, mask=m00, other=0).to(tl.float32)
               + w01 * tl.load(p01 + HWf, mask=m01, other=0).to(tl.float32)
               + w10 * tl.load(p10 + HWf, mask=m10, other=0).to(tl.float32)
               + w11 * tl.load(p11 + HWf, mask=m11, other=0).to(tl.float32)) / 255.0
        fb = (w00 * tl.load(p00 + 2 * HWf, mask=m00, other=0).to(tl.float32)
              + w01 * tl.load(p01 + 2 * HWf, mask=m01, other=0).to(tl.float32)
              + w10 * tl.load(p10 + 2 * HWf, mask=m10, other=0).to(tl.float32)
              + w11 * tl.load(p11 + 2 * HWf, mask=m11, other=0).to(tl.float32)) / 255.0
        red = a * fr + (1.0 - a) * red
        green = a * fgr + (1.0 - a) * green
        blue = a * fb + (1.0 - a) * blue
        if layer == 0:
            a1 = a
        else:
            a2 = a

    # visible area fractions (masked-out lanes have a = 0)
    tl.atomic_add(vis_ptr + b * 2, tl.sum(a1 * (1.0 - a2), axis=0) / HW)
    tl.atomic_add(vis_ptr + b * 2 + 1, tl.sum(a2, axis=0) / HW)

    if NORMALIZE:
        red = (red - tl.load(mean_ptr)) / tl.load(std_ptr)
        green = (green - tl.load(mean_ptr + 1)) / tl.load(std_ptr + 1)
        blue = (blue - tl.load(mean_ptr + 2)) / tl.load(std_ptr + 2)
    nan = float("nan")
    red = tl.where(valid, red, nan)  # unchecked bad fg_index: poison the sample
    green = tl.where(valid, green, nan)
    blue = tl.where(valid, blue, nan)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + bg_base + offs, red.to(dtype), mask=inb)
    tl.store(out_ptr + bg_base + HW + offs, green.to(dtype), mask=inb)
    tl.store(out_ptr + bg_base + 2 * HW + offs, blue.to(dtype), mask=inb)


def composite_reference(
    background: torch.Tensor,
    foregrounds: torch.Tensor,
    fg_index: torch.Tensor,
    scale: torch.Tensor,
    center: torch.Tensor,
    flip: torch.Tensor,
    *,
    mean: Optional[torch.Tensor] = None,
    std: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
):
    """Plain-torch twin of :func:`composite` using ``F.grid_sample`` (no validation)."""
    b, _, h, w = background.shape
    dev = background.device
    out = background.to(torch.float32) / 255
    ys = torch.arange(h, dtype=torch.float32, device=dev) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=dev) + 0.5
    alphas = []
    for layer in range(2):
        idx = fg_index[:, layer]
        active = (idx >= 0).to(torch.float32).view(b, 1, 1, 1)
        fg = foregrounds[idx.clamp(min=0)].to(torch.float32) / 255  # (B, 4, Hf, Wf)
        s = scale[:, layer, None]
        gy = (ys[None, :] - center[:, layer, 0, None]) / (s * h) * 2  # (B, H)
        gx = (xs[None, :] - center[:, layer, 1, None]) / (s * w) * 2  # (B, W)
        gx = torch.where(flip[:, layer, None], -gx, gx)
        grid = torch.stack([gx[:, None, :].expand(b, h, w), gy[:, :, None].expand(b, h, w)], dim=-1)
        sampled = F.grid_sample(fg, grid, mode="bilinear", padding_mode="zeros", align_corners=False) * active
        a = sampled[:, 3:4]
        out = a * sampled[:, :3] + (1 - a) * out
        alphas.append(a)
    a1, a2 = alphas
    visible = torch.stack([(a1 * (1 - a2)).sum(dim=(1, 2, 3)), a2.sum(dim=(1, 2, 3))], dim=1) / (h * w)
    if mean is not None:
        out = (out - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return out.to(out_dtype), visible


def composite(
    background: torch.Tensor,
    foregrounds: torch.Tensor,
    fg_index: torch.Tensor,
    scale: torch.Tensor,
    center: torch.Tensor,
    flip: torch.Tensor,
    *,
    mean: Optional[torch.Tensor] = None,
    std: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    validate: Optional[bool] = None,
):
    """Paste up to two RGBA foreground layers onto each background, in one kernel launch.

    Args:
        background: uint8 (B, 3, H, W), contiguous.
        foregrounds: uint8 (N, 4, Hf, Wf) RGBA bank (straight alpha), contiguous, N >= 1.
        fg_index: int64 (B, 2) in [0, N), or -1 for an empty layer. Layer 1 is drawn over layer 0.
        scale: float32 (B, 2) > 0, the box size as a fraction of (H, W).
        center: float32 (B, 2, 2), (cy, cx) of each box in output pixels.
        flip: bool (B, 2), mirror the foreground horizontally.
        mean, std: optional float32 (3,) in [0, 1] pixel units; both or neither.
        out_dtype: torch.float32, torch.float16 or torch.bfloat16.
        backend: "auto" | "triton" | "torch" (see :mod:`kernels._backend`).
        validate: check fg_index, scale and std values; None = only for CPU tensors, True = always
            (synchronises on CUDA), False = never (an unchecked bad fg_index gives NaN output for
            that sample on the Triton path).

    Returns:
        ``(out, visible)``: (B, 3, H, W) in ``out_dtype`` ([0, 1] units unless normalized), and float32
        (B, 2) visible fractions (one zero-fill plus the kernel; visible sums use atomics, ~1e-6 rel).
    """
    t = _backend.check_tensor
    t(_OP, "background", background, dtypes=(torch.uint8,), shape=(None, 3, None, None),
      shape_doc="(B, 3, H, W)")
    b, _, h, w = background.shape
    dev = background.device
    t(_OP, "foregrounds", foregrounds, dtypes=(torch.uint8,), shape=(None, 4, None, None),
      shape_doc="(N, 4, Hf, Wf) RGBA", device=dev, device_of="background")
    n, _, hf, wf = foregrounds.shape
    if n < 1 or hf < 1 or wf < 1:
        raise ValueError(f"{_OP}: foregrounds has shape {tuple(foregrounds.shape)}; the bank needs at least one "
                         "non-empty image (use fg_index = -1 for samples without a foreground).")
    t(_OP, "fg_index", fg_index, dtypes=(torch.int64,), shape=(b, 2), shape_doc=f"(B, 2) = ({b}, 2)",
      device=dev, device_of="background")
    t(_OP, "scale", scale, dtypes=(torch.float32,), shape=(b, 2), shape_doc=f"(B, 2) = ({b}, 2)",
      device=dev, device_of="background")
    t(_OP, "center", center, dtypes=(torch.float32,), shape=(b, 2, 2),
      shape_doc=f"(B, 2, 2) = ({b}, 2, 2) as (cy, cx) per layer", device=dev, device_of="background")
    t(_OP, "flip", flip, dtypes=(torch.bool,), shape=(b, 2), shape_doc=f"(B, 2) = ({b}, 2)", device=dev,
      device_of="background")
    _backend.check_out_dtype(_OP, out_dtype)
    if (mean is None) != (std is None):
        raise ValueError(f"{_OP}: pass both mean and std (to normalize) or neither; got "
                         f"mean={'None' if mean is None else 'a tensor'}, std={'None' if std is None else 'a tensor'}.")
    check_values = _backend.should_validate(validate, dev, _OP)
    if mean is not None:
        _backend.check_mean_std(_OP, mean, std, dev, check_values)
    if check_values:
        _backend.check_index_range(_OP, "fg_index", fg_index, 0, n, f"an index into the {n} foregrounds",
                                   allowed_extra=(-1,))
        if not bool(((scale > 0) & torch.isfinite(scale)).all()):
            raise ValueError(f"{_OP}: scale must be finite and > 0 (the box is scale*H by scale*W), got "
                             f"{scale.tolist()}.")
        if not bool(torch.isfinite(center).all()):
            raise ValueError(f"{_OP}: center has non-finite values.")
    if _backend.resolve_backend(backend, dev, _OP) == "torch":
        return composite_reference(background, foregrounds, fg_index, scale, center, flip, mean=mean, std=std,
                                   out_dtype=out_dtype)

    out = torch.empty((b, 3, h, w), dtype=out_dtype, device=dev)
    visible = torch.zeros((b, 2), dtype=torch.float32, device=dev)  # atomics accumulate into it
    if out.numel() == 0:
        return out, visible
    block = _BLOCK_INTERPRET if _backend.interpret_enabled() else _BLOCK
    n_blocks = -(-(h * w) // block)
    normalize = mean is not None
    kernel = _backend.jit(_composite_kernel)
    kernel[(b * n_blocks,)](
        background, foregrounds, out, visible,
        fg_index, scale, center, flip.view(torch.uint8),
        mean if normalize else visible, std if normalize else visible,  # unused pointers when not normalizing
        n, h, w, hf, wf, n_blocks,
        NORMALIZE=normalize, BLOCK=block, num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )
    return out, visible
