"""The segmenter interface every segmenter kind implements, with its input checks in one place."""

from __future__ import annotations

import torch

from onlineaug.models import preprocess


class Segmenter:
    """``segment(images, texts, indices, crops) -> (masks, found)``.

    Args of :meth:`segment`:
        images: uint8 (n, 3, H, W) on any device (the segmenter's device is :attr:`device`).
        texts: n prompts, one per image (what to find: a class name, a domain word such as ``"bird"``).
        indices: int64 (n,), each image's dataset index (dataset masks read them; models ignore them).
        crops: int64 (n, 4) ``(top, left, height, width)`` of each image within its dataset item (the item
            was cropped there, then resized to H x W), or None: each image is its whole item.

    Returns ``masks`` bool (n, H, W) on the images' device and ``found`` bool (n,): whether the object was found
    (an image with ``found`` False has an empty mask).
    """

    device: torch.device = torch.device("cpu")

    def segment(self, images: torch.Tensor, texts, indices: torch.Tensor,
                crops: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        images = preprocess.check_images(images)
        n = images.shape[0]
        texts = check_texts(texts, n)
        indices = _check_int_tensor("indices", indices, (n,))
        if crops is not None:
            crops = _check_int_tensor("crops", crops, (n, 4))
            if bool((crops[:, 2:] < 1).any()) or bool((crops[:, :2] < 0).any()):
                raise ValueError(f"crops must be (top, left, height, width) with top, left >= 0 and height, "
                                 f"width >= 1, got {crops.tolist()}")
        if n == 0:
            empty = torch.zeros((0, *images.shape[-2:]), dtype=torch.bool, device=images.device)
            return empty, torch.zeros(0, dtype=torch.bool, device=images.device)
        masks, found = self._segment(images, texts, indices.cpu(), None if crops is None else crops.cpu())
        return masks.to(images.device), found.to(images.device)

    def _segment(self, images, texts, indices, crops):  # pragma: no cover - the interface
        raise NotImplementedError


def check_texts(texts, n: int) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"texts must be a list of str (one prompt per image), got {texts!r:.80}")
    texts = list(texts)
    if len(texts) != n:
        raise ValueError(f"got {len(texts)} texts for {n} images; give one prompt per image")
    return texts


def _check_int_tensor(name: str, value, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or tuple(value.shape) != shape:
        what = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be an int64 tensor of shape {shape}, got {what}")
    return value


def check_options(kind: str, options, defaults: dict) -> dict:
    """``options`` over ``defaults``; unknown names are an error listing the valid ones."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"a {kind!r} segmenter has no options {unknown}; valid options: {sorted(defaults)}")
    return {**defaults, **options}
