"""Pixel-wise mixing: Mixup and the pixel-wise half of DiffCoRe-Mix, per-sample lambdas in one launch.

Mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018) takes a convex
combination of two images; DiffCoRe-Mix (Islam and Akhtar, "Context-guided Responsible Data
Augmentation with Diffusion Models", 2025) mixes real and diffusion-generated images pixel-wise the
same way. Per sample ``b``::

    out[b] = lam[b] * images[b] + (1 - lam[b]) * images[partner[b]]

computed in fp32 and stored in the input dtype. For uint8 images the result is rounded half up
(``floor(v + 0.5)``, the same in the kernel and the reference) and clamped to [0, 255]. ``lam`` is the
label weight of ``b``'s own class.

Triton kernel: a 1-D grid of (sample, block of the C*H*W elements of that sample) programs; the
partner image is not read where ``lam == 1``.
"""
from __future__ import annotations

from typing import Optional

import torch

from onlineaug.kernels import _backend

__all__ = ["pixel_mix", "pixel_mix_reference"]

_OP = "pixel_mix"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)
_BLOCK = 2048
_NUM_WARPS = 4

tl = None  # bound to triton.language by onlineaug.kernels._backend.jit on the first launch (lazy import)


def _pixel_mix_kernel(
    img_ptr, out_ptr, partner_ptr, lam_ptr,
    B, CHW, n_blocks,
    IS_UINT8: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // n_blocks
    blk = pid % n_blocks

    partner = tl.load(partner_ptr + b)
    valid = (partner >= 0) & (partner < B)
    partner = tl.where(valid, partner, 0)
    lam = tl.load(lam_ptr + b)

    offs = blk * BLOCK + tl.arange(0, BLOCK)
    inb = offs < CHW
    own = tl.load(img_ptr + b.to(tl.int64) * CHW + offs, mask=inb, other=0).to(tl.float32)
    load_partner = tl.where(lam != 1.0, inb & valid, False)
    other = tl.load(img_ptr + partner.to(tl.int64) * CHW + offs, mask=load_partner, other=0).to(tl.float32)
    val = lam * own + (1.0 - lam) * other
    if IS_UINT8:
        val = tl.minimum(tl.maximum(tl.floor(val + 0.5), 0.0), 255.0)
    else:
        val = tl.where(valid, val, float("nan"))  # unchecked bad partner index: poison
    tl.store(out_ptr + b.to(tl.int64) * CHW + offs, val.to(out_ptr.dtype.element_ty), mask=inb)


def pixel_mix_reference(images: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor, *,
                        inplace: bool = False) -> torch.Tensor:
    """Plain-torch twin of :func:`pixel_mix` (no validation).

    Written for the CPU, where it is what ``backend="auto"`` runs, and where a fresh (B, C, H, W) float32
    buffer costs more than the arithmetic (the kernel maps new pages: ~1500 page faults, milliseconds, for a
    second and third 3 MiB buffer at B=64, 64 px). So the partners are gathered with ``index_select`` (one
    row copy per sample, where ``images[partner]`` gathers element by element), and without autograd the two
    products and their sum are formed in place, in the formula's order (``lam * own + (1 - lam) * other``:
    the same bits): in the float32 copy of non-float32 images, and with ``inplace`` in float32 ``images``
    itself (the partners are gathered first, so no row is read after it was overwritten).
    """
    lam_ = lam.to(torch.float32).view(-1, *([1] * (images.dim() - 1)))
    own = images.to(torch.float32)
    other = images.index_select(0, partner).to(torch.float32)
    if torch.is_grad_enabled() and (images.requires_grad or lam.requires_grad):
        out = lam_ * own + (1 - lam_) * other
    else:
        scaled = own.mul_(lam_) if inplace or own is not images else torch.mul(own, lam_)
        out = scaled.add_(other.mul_(1 - lam_))  # ``other`` is a fresh copy (index_select)
    if images.dtype == torch.uint8:
        out = out.add_(0.5).floor_().clamp_(0, 255)
    return out.to(images.dtype)


def pixel_mix(
    images: torch.Tensor,
    partner: torch.Tensor,
    lam: torch.Tensor,
    *,
    backend: str = "auto",
    validate: Optional[bool] = None,
    inplace: bool = False,
) -> torch.Tensor:
    """``lam[b] * images[b] + (1 - lam[b]) * images[partner[b]]`` for every sample in one launch.

    Args:
        images: (B, C, H, W) contiguous, float32 / float16 / bfloat16 / uint8 (uint8: rounded half up
            and clamped). Not modified unless ``inplace``.
        partner: int64 (B,) in [0, B).
        lam: float32 (B,), the weight of ``images[b]`` (usually in [0, 1]).
        backend: "auto" | "triton" | "torch" (see :mod:`kernels._backend`).
        validate: check partner in [0, B); None = only for CPU tensors, True = always (synchronises on
            CUDA), False = never (an unchecked bad partner gives NaN for that sample with float
            images on the Triton path, and an undefined sample with uint8 images).
        inplace: the caller owns ``images`` and will not read it again, so the torch path may write the
            result into float32 ``images`` instead of a new buffer (as ``inplace`` in ``torch.nn.functional``;
            a new buffer is what costs on the CPU). Use the returned tensor either way: the Triton kernel,
            which reads partner rows while others are written, always returns a new one.

    Returns:
        A tensor like ``images``: new, or with ``inplace`` on the torch path possibly ``images`` itself.
    """
    t = _backend.check_tensor
    t(_OP, "images", images, dtypes=_DTYPES, shape=(None, None, None, None), shape_doc="(B, C, H, W)")
    b = images.shape[0]
    dev = images.device
    t(_OP, "partner", partner, dtypes=(torch.int64,), shape=(b,), shape_doc=f"(B,) = ({b},)", device=dev,
      device_of="images")
    t(_OP, "lam", lam, dtypes=(torch.float32,), shape=(b,), shape_doc=f"(B,) = ({b},)", device=dev,
      device_of="images")
    if _backend.should_validate(validate, dev, _OP):
        _backend.check_index_range(_OP, "partner", partner, 0, b, f"an index into the batch of {b}")
        if not bool(torch.isfinite(lam).all()):
            raise ValueError(f"{_OP}: lam has non-finite values; pass finite mixing weights.")
    resolved = _backend.resolve_backend(backend, dev, _OP)
    _backend.check_no_grad(_OP, resolved, images=images, lam=lam)
    if resolved == "torch":
        return pixel_mix_reference(images, partner, lam, inplace=inplace)

    out = torch.empty_like(images)
    if images.numel() == 0:
        return out
    chw = images[0].numel()
    n_blocks = -(-chw // _BLOCK)
    kernel = _backend.jit(_pixel_mix_kernel)
    kernel[(b * n_blocks,)](images, out, partner, lam, b, chw, n_blocks,
                            IS_UINT8=images.dtype == torch.uint8, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return out
