"""Filling holes in images: mask dilation and the push-pull pyramid fill, in torch on any device.

De-DA (Chen et al., "Decoupled Data Augmentation for Improving Image Classification", arXiv 2411.02592, §3)
removes the class-dependent part from an image and fills "the missing areas in the segmented CIPs" by "alpha
pyramid image blending". The paper gives neither the filter nor the dilation; this module implements the
classic pull-push fill of scattered data (Gortler, Grzeszczuk, Szeliski, Cohen, "The Lumigraph", SIGGRAPH
1996, §3.4; Grossman and Dally, "Point Sample Rendering", 1998), which is exactly an alpha-weighted image
pyramid collapsed coarse to fine.

With ``c_0`` the image, ``w_0`` the weight of each pixel (1 known, 0 hole; soft weights allowed):

* **pull** (fine to coarse), over each 2x2 block ``B`` of level ``l`` (odd sizes padded with weight 0)::

      W = sum_B w_l,    w_{l+1} = min(1, W),    c_{l+1} = sum_B w_l c_l / W   (0 where W = 0)

  down to a single pixel, so that every level-``l+1`` pixel covering at least one known pixel is fully known.
* **push** (coarse to fine), with ``up(.)`` the bilinear 2x upsampling (half-pixel centres)::

      c_l <- w_l c_l + (1 - w_l) up(c_{l+1})

Known pixels (``w = 1``) keep their value exactly; a hole takes the average of the nearest known pixels at the
first scale that sees any, blended smoothly across scales by the bilinear push. A hole in a constant region is
filled with that constant; a linear ramp is continued approximately (the coarse averages sit at the centroid
of their known pixels, not at the cell centre). An image with no known pixel at all is filled with 0.

:func:`dilate` grows a mask by a Euclidean radius (a disc structuring element), so that the fill does not
start from the object's antialiased or mis-segmented rim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["default_dilation", "dilate", "fill_holes", "push_pull_fill"]


def default_dilation(size: int) -> float:
    """The dilation radius in pixels at image side ``size``: ``max(2, 0.02 * size)`` (the paper gives none)."""
    return max(2.0, 0.02 * size)


def dilate(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """Pixels within Euclidean distance ``radius`` (pixel centre to pixel centre) of a True pixel of ``mask``.

    ``mask``: bool (n, H, W). Returns bool (n, H, W); ``radius = 0`` returns a copy. One convolution with the
    disc ``dy^2 + dx^2 <= radius^2`` (exact on integer offsets: the disc is counted, not thresholded).
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 3:
        raise ValueError(f"dilate: mask must be a bool tensor (n, H, W), got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius >= 0):
        raise ValueError(f"dilate: radius must be a finite number >= 0 pixels, got {radius!r}")
    reach = int(math.floor(radius))
    if reach == 0:
        return mask.clone()
    offsets = torch.arange(-reach, reach + 1, device=mask.device, dtype=torch.float32)
    disc = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius * radius).to(torch.float32)
    hits = F.conv2d(mask[:, None].to(torch.float32), disc[None, None], padding=reach)
    return hits[:, 0] > 0.5  # counts of covered disc cells: integers, so > 0.5 is exact


def _pull(colour: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pull step: 2x2 blocks (odd sizes padded with weight 0) -> ``(c_{l+1}, w_{l+1})``."""
    h, w = weight.shape[-2:]
    pad = (0, w % 2, 0, h % 2)
    weighted = F.pad(colour * weight, pad)
    weight = F.pad(weight, pad)
    total = F.avg_pool2d(weight, 2) * 4  # sum over each 2x2 block
    sums = F.avg_pool2d(weighted, 2) * 4
    coarse = torch.where(total > 0, sums / total.clamp(min=1e-12), torch.zeros_like(sums))
    return coarse, total.clamp(max=1.0)


def push_pull_fill(image: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Fill where ``weight < 1`` by the push-pull pyramid (see the module docstring for the equations).

    Args:
        image: float (n, C, H, W), any range.
        weight: float (n, 1, H, W) in [0, 1]: 1 where the pixel is known, 0 in the hole (soft weights blend).

    Returns:
        float (n, C, H, W): ``image`` where ``weight == 1`` (bit for bit), filled elsewhere.
    """
    if not isinstance(image, torch.Tensor) or not image.is_floating_point() or image.dim() != 4:
        raise ValueError(f"push_pull_fill: image must be a float tensor (n, C, H, W), got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {tuple(getattr(image, 'shape', ()))}")
    n, _, h, w = image.shape
    if not isinstance(weight, torch.Tensor) or weight.shape != (n, 1, h, w) or not weight.is_floating_point():
        raise ValueError(f"push_pull_fill: weight must be a float tensor of shape ({n}, 1, {h}, {w}), got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    weight = weight.to(image.dtype).clamp(0.0, 1.0)
    colours, weights = [image], [weight]
    while max(colours[-1].shape[-2:]) > 1:
        colour, weight = _pull(colours[-1], weights[-1])
        colours.append(colour)
        weights.append(weight)
    filled = colours[-1]
    for colour, weight in zip(reversed(colours[:-1]), reversed(weights[:-1])):
        h, w = colour.shape[-2:]
        up = F.interpolate(filled, scale_factor=2, mode="bilinear", align_corners=False)[..., :h, :w]
        filled = weight * colour + (1 - weight) * up
    return filled


def fill_holes(image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, H, W) images with the pixels of ``hole`` (bool (n, H, W)) filled by :func:`push_pull_fill`.

    Pixels outside the hole are returned unchanged; filled values are rounded to the nearest integer.
    """
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 4:
        raise ValueError(f"fill_holes: image must be uint8 (n, C, H, W), got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {tuple(getattr(image, 'shape', ()))}")
    n, _, h, w = image.shape
    if not isinstance(hole, torch.Tensor) or hole.dtype != torch.bool or hole.shape != (n, h, w):
        raise ValueError(f"fill_holes: hole must be a bool tensor of shape ({n}, {h}, {w}), got "
                         f"{getattr(hole, 'dtype', type(hole).__name__)} {tuple(getattr(hole, 'shape', ()))}")
    known = (~hole)[:, None].to(torch.float32)
    filled = push_pull_fill(image.to(torch.float32), known).round_().clamp_(0, 255).to(torch.uint8)
    return torch.where(hole[:, None], filled, image)
