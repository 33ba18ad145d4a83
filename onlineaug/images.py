"""Turning whatever a user's dataset returns into uint8 ``(3, H, W)`` images and labels, and cutting the crop.

This is the one place where dataset items are read; DataLoader workers (real samples) and producers (source
samples for the generator) both go through it, so both see the same image, the same crop geometry and the
same errors.

Items
    ``(image, label)`` tuples or lists, or dicts (Hugging Face ``datasets`` rows) read with
    ``ItemFormat.image_key`` / ``label_key``.

Images, by torchvision's layout conventions
    * tensors are ``(C, H, W)`` (or ``(H, W)``), as ``torchvision.transforms.v2.functional.to_image`` returns;
    * NumPy arrays and PIL images are ``(H, W, C)`` (or ``(H, W)``), as ``ToTensor``/``ToImage`` expect.

    A shape whose first and last dimensions are both channel counts (1, 3 or 4), such as ``(3, 32, 4)``,
    cannot be told apart and raises; so does a tensor in the array layout or an array in the tensor layout.
    Values: uint8 as is; uint16 scaled by 255 / 65535; float in [0, 1] scaled by 255 (other float ranges
    raise). PIL modes: the 8-bit ones through ``convert("RGB")``; ``I;16*`` (16-bit PNG/TIFF) by 255 / 65535;
    ``I`` (32-bit) by 255 / 65535 when it holds 16-bit data (what older Pillow gives 16-bit PNGs), else an
    error naming the mode; ``F`` (32-bit float) in [0, 1] by 255, else an error naming the mode and its range.

Geometry (``ItemFormat.resize``): which box of the item becomes the ``S x S`` training image
    * ``"squash"``: the whole image, resized to ``S x S`` (the aspect ratio is not kept);
    * ``"center_crop"``: torchvision's ``Resize(S)`` then ``CenterCrop(S)``, i.e. the centred square of side
      ``min(H, W)`` (torchvision's rounding) resized to ``S x S``;
    * ``"random_resized_crop"``: torchvision's ``RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4, 4/3))``,
      the same box-drawing algorithm (10 tries, then the central fallback) with a seeded NumPy generator.

    The box is cut first and resized once (bilinear, antialiased), so that a producer resizes the same box
    to the generation size and to the training size (:func:`crop_box`, :func:`crop_resize`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from onlineaug.seeding import numpy_generator

try:  # Pillow comes with torchvision, but the library does not require it for tensor datasets
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None

CHANNEL_COUNTS = (1, 3, 4)
RESIZE_MODES = ("squash", "center_crop", "random_resized_crop")
# torchvision's ImageNet training reference and timm's training transforms both crop with
# RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)): the default for training (see OnlineGenAugLoader).
DEFAULT_RESIZE = "random_resized_crop"
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
NO_BOX = (0, 0, 0, 0)  # the crop of a job without a source image


@dataclasses.dataclass(frozen=True)
class ItemFormat:
    """How to read a dataset's items: the keys of dict rows, and the training crop's geometry."""

    image_key: str = "image"
    label_key: str = "label"
    resize: str = DEFAULT_RESIZE

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize={self.resize!r} is not one of {list(RESIZE_MODES)}")

    def deterministic(self) -> "ItemFormat":
        """The same keys with a crop that needs no random draw (``center_crop`` for ``random_resized_crop``):
        for reference images (a recipe's preparation, previews), as torchvision evaluates with a center crop."""
        if self.resize != "random_resized_crop":
            return self
        return dataclasses.replace(self, resize="center_crop")


def _describe(value) -> str:
    if Image is not None and isinstance(value, Image.Image):
        return f"a PIL image of mode {value.mode!r} and size {value.size}"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


# ---------------------------------------------------------------------------------------------- values
def _scale_to_uint8(values: torch.Tensor, index: int, what: str) -> torch.Tensor:
    """uint8 as is, uint16 (held in int32) scaled by 255 / 65535 rounding half up, float in [0, 1] by 255."""
    if values.dtype == torch.uint8:
        return values
    if values.dtype == torch.int32:  # 16-bit data, already range-checked by the caller
        return ((values * 255 + 32767) // 65535).to(torch.uint8)
    if values.is_floating_point():
        values = values.float()
        low, high = float(values.min()), float(values.max())
        if low < -1e-3 or high > 1 + 1e-3 or not np.isfinite([low, high]).all():
            raise ValueError(f"dataset item {index}: {what} must hold values in [0, 1], got [{low:.3g}, "
                             f"{high:.3g}]; return uint8 images, or undo your normalisation (onlineaug "
                             f"normalises with mean/std on the trainer's device)")
        return (values.clamp(0, 1) * 255).round().to(torch.uint8)
    raise TypeError(f"dataset item {index}: {what} must be uint8, uint16 or float in [0, 1], got {values.dtype}")


def _sixteen_bit(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int32))


# ---------------------------------------------------------------------------------------------- layout
def _ambiguous(index: int, value, kind: str) -> ValueError:
    if kind == "tensor":
        guess = ("a (C, H, W) image 1, 3 or 4 pixels wide is almost surely an (H, W, C) one: if it is, return "
                 "image.permute(2, 0, 1)")
    else:
        guess = ("an (H, W, C) image 1, 3 or 4 pixels high is almost surely a (C, H, W) one: if it is, return "
                 "array.transpose(1, 2, 0)")
    return ValueError(
        f"dataset item {index}: {_describe(value)} could be (C, H, W) or (H, W, C): its first and last "
        f"dimensions are both channel counts {CHANNEL_COUNTS}, so the layout cannot be told apart. onlineaug "
        f"follows torchvision (tensors are (C, H, W), NumPy arrays and PIL images (H, W, C)), but {guess}; "
        f"an image that really is that narrow must come as a PIL image")


def _chw_tensor(image: torch.Tensor, index: int) -> torch.Tensor:
    if image.ndim == 2 and min(image.shape) >= 1:  # (H, W): one layout only
        return image[None]
    if image.ndim != 3 or min(image.shape) < 1:
        raise TypeError(f"dataset item {index}: expected an image tensor of shape (C, H, W) with C in "
                        f"{CHANNEL_COUNTS}, got {_describe(image)}")
    first, last = image.shape[0] in CHANNEL_COUNTS, image.shape[-1] in CHANNEL_COUNTS
    if first and last:
        raise _ambiguous(index, image, "tensor")
    if last:
        raise ValueError(f"dataset item {index}: {_describe(image)} is laid out (H, W, C), but image tensors are "
                         f"(C, H, W) as in torchvision; return image.permute(2, 0, 1) (or the NumPy array)")
    if not first:
        raise TypeError(f"dataset item {index}: expected an image tensor of shape (C, H, W) with C in "
                        f"{CHANNEL_COUNTS}, got {_describe(image)}")
    return image


def _chw_from_array(given: np.ndarray, index: int) -> torch.Tensor:
    array = given[:, :, None] if given.ndim == 2 else given  # (H, W): one layout only
    if array.ndim != 3 or min(array.shape) < 1:
        raise TypeError(f"dataset item {index}: expected an image, got {_describe(given)}; NumPy images must be "
                        f"(H, W) or (H, W, C) with C in {CHANNEL_COUNTS}")
    first = given.ndim == 3 and array.shape[0] in CHANNEL_COUNTS
    last = array.shape[-1] in CHANNEL_COUNTS
    if first and last:
        raise _ambiguous(index, array, "array")
    if first:
        raise ValueError(f"dataset item {index}: {_describe(given)} is laid out (C, H, W), but NumPy images are "
                         f"(H, W, C) as for PIL and torchvision's ToTensor; return array.transpose(1, 2, 0) "
                         f"(or torch.from_numpy(array), a (C, H, W) tensor)")
    if not last:
        raise TypeError(f"dataset item {index}: expected an image, got {_describe(given)}; NumPy images must be "
                        f"(H, W) or (H, W, C) with C in {CHANNEL_COUNTS}")
    if array.dtype == np.uint16:
        values = _sixteen_bit(array)
    elif array.dtype == np.uint8 or np.issubdtype(array.dtype, np.floating):
        values = torch.from_numpy(np.ascontiguousarray(array))
    else:
        raise TypeError(f"dataset item {index}: NumPy images must be uint8, uint16 or float in [0, 1], got "
                        f"{_describe(given)}")
    return values.permute(2, 0, 1)


# ------------------------------------------------------------------------------------------------- PIL
def _pil_to_chw(image, index: int) -> torch.Tensor:
    """uint8 (3, H, W) for the 8-bit modes, int32 (1, H, W) 16-bit data for I;16* and I, uint8 (1, H, W) for F."""
    mode = image.mode
    try:
        if mode == "I" or mode.startswith("I;16"):
            values = np.asarray(image).astype(np.int64)
        elif mode == "F":
            values = np.array(image, dtype=np.float32)
        else:
            return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
    except (OSError, SyntaxError) as error:
        raise ValueError(f"dataset item {index}: the image could not be decoded ({error}); is the file "
                         f"corrupt or truncated?") from error
    except ValueError as error:
        raise ValueError(f"dataset item {index}: a PIL image of mode {mode!r} could not be converted to RGB "
                         f"({error}); convert it to 'RGB' or 'L' in the dataset") from error
    if mode == "F":
        return _scale_to_uint8(torch.from_numpy(values)[None], index, "a PIL image of mode 'F' (32-bit float)")
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise ValueError(f"dataset item {index}: a PIL image of mode {mode!r} (32-bit integers) holds values in "
                         f"[{low}, {high}], outside the 16-bit range it is read in (scaled by 255 / 65535); "
                         f"convert it to 'L' (8-bit) or 'I;16' (16-bit) in the dataset")
    return _sixteen_bit(values)[None]


def image_to_uint8(image, index: int) -> torch.Tensor:
    """A PIL image, a ``(C, H, W)`` tensor or an ``(H, W, C)`` array -> uint8 ``(3, H, W)`` (see the module doc)."""
    if Image is not None and isinstance(image, Image.Image):
        values, what = _pil_to_chw(image, index), f"a PIL image of mode {image.mode!r}"
    elif isinstance(image, np.ndarray):
        values, what = _chw_from_array(image, index), "a float image"
    elif isinstance(image, torch.Tensor):
        values, what = _chw_tensor(image, index), "a float image"
        if values.dtype == torch.uint16:
            values = values.to(torch.int32)
        elif values.dtype != torch.uint8 and not values.is_floating_point():
            raise TypeError(f"dataset item {index}: image tensors must be uint8, uint16 or float in [0, 1], got "
                            f"{values.dtype}")
    else:
        raise TypeError(f"dataset item {index}: expected an image (PIL.Image, a (C, H, W) tensor or an (H, W, C) "
                        f"array), got {_describe(image)}")
    image = _scale_to_uint8(values, index, what)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    elif image.shape[0] == 4:
        image = image[:3]
    return image.contiguous()


# ---------------------------------------------------------------------------------------------- labels
def label_to_int(label, index: int, num_classes: int) -> int:
    if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
        label = label.item()
    if isinstance(label, np.generic) and np.issubdtype(label.dtype, np.integer):
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        raise TypeError(f"dataset item {index}: expected an integer class label in the item, got "
                        f"{_describe(label)} ({label!r:.60})")
    label = int(label)
    if not 0 <= label < num_classes:
        raise ValueError(f"dataset item {index}: label {label} is out of range for num_classes={num_classes}; "
                         f"pass the dataset's real number of classes")
    return label


# ----------------------------------------------------------------------------------------------- items
def _image_and_label(item, index: int, fmt: ItemFormat):
    if isinstance(item, Mapping):
        missing = [key for key in (fmt.image_key, fmt.label_key) if key not in item]
        if missing:
            raise ValueError(f"dataset item {index} is a dict without the key(s) {missing} (its keys: "
                             f"{sorted(map(str, item))}); pass image_key= and label_key= to name its image and "
                             f"label columns")
        return item[fmt.image_key], item[fmt.label_key]
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(f"dataset item {index}: expected an (image, label) pair or a dict with keys "
                        f"{fmt.image_key!r} and {fmt.label_key!r}, got {_describe(item)}")
    return item[0], item[1]


def load_image(dataset, index: int, num_classes: int, fmt: ItemFormat = ItemFormat()) -> tuple[torch.Tensor, int]:
    """``dataset[index]`` as ``(uint8 (3, H, W), label)`` at its own size, with clear errors for bad items."""
    image, label = _image_and_label(dataset[index], index, fmt)
    return image_to_uint8(image, index), label_to_int(label, index, num_classes)


def load_label(dataset, index: int, num_classes: int, fmt: ItemFormat = ItemFormat()) -> int:
    """The label of ``dataset[index]`` (the image is not decoded)."""
    return label_to_int(_image_and_label(dataset[index], index, fmt)[1], index, num_classes)


# -------------------------------------------------------------------------------------------- geometry
def random_resized_crop_box(height: int, width: int, rng: np.random.Generator, scale=RRC_SCALE,
                            ratio=RRC_RATIO) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` with ``rng``: ``(top, left, height, width)``.

    Ten tries at a box of area ``U(scale) x H x W`` and aspect ratio ``exp(U(log ratio))`` that fits, placed
    uniformly; else the largest central box whose aspect ratio is clamped into ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_box(height: int, width: int, resize: str, rng: np.random.Generator | None = None
             ) -> tuple[int, int, int, int]:
    """The ``(top, left, height, width)`` box of an ``height x width`` image that ``resize`` keeps.

    ``rng`` is needed (and only used) by ``"random_resized_crop"``.
    """
    if resize == "squash":
        return 0, 0, height, width
    if resize == "center_crop":  # torchvision's CenterCrop(min(H, W)) rounding
        side = min(height, width)
        return int(round((height - side) / 2.0)), int(round((width - side) / 2.0)), side, side
    if resize == "random_resized_crop":
        if rng is None:
            raise ValueError("resize='random_resized_crop' needs a seeded generator (rng=)")
        return random_resized_crop_box(height, width, rng)
    raise ValueError(f"resize={resize!r} is not one of {list(RESIZE_MODES)}")


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 (3,H,W) or (B,3,H,W) to ``size`` x ``size`` (bilinear, antialiased); no-op at that size."""
    if images.shape[-2:] == (size, size):
        return images
    batched = images if images.ndim == 4 else images[None]
    out = F.interpolate(batched.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out if images.ndim == 4 else out[0]


def crop_resize(image: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """The ``box`` of a uint8 ``(3, H, W)`` image, resized to ``size x size``."""
    top, left, height, width = box
    return resize_uint8(image[:, top:top + height, left:left + width], size).contiguous()


def item_rng(seed: int, rank: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of a real sample's random crop: one stream per (seed, rank, epoch, dataset index)."""
    return numpy_generator(seed, f"crop/{int(index)}", rank, epoch)


def load_item(dataset, index: int, size: int, num_classes: int, fmt: ItemFormat = ItemFormat(), *,
              rng: np.random.Generator | None = None) -> tuple[torch.Tensor, int]:
    """``dataset[index]`` as ``(uint8 (3, size, size), label)``: the ``fmt.resize`` box, resized.

    ``rng``: the generator of the random crop (needed by ``"random_resized_crop"``; see :func:`item_rng`).
    """
    image, label = load_image(dataset, index, num_classes, fmt)
    box = crop_box(image.shape[-2], image.shape[-1], fmt.resize, rng)
    return crop_resize(image, box, size), label


class EpochTaggedSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` for each index of ``sampler``: the epoch travels with the index to the worker.

    DataLoader workers (persistent ones too) then seed each sample's random crop by its epoch without any
    state shared with the training process. Set ``epoch`` before each pass.
    """

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, int(index)) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class UInt8ImageDataset(torch.utils.data.Dataset):
    """Wraps a user's dataset for the trainer's DataLoader: items become ``(uint8 image, label, index)``.

    Keys are dataset indices, or ``(epoch, index)`` pairs from :class:`EpochTaggedSampler` (an int key uses
    epoch 0). Random crops are drawn from :func:`item_rng` ``(seed, rank, epoch, index)``: reproducible, and
    independent of which worker loads the sample.
    """

    def __init__(self, dataset, size: int, num_classes: int, fmt: ItemFormat = ItemFormat(), *, seed: int = 0,
                 rank: int = 0):
        self.dataset, self.size, self.num_classes, self.fmt = dataset, size, num_classes, fmt
        self.seed, self.rank = seed, rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = item_rng(self.seed, self.rank, epoch, index) if self.fmt.resize == "random_resized_crop" else None
        image, label = load_item(self.dataset, index, self.size, self.num_classes, self.fmt, rng=rng)
        return image, label, index
