"""Fractal image banks for the fractal-blending step of DiffuseMix and GenMix.

DiffuseMix (Islam et al., "DiffuseMix: Label-Preserving Data Augmentation with Diffusion Models",
CVPR 2024) and GenMix blend a random fractal into every augmented image (``lambda = 0.2``), taking
the fractals from the PixMix set (Hendrycks et al., "PixMix: Dreamlike Pictures Comprehensively
Improve Safety Measures", CVPR 2022). A :class:`FractalBank` holds such a set as one uint8 tensor on
the trainer's device, either

* loaded from a folder of images (:meth:`FractalBank.from_folder`, e.g. the PixMix or IPMix fractal
  sets), or
* generated procedurally (:meth:`FractalBank.procedural`) from random iterated function systems the
  way FractalDB does (Kataoka et al., "Pre-training without Natural Images", ACCV 2020): 2 to 4 random
  affine maps, each resampled until it is a contraction, chosen with probability proportional to
  ``|det|``; the attractor is rendered by the chaos game, kept only if it lights enough pixels (FractalDB's
  filling-rate filter), and coloured with a random palette over its log density, as the PixMix fractals
  look.

Procedural generation runs on the requested device with one ``torch.Generator`` on that device, seeded
with ``seed``: the same ``(count, size, seed)`` gives the same bank on a given device type, but CPU and
CUDA random streams differ, so a CPU bank and a CUDA bank of one seed are different fractals.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from onlineaug.devices import parse_device

__all__ = ["FractalBank", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_MIN_SIZE = 8
_MAX_MAPS = 4
_CANDIDATES_PER_MAP = 32  # draws per affine map; P(no contraction among them) < 1e-5
_BURN_IN = 8  # chaos-game iterations discarded before the points lie on the attractor
_ITERATIONS = 24  # recorded iterations
_SAMPLES_PER_PIXEL = 3  # recorded points per output pixel, on average
_MIN_FILL, _MAX_FILL = 0.08, 0.8  # accepted fraction of lit pixels
_MAX_ROUNDS = 64


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class FractalBank:
    """A set of fractal images: ``images`` is a uint8 tensor (F, 3, size, size) on one device."""

    def __init__(self, images: torch.Tensor):
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be a uint8 tensor (F, 3, size, size), got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("a FractalBank needs at least one image, got 0")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return f"FractalBank({len(self)} images, size={self.size}, device={self.device})"

    @property
    def size(self) -> int:
        return self.images.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device) -> FractalBank:
        """The bank on ``device`` (``self`` if it is already there)."""
        device = parse_device(device)
        images = self.images.to(device)
        return self if images is self.images else FractalBank(images)

    def resized(self, size: int) -> FractalBank:
        """A new bank with every image resized to ``size`` (bilinear, antialiased when shrinking)."""
        size = _check_int("size", size, _MIN_SIZE)
        out = F.interpolate(self.images.float(), size=(size, size), mode="bilinear", align_corners=False,
                            antialias=size < self.size)
        return FractalBank(out.round_().clamp_(0, 255).to(torch.uint8))

    @classmethod
    def procedural(cls, count: int = 64, size: int = 64, *, seed: int = 0, device="cpu") -> FractalBank:
        """``count`` random IFS fractals of ``size`` x ``size`` pixels, generated on ``device``.

        Deterministic given ``(count, size, seed)`` and the device type (see the module docstring).
        """
        count = _check_int("count", count, 1)
        size = _check_int("size", size, _MIN_SIZE)
        seed = _check_int("seed", seed, 0)
        device = parse_device(device)
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        accepted: list[torch.Tensor] = []
        have = 0
        for _ in range(_MAX_ROUNDS):
            batch = math.ceil(1.5 * (count - have)) + 4  # about two thirds of random systems pass the filters
            density, ok = _render_ifs(_sample_ifs(batch, generator), size, generator)
            good = torch.nonzero(ok).squeeze(1)[: count - have]  # the round's one host synchronisation
            accepted.append(_colorize(density[good], generator))
            have += good.numel()
            if have == count:
                return cls(torch.cat(accepted))
        raise RuntimeError(f"could not generate {count} non-degenerate fractals in {_MAX_ROUNDS} rounds")

    @classmethod
    def from_folder(cls, path, size: int, *, device="cpu") -> FractalBank:
        """Load every image directly in folder ``path`` (sorted by name; extensions in
        :data:`IMAGE_EXTENSIONS`, any case) as RGB, centre-cropped to a square and resized to ``size``."""
        from PIL import Image

        size = _check_int("size", size, _MIN_SIZE)
        device = parse_device(device)
        folder = Path(path)
        if not folder.exists():
            raise FileNotFoundError(f"fractal folder {str(folder)!r} does not exist")
        if not folder.is_dir():
            raise NotADirectoryError(f"fractal folder {str(folder)!r} is not a directory")
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in fractal folder {str(folder)!r}")
        images = []
        for file in files:
            try:
                with Image.open(file) as image:
                    image = image.convert("RGB")
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken files
                raise ValueError(f"could not read fractal image {str(file)!r}: {err}") from err
            width, height = image.size
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            image = image.crop((left, top, left + side, top + side))
            image = image.resize((size, size), Image.Resampling.BILINEAR)  # antialiased when shrinking
            images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        return cls(torch.stack(images).to(device))


def _sample_ifs(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch`` random systems of 2-4 contractive affine maps ``p -> A p + t``.

    Entries of ``A`` and ``t`` are uniform in [-1, 1] (FractalDB); each map is the first of
    ``_CANDIDATES_PER_MAP`` draws whose largest singular value is below 1. Returns the maps (batch, 4, 2, 3)
    ``[A | t]``, the cumulative thresholds for picking a map (batch, 4) (map ``k`` is picked when a uniform
    ``u`` exceeds exactly ``k`` thresholds, with probability proportional to ``|det A_k|``; the thresholds from
    the last used map on are 2, so unused slots are never picked) and a bool (batch,) that is False where
    some map found no contraction.
    """
    device = generator.device
    params = torch.rand(batch, _MAX_MAPS, _CANDIDATES_PER_MAP, 2, 3, generator=generator, device=device) * 2 - 1
    a, b, c, d = params[..., 0, 0], params[..., 0, 1], params[..., 1, 0], params[..., 1, 1]
    # Largest singular value of a 2x2 matrix: s^2 = (|A|_F^2 + sqrt(|A|_F^4 - 4 det^2)) / 2.
    frob2, det = a * a + b * b + c * c + d * d, a * d - b * c
    s_max2 = 0.5 * (frob2 + torch.sqrt((frob2 * frob2 - 4 * det * det).clamp_min(0)))
    contractive = s_max2 < 0.999**2
    first = contractive.to(torch.int8).argmax(dim=2)  # first contractive candidate (0 if none)
    maps = params.gather(2, first[:, :, None, None, None].expand(-1, -1, 1, 2, 3)).squeeze(2)
    valid = contractive.any(dim=2)  # (batch, 4)
    num_maps = torch.randint(2, _MAX_MAPS + 1, (batch, 1), generator=generator, device=device)
    used = torch.arange(_MAX_MAPS, device=device) < num_maps
    weight = (maps[..., 0, 0] * maps[..., 1, 1] - maps[..., 0, 1] * maps[..., 1, 0]).abs() + 1e-3
    weight = torch.where(used, weight, torch.zeros_like(weight))
    thresholds = (weight / weight.sum(dim=1, keepdim=True)).cumsum(dim=1)
    thresholds = torch.where(torch.arange(_MAX_MAPS, device=device) < num_maps - 1, thresholds, 2.0)
    ok = (valid | ~used).all(dim=1)
    return maps, thresholds, ok


