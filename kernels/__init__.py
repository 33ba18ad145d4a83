"""Batch-time mixing ops for onlineaug: Triton kernels, each with a plain-torch reference twin.

Every op takes ``backend="auto" | "triton" | "torch"`` ("auto": Triton for CUDA tensors, torch
elsewhere; "triton" on CPU needs ``TRITON_INTERPRET=1``) and ``validate`` for value-range checks
(see :mod:`kernels._backend`). Importing this package does not import Triton.

* :func:`concat_blend_normalize`: DiffuseMix hybrid + fractal blend + normalize.
* :func:`box_mix` / :func:`sample_boxes`: CutMix and DiffCoRe-Mix patch-wise mixing.
* :func:`pixel_mix`: Mixup and DiffCoRe-Mix pixel-wise mixing.
* :func:`composite`: De-DA cut-and-paste of RGBA foregrounds (bank prepared with
  :func:`kernels.kornia_ops.prepare_foregrounds`).
* :func:`soft_labels`: weighted, optionally smoothed one-hot targets.
"""
from onlineaug.kernels.box_mix import box_mix, box_mix_reference, sample_boxes
from onlineaug.kernels.composite import composite, composite_reference
from onlineaug.kernels.concat_blend import (
    SPLIT_CODES,
    SPLIT_LEFT_RIGHT,
    SPLIT_NONE,
    SPLIT_TOP_BOTTOM,
    concat_blend_normalize,
    concat_blend_normalize_reference,
    smooth_mask_reference,
)
from onlineaug.kernels.kornia_ops import prepare_foregrounds  # imports kornia only when called
from onlineaug.kernels.pixel_mix import pixel_mix, pixel_mix_reference
from onlineaug.kernels.soft_labels import soft_labels, soft_labels_reference

__all__ = [
    "SPLIT_CODES",
    "SPLIT_LEFT_RIGHT",
    "SPLIT_NONE",
    "SPLIT_TOP_BOTTOM",
    "box_mix",
    "box_mix_reference",
    "composite",
    "composite_reference",
    "concat_blend_normalize",
    "concat_blend_normalize_reference",
    "pixel_mix",
    "pixel_mix_reference",
    "prepare_foregrounds",
    "sample_boxes",
    "smooth_mask_reference",
    "soft_labels",
    "soft_labels_reference",
]
