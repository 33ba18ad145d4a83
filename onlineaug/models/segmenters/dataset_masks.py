"""Masks the dataset itself provides (source ``"dataset"``): exact segmentation, so a recipe's segmentation
path can be tested pixel for pixel (``onlineaug.datasets.SyntheticShapes`` has them).

A dataset provides masks in one of two ways, tried in this order:

1. a method ``dataset.foreground_mask(index)`` returning the item's (H, W) mask (``SyntheticShapes`` has it:
   no image is rendered to read it);
2. items that carry the mask: a tuple ``(image, label, mask, ...)`` or a dict with a ``"mask"`` key.

A mask is bool, or integer (non-zero = object), or float (> 0.5 = object), shaped (H, W) or (1, H, W).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from onlineaug.models.segmenters.base import Segmenter

EXPECTED = ("a dataset.foreground_mask(index) method returning an (H, W) mask, or items that carry the mask: "
            "(image, label, mask) tuples or dicts with a 'mask' key (e.g. SyntheticShapes(return_mask=True))")


def mask_reader(dataset):
    """A function ``index -> bool (H, W) CPU mask`` for ``dataset``, or a ValueError naming what is expected."""
    if dataset is None:
        raise ValueError(f"segmenter source 'dataset' needs the dataset, and none was given; it must provide "
                         f"masks: {EXPECTED}")
    method = getattr(dataset, "foreground_mask", None)
    if callable(method):
        return lambda index: _as_mask(method(index), index)
    try:
        length = len(dataset)
    except TypeError:
        length = None
    if length == 0:
        raise ValueError(f"segmenter source 'dataset': the dataset is empty, so it cannot show that it has masks "
                         f"({EXPECTED})")
    item = dataset[0]
    if _item_mask(item) is None:
        raise ValueError(f"segmenter source 'dataset' needs masks from the dataset, but "
                         f"{type(dataset).__name__} has no foreground_mask method and its item 0 is "
                         f"{_describe(item)}; expected {EXPECTED}")
    return lambda index: _as_mask(_item_mask(dataset[index]), index)


def _item_mask(item):
    if isinstance(item, Mapping):
        return item.get("mask")
    if isinstance(item, (tuple, list)) and len(item) >= 3 and _is_array(item[2]):
        return item[2]
    return None


def _is_array(value) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim in (2, 3)


def _describe(item) -> str:
    if isinstance(item, Mapping):
        return f"a dict with keys {sorted(map(str, item))}"
    if isinstance(item, (tuple, list)):
        return f"a {type(item).__name__} of {len(item)} ({', '.join(type(v).__name__ for v in item)})"
    return type(item).__name__


def _as_mask(value, index: int) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"dataset mask of item {index} must be a tensor or numpy array, got {type(value).__name__}")
    if value.ndim == 3 and value.shape[0] == 1:
        value = value[0]
    if value.ndim != 2:
        raise ValueError(f"dataset mask of item {index} must be (H, W) or (1, H, W), got {tuple(value.shape)}")
    if value.dtype == torch.bool:
        return value.cpu()
    if value.is_floating_point():
        return (value > 0.5).cpu()
    return (value != 0).cpu()


class DatasetMasks(Segmenter):
    """The dataset's own masks, cropped by ``crops`` and resized (nearest) to the images' size.

    ``found`` is whether the mask has any pixel. ``texts`` are ignored: the dataset knows its objects.
    """

    def __init__(self, dataset, device: torch.device | str = "cpu"):
        self.read = mask_reader(dataset)
        self.device = torch.device(device)
        self.calls = 0  # masks read so far (tests and recipes count segmentations with it)

    def __repr__(self) -> str:
        return "DatasetMasks()"

    def _segment(self, images, texts, indices, crops):
        height, width = images.shape[-2:]
        masks = []
        for row, index in enumerate(indices.tolist()):
            mask = self.read(index)
            self.calls += 1
            if crops is not None:
                top, left, h, w = crops[row].tolist()
                if top + h > mask.shape[0] or left + w > mask.shape[1]:
                    raise ValueError(f"crop (top={top}, left={left}, height={h}, width={w}) of item {index} "
                                     f"falls outside its {mask.shape[0]}x{mask.shape[1]} mask")
                mask = mask[top:top + h, left:left + w]
            masks.append(resize_mask(mask, (height, width)))
        masks = torch.stack(masks).to(images.device, non_blocking=True)
        return masks, masks.flatten(1).any(1)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a bool (h, w) mask to ``size`` (pixel centres aligned: ``nearest-exact``)."""
    if tuple(mask.shape) == tuple(size):
        return mask
    return F.interpolate(mask[None, None].to(torch.uint8), size=size, mode="nearest-exact")[0, 0].bool()