def _render_ifs(ifs, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Chaos game for a batch of systems: returns the float density in [0, 1] (B, size, size) (log of the
    hit counts, normalised per fractal) and a bool (B,) of fractals that pass the filling-rate filter."""
    maps, thresholds, ok = ifs
    device = maps.device
    batch = maps.shape[0]
    points = max(64, math.ceil(_SAMPLES_PER_PIXEL * size * size / _ITERATIONS))
    # The 6 map parameters (a, b, e, c, d, f) as rows over the batch's maps, so that gathering them per point
    # gives contiguous (B, P) tensors: x' = a x + b y + e, y' = c x + d y + f.
    table = maps.reshape(batch * _MAX_MAPS, 6).T.contiguous()
    base = (torch.arange(batch, device=device, dtype=torch.int32) * _MAX_MAPS)[:, None]
    x = torch.rand(batch, points, generator=generator, device=device) * 2 - 1
    y = torch.rand(batch, points, generator=generator, device=device) * 2 - 1

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.rand(batch, points, generator=generator, device=device)
        # The map index is the number of thresholds below u (the last threshold is always 2).
        k = sum((u > thresholds[:, j, None]).int() for j in range(_MAX_MAPS - 1))
        a, b, e, c, d, f = table.index_select(1, (base + k).view(-1)).view(6, batch, points).unbind(0)
        return torch.addcmul(e, a, x).addcmul_(b, y), torch.addcmul(f, c, x).addcmul_(d, y)

    for _ in range(_BURN_IN):
        x, y = step(x, y)
    # Frame: a square around the burnt-in points with a 5% margin on each side (aspect ratio kept).
    low = torch.stack([x.amin(dim=1), y.amin(dim=1)], dim=1)  # (B, 2)
    high = torch.stack([x.amax(dim=1), y.amax(dim=1)], dim=1)
    half = ((high - low).amax(dim=1) / 2).clamp_min(1e-6) * 1.1  # (B,)
    origin = (low + high) / 2 - half[:, None]
    scale = (size / (2 * half))[:, None]  # pixel = (p - origin) * scale
    origin_x, origin_y = origin[:, :1], origin[:, 1:]
    outside = batch * size * size  # the last bin collects the points outside the frame
    counts = torch.zeros(outside + 1, device=device)
    offsets = (torch.arange(batch, device=device) * size * size)[:, None]
    ones = torch.ones(batch * points, device=device)
    for _ in range(_ITERATIONS):
        x, y = step(x, y)
        col, row = ((x - origin_x) * scale).floor_(), ((y - origin_y) * scale).floor_()
        inside = (col >= 0) & (col < size) & (row >= 0) & (row < size)
        index = torch.where(inside, offsets + row.long() * size + col.long(), outside)
        counts.index_add_(0, index.view(-1), ones)
    counts = counts[:-1].reshape(batch, size, size)
    fill = (counts > 0).float().mean(dim=(1, 2))
    ok = ok & (fill >= _MIN_FILL) & (fill <= _MAX_FILL)
    density = torch.log1p(counts)
    density = density / density.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    return density, ok


def _colorize(density: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, 3, size, size) images: a random 3-colour gradient over the density of lit pixels, on a
    dark random background."""
    batch, device = density.shape[0], density.device
    palette = torch.rand(batch, 3, 3, generator=generator, device=device)  # (B, colour, rgb)
    palette = palette / palette.amax(dim=2, keepdim=True).clamp_min(1e-6)  # bright, saturated colours
    background = 0.2 * torch.rand(batch, 3, generator=generator, device=device)
    t = density[:, None]  # (B, 1, H, W) in [0, 1]
    lower = palette[:, 0, :, None, None] + (palette[:, 1, :, None, None] - palette[:, 0, :, None, None]) * (2 * t).clamp_max(1)
    upper = palette[:, 1, :, None, None] + (palette[:, 2, :, None, None] - palette[:, 1, :, None, None]) * (2 * t - 1).clamp_min(0)
    colour = torch.where(t < 0.5, lower, upper)
    # Faint points fade into the background instead of jumping to the palette's first colour.
    alpha = (4 * t).clamp_max(1)
    image = background[:, :, None, None] + (colour - background[:, :, None, None]) * alpha
    image = torch.where(t > 0, image, background[:, :, None, None].expand_as(image))
    return (image * 255).round_().clamp_(0, 255).to(torch.uint8)
