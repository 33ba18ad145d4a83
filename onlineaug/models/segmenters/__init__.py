"""Segmenters: find the object in each image and return its mask (the first step of De-DA).

Kinds (``ModelRole.kind``), each returning a :class:`~onlineaug.models.segmenters.base.Segmenter`:

- ``"dataset-masks"`` (source ``"dataset"``): the masks the dataset provides (:mod:`.dataset_masks`).
"""

from __future__ import annotations

import torch

from onlineaug.models.segmenters.base import Segmenter, check_options
from onlineaug.models.segmenters.dataset_masks import DatasetMasks, mask_reader
from onlineaug.models.spec import LoadPolicy, ModelRole, ModelSpec

__all__ = ["DatasetMasks", "Segmenter", "describe_segmenter", "ensure_segmenter_available", "load_segmenter"]


def _check_dataset_source(role: ModelRole, spec: ModelSpec, role_name: str) -> None:
    if spec.source != "dataset":
        raise ValueError(f"role {role_name!r} is a 'dataset-masks' segmenter: it reads the dataset's own masks, "
                         f"so its source must be 'dataset', got {spec.source!r}")
    check_options("dataset-masks", role.options, {})


def load_segmenter(role: ModelRole, spec: ModelSpec, *, device: torch.device | str, policy: LoadPolicy = LoadPolicy(),
                   seed: int = 0, dataset=None, role_name: str = "segmenter") -> Segmenter:
    """The segmenter of ``role.kind`` for ``spec`` on ``device``."""
    if role.kind == "dataset-masks":
        _check_dataset_source(role, spec, role_name)
        return DatasetMasks(dataset, device=device)
    raise NotImplementedError(f"segmenter kind {role.kind!r} is not available yet")


def ensure_segmenter_available(role_name: str, role: ModelRole, spec: ModelSpec, dataset=None) -> None:
    """Raise now what :func:`load_segmenter` would raise for missing weights, bad options or a dataset
    without masks."""
    if role.kind == "dataset-masks":
        _check_dataset_source(role, spec, role_name)
        mask_reader(dataset)
        return
    raise NotImplementedError(f"segmenter kind {role.kind!r} (role {role_name!r}) is not available yet")


def describe_segmenter(role: ModelRole, spec: ModelSpec) -> str:
    """One line for logs (never loads weights)."""
    if role.kind == "dataset-masks":
        return "the dataset's own masks (dataset-masks)"
    return f"{role.kind} segmenter from {spec.source}"
