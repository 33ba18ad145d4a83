"""Turning whatever a user's dataset returns into ``(uint8 image (3, S, S), label)``.

This is the one place where dataset items are validated; DataLoader workers (real samples) and producers
(source samples for the generator) both go through it, so both see the same image and the same errors.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as F

try:  # Pillow comes with torchvision, but the library does not require it for tensor datasets
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def image_to_uint8(image, index: int) -> torch.Tensor:
    """A PIL image, a (C,H,W) tensor (uint8, or float in [0, 1]) or an (H,W,C) uint8 array -> uint8 (3,H,W)."""
    if Image is not None and isinstance(image, Image.Image):
        try:
            image = image.convert("RGB")
            array = np.asarray(image, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"dataset item {index}: the image could not be decoded ({error}); is the file "
                             f"corrupt or truncated?") from error
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] in (1, 3, 4) and image.dtype == np.uint8:
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        elif image.ndim == 2 and image.dtype == np.uint8:
            image = torch.from_numpy(np.ascontiguousarray(image))[None]
        else:
            raise TypeError(f"dataset item {index}: expected an image, got {_describe(image)}; NumPy images must "
                            f"be uint8 (H, W), (H, W, 3) or (H, W, 4)")
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"dataset item {index}: expected an image (PIL.Image, a (3, H, W) tensor or an (H, W, 3) "
                        f"uint8 array) as the first element, got {_describe(image)}")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4) or min(image.shape[1:]) < 1:
        raise TypeError(f"dataset item {index}: expected an image tensor of shape (3, H, W), got {_describe(image)}")
    if image.dtype == torch.uint8:
        pass
    elif image.is_floating_point():
        low, high = float(image.min()), float(image.max())
        if low < -1e-3 or high > 1 + 1e-3 or not np.isfinite([low, high]).all():
            raise ValueError(f"dataset item {index}: a float image must hold values in [0, 1], got [{low:.3g}, "
                             f"{high:.3g}]; return uint8 images, or undo your normalisation (onlineaug "
                             f"normalises with mean/std on the trainer's device)")
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    else:
        raise TypeError(f"dataset item {index}: image tensors must be uint8 or float in [0, 1], got {image.dtype}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    elif image.shape[0] == 4:
        image = image[:3]
    return image.contiguous()


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 (3,H,W) or (B,3,H,W) to ``size`` x ``size`` (bilinear, antialiased); no-op at that size."""
    if images.shape[-2:] == (size, size):
        return images
    batched = images if images.ndim == 4 else images[None]
    out = F.interpolate(batched.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out if images.ndim == 4 else out[0]


def label_to_int(label, index: int, num_classes: int) -> int:
    if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
        label = label.item()
    if isinstance(label, np.generic) and np.issubdtype(label.dtype, np.integer):
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        raise TypeError(f"dataset item {index}: expected an integer class label as the second element, got "
                        f"{_describe(label)} ({label!r:.60})")
    label = int(label)
    if not 0 <= label < num_classes:
        raise ValueError(f"dataset item {index}: label {label} is out of range for num_classes={num_classes}; "
                         f"pass the dataset's real number of classes")
    return label


def load_image(dataset, index: int, num_classes: int) -> tuple[torch.Tensor, int]:
    """``dataset[index]`` as ``(uint8 (3, H, W), label)`` at its own size, with clear errors for bad items."""
    item = dataset[index]
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(f"dataset item {index}: expected an (image, label) pair, got {_describe(item)}")
    return image_to_uint8(item[0], index), label_to_int(item[1], index, num_classes)


def load_item(dataset, index: int, size: int, num_classes: int) -> tuple[torch.Tensor, int]:
    """``dataset[index]`` as ``(uint8 (3, size, size), label)``, with clear errors for bad items."""
    image, label = load_image(dataset, index, num_classes)
    return resize_uint8(image, size), label


class UInt8ImageDataset(torch.utils.data.Dataset):
    """Wraps a user's dataset for the trainer's DataLoader: items become ``(uint8 image, label, index)``."""

    def __init__(self, dataset, size: int, num_classes: int):
        self.dataset, self.size, self.num_classes = dataset, size, num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = load_item(self.dataset, index, self.size, self.num_classes)
        return image, label, index
