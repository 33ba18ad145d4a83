"""Soft (mixed) label targets for the batch-time mixing ops.

Mixing ops produce ``k`` labels per sample with weights (CutMix: ``kept_fraction`` for the own class
and ``1 - kept_fraction`` for the partner's, Yun et al. 2019; Mixup: ``lam`` and ``1 - lam``, Zhang et
al. 2018; De-DA: visible foreground fractions; DiffuseMix keeps the original label). The target is::

    t = sum_j w_j * onehot(labels_j)               (B, K) float32
    t = (1 - smoothing) * t + smoothing / K        with label smoothing

There is no Triton kernel: one ``scatter_add_`` into a zero (B, K) tensor is already a single small
launch (plus the zero fill), so ``backend`` accepts only "auto" and "torch".
"""
from __future__ import annotations

from typing import Optional

import torch

from onlineaug.kernels import _backend

__all__ = ["soft_labels", "soft_labels_reference"]

_OP = "soft_labels"


def soft_labels_reference(labels: torch.Tensor, weights: torch.Tensor, num_classes: int, *,
                          smoothing: float = 0.0) -> torch.Tensor:
    """Plain-torch twin: a sum of weighted one-hot rows (materialises (B, k, K); no validation)."""
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(torch.float32)
    target = (weights.to(torch.float32)[:, :, None] * onehot).sum(dim=1)
    if smoothing:
        target = (1 - smoothing) * target + smoothing / num_classes
    return target


def soft_labels(
    labels: torch.Tensor,
    weights: torch.Tensor,
    num_classes: int,
    *,
    smoothing: float = 0.0,
    backend: str = "auto",
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """Weighted (and optionally smoothed) one-hot targets, float32 (B, num_classes).

    Args:
        labels: int64 (B, k) class indices in [0, num_classes).
        weights: floating (B, k) weights of those labels (rows usually sum to 1), same device.
        num_classes: K >= 1.
        smoothing: label smoothing in [0, 1].
        backend: "auto" or "torch" (this op is plain torch; "triton" raises).
        validate: check the label range; None = only for CPU tensors (on CUDA an out-of-range label
            then trips scatter_add_'s device-side assert), True = always (synchronises on CUDA),
            False = never.
    """
    if backend not in ("auto", "torch"):
        if backend == "triton":
            raise ValueError(f"{_OP}: there is no Triton kernel for soft_labels (it is one scatter_add_); "
                             "pass backend='auto' or 'torch'.")
        _backend.resolve_backend(backend, torch.device("cpu"), _OP)  # raises the unknown-backend error
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{_OP}: num_classes must be a positive int, got {num_classes!r}.")
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"{_OP}: smoothing must be a float in [0, 1], got {smoothing!r}.")
    _backend.check_tensor(_OP, "labels", labels, dtypes=(torch.int64,), shape=(None, None), shape_doc="(B, k)",
                          contiguous=False)
    b, k = labels.shape
    _backend.check_tensor(_OP, "weights", weights, dtypes=(torch.float32, torch.float16, torch.bfloat16,
                                                           torch.float64),
                          shape=(b, k), shape_doc=f"(B, k) = ({b}, {k}) like labels", device=labels.device,
                          device_of="labels", contiguous=False)
    if _backend.should_validate(validate, labels.device, _OP) and labels.numel():
        bad = (labels < 0) | (labels >= num_classes)
        if bool(bad.any()):
            value = int(labels[bad][0])
            position = ", ".join(str(int(i)) for i in bad.nonzero()[0])
            raise ValueError(f"{_OP}: label {value} (labels[{position}]) is out of range for "
                             f"num_classes={num_classes}; labels must be in [0, {num_classes}).")

    target = torch.zeros((b, num_classes), dtype=torch.float32, device=labels.device)
    target.scatter_add_(1, labels, weights.to(torch.float32))
    if smoothing:
        target = target.mul_(1.0 - smoothing).add_(smoothing / num_classes)
    return target
