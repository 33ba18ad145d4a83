"""Image preprocessing of the perception models, in torch on the model's device (no PIL round trip).

Each function reproduces one step of a transformers image processor on a batch of uint8 images that all share
one size: resize (to a shortest edge, a longest edge or an exact size), center crop, rescale to [0, 1],
normalise with the processor's mean and std, pad. The tests compare the result with the processors themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# ``resample`` values of transformers' image processors (PIL's numbering) -> torch interpolation modes.
RESAMPLE_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_images(images, what: str = "images") -> torch.Tensor:
    """``images`` must be a uint8 (n, 3, H, W) tensor; returns it."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what} must be a uint8 torch.Tensor (n, 3, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} must be uint8 (n, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    return images


def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """The size after resizing the shorter side to ``shortest``, keeping the aspect ratio (transformers'
    ``get_resize_output_image_size(default_to_square=False)``: the longer side is rounded down)."""
    short, long = min(height, width), max(height, width)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """The size after resizing the longer side to ``longest`` (SAM's ``ResizeLongestSide``)."""
    scale = longest / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize(images: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Resize float (n, C, H, W) images in 0..255 to ``size``; antialiased when shrinking with bilinear or
    bicubic (as PIL), clamped to 0..255 (as a resize of uint8 images rounds and clips)."""
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    antialias = mode in ("bilinear", "bicubic")
    out = F.interpolate(images, size=size, mode=mode, antialias=antialias,
                        align_corners=False if antialias else None)
    return out.clamp_(0, 255)


def center_crop(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The centred ``size`` window (torchvision's rounding); images must be at least that large."""
    height, width = images.shape[-2:]
    crop_h, crop_w = int(size[0]), int(size[1])
    if crop_h > height or crop_w > width:
        raise ValueError(f"cannot center-crop {crop_h}x{crop_w} from {height}x{width} images")
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return images[..., top:top + crop_h, left:left + crop_w]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images / 255 - mean) / std`` per channel, for float images in 0..255."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images / 255.0 - mean_t) / std_t


def pad_bottom_right(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Zero-pad (n, C, h, w) images at the bottom and right to ``size``."""
    height, width = images.shape[-2:]
    return F.pad(images, (0, int(size[1]) - width, 0, int(size[0]) - height))


def resample_mode(config: dict | None, default: str) -> str:
    """The torch interpolation mode of a processor config's ``resample`` (PIL numbering)."""
    value = (config or {}).get("resample")
    return RESAMPLE_MODES.get(value, default) if value is not None else default
