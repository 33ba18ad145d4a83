"""Procedural datasets for tests, examples and benchmarks.

:class:`SyntheticShapes` renders a coloured shape whose *type* is the class (circle, square, ...) at a
random position, scale, rotation and colour over a random textured background. It needs no download,
costs well under a millisecond per 64x64 item, and knows its exact foreground mask, which the
De-DA recipe (foreground/background decoupling) needs as ground truth.

Every item is a pure function of ``(seed, index)``: its parameters come from
``numpy.random.default_rng([seed, index])``, never from global RNG state, so an item is identical in
every process, DataLoader worker and pickled copy of the dataset. Rendering follows the house pattern of
"sample parameters, then apply them": :meth:`SyntheticShapes.sample_params` draws an
:class:`ItemParams`, :meth:`SyntheticShapes.render` draws it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SHAPES", "MAX_CLASSES", "ItemParams", "SyntheticShapes"]


def _regular_polygon(sides: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(sides) / sides
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    outer = _regular_polygon(2 * points)
    outer[1::2] *= inner
    return outer


_TRIANGLE = _regular_polygon(3)
_HEXAGON = _regular_polygon(6)
_STAR = _star()
_ARROW = np.array([[-0.9, -0.3], [0.2, -0.3], [0.2, -0.75], [0.95, 0.0], [0.2, 0.75], [0.2, 0.3], [-0.9, 0.3]])


def _in_polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over the points (u, v)."""
    inside = np.zeros(u.shape, dtype=bool)
    for (xa, ya), (xb, yb) in zip(vertices, np.roll(vertices, -1, axis=0)):
        if ya == yb:
            continue  # a horizontal edge never crosses a horizontal ray
        crosses = (ya > v) != (yb > v)
        x_cross = xa + (v - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (u < x_cross)
    return inside


# Each shape is an implicit region in the shape's own frame, where the shape fits in the unit disc.
# v points down (image rows), so "up" in a shape is negative v.
def _circle(u, v):
    return u * u + v * v <= 1.0


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.72


def _triangle(u, v):
    return _in_polygon(u, v, _TRIANGLE)


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))


def _ring(u, v):
    rr = u * u + v * v
    return (rr <= 1.0) & (rr >= 0.55**2)


def _star_shape(u, v):
    return _in_polygon(u, v, _STAR)


def _diamond(u, v):
    return np.abs(u) / 0.65 + np.abs(v) <= 1.0


def _ellipse(u, v):
    return u * u + (v / 0.5) ** 2 <= 1.0


def _hexagon(u, v):
    return _in_polygon(u, v, _HEXAGON)


def _heart(u, v):
    x, y = 1.2 * u, -1.2 * v + 0.15  # the classic quartic heart, point down
    return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0


def _crescent(u, v):
    return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.8**2)


def _arrow(u, v):
    return _in_polygon(u, v, _ARROW)


_SHAPE_FUNCTIONS = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "ring": _ring,
    "star": _star_shape,
    "diamond": _diamond,
    "ellipse": _ellipse,
    "hexagon": _hexagon,
    "heart": _heart,
    "crescent": _crescent,
    "arrow": _arrow,
}
SHAPES: tuple[str, ...] = tuple(_SHAPE_FUNCTIONS)
"""The shape types, in class order."""
MAX_CLASSES = 2 * len(SHAPES)
"""Classes beyond ``len(SHAPES)`` are the same shapes filled with two-colour stripes ("striped_circle", ...)."""
BACKGROUNDS: tuple[str, ...] = ("gradient", "stripes", "checker", "noise")

_MIN_CONTRAST = 110.0  # minimum RGB distance between the shape colour and both background colours


@dataclass(frozen=True, eq=False)
class ItemParams:
    """Everything random about one item; :meth:`SyntheticShapes.render` is a pure function of it.

    Positions are in pixels (x to the right, y down, pixel centres at half-integers); angles in radians.
    """

    label: int
    shape: str
    striped: bool
    center: tuple[float, float]
    radius: float
    angle: float
    color: tuple[int, int, int]
    stripe_color: tuple[int, int, int]  # second fill colour of striped classes (unused otherwise)
    stripe_period: float  # in pixels
    background: str  # one of BACKGROUNDS
    background_colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    background_angle: float
    background_period: float  # stripe period or checker cell, in pixels
    background_noise: np.ndarray | None  # (g, g) low-resolution field in [0, 1] for "noise"
    grain: np.ndarray  # (size, size) float32 per-pixel grey noise (uniform, up to +-12) added to the background


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    centres = np.arange(size, dtype=np.float32) + 0.5
    y, x = np.meshgrid(centres, centres, indexing="ij")
    return x, y


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


class SyntheticShapes(Dataset):
    """Map-style dataset of procedural shape images; the shape type is the class.

    Args:
        num_classes: number of classes, 1 to :data:`MAX_CLASSES` (24). Class ``c < len(SHAPES)`` is the
            plain shape ``SHAPES[c]``; class ``len(SHAPES) + k`` is ``SHAPES[k]`` filled with two-colour
            stripes.
        size: image side in pixels, >= 16.
        length: number of items.
        seed: non-negative int; item ``i`` is a pure function of ``(seed, i)``.
        return_mask: if True, items are ``(image, label, mask)`` instead of ``(image, label)``.

    Items: ``image`` is a uint8 tensor (3, size, size); ``label`` is the int ``i % num_classes`` (so the
    classes are exactly balanced over any ``num_classes`` consecutive indices); ``mask`` is a bool tensor
    (size, size), True on the shape's pixels. Shapes are drawn without anti-aliasing: every mask pixel
    holds the fill colour exactly, and every other pixel holds the background. The shape lies entirely
    inside the image; its radius is 22% to 42% of ``size``.

    Attributes:
        classes: the class names, e.g. ``["circle", "square", ...]``.
    """

    def __init__(self, num_classes: int = 10, size: int = 64, length: int = 2000, seed: int = 0,
                 return_mask: bool = False):
        self.num_classes = _check_int("num_classes", num_classes, 1, MAX_CLASSES)
        self.size = _check_int("size", size, 16)
        self.length = _check_int("length", length, 0)
        self.seed = _check_int("seed", seed, 0)
        if not isinstance(return_mask, bool):
            raise TypeError(f"return_mask must be a bool, got {type(return_mask).__name__}")
        self.return_mask = return_mask
        n = len(SHAPES)
        self.classes = [SHAPES[c] if c < n else f"striped_{SHAPES[c - n]}" for c in range(self.num_classes)]

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (f"SyntheticShapes(num_classes={self.num_classes}, size={self.size}, length={self.length}, "
                f"seed={self.seed}, return_mask={self.return_mask})")

    def _index(self, index) -> int:
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"SyntheticShapes indices must be integers, got {type(index).__name__}") from None
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index {index} is out of range for SyntheticShapes of length {self.length}")
        return i

    def __getitem__(self, index):
        params = self.sample_params(index)
        image, mask = self.render(params)
        return (image, params.label, mask) if self.return_mask else (image, params.label)

    def foreground_mask(self, index) -> torch.Tensor:
        """The bool (size, size) mask of item ``index``'s shape (what ``return_mask=True`` returns)."""
        return torch.from_numpy(self._shape_mask(self.sample_params(index)))

    def sample_params(self, index) -> ItemParams:
        """Draw the parameters of item ``index`` from ``numpy.random.default_rng([seed, index])``."""
        i = self._index(index)
        rng = np.random.default_rng([self.seed, i])
        s = self.size
        label = i % self.num_classes
        n = len(SHAPES)

        r = rng.random(10).tolist()  # all scalar draws at once: numpy's per-call overhead dominates here
        background = BACKGROUNDS[int(r[0] * len(BACKGROUNDS))]
        bg_colors = tuple(tuple(c) for c in rng.integers(0, 256, (2, 3)).tolist())
        noise = rng.random((g := 3 + int(r[1] * 6), g)) if background == "noise" else None
        grain = np.float32(24 * r[2]) * (rng.random((s, s), dtype=np.float32) - np.float32(0.5))
        color = _contrasting_color(rng, bg_colors)
        stripe_color = _contrasting_color(rng, (color,))
        radius = (0.22 + 0.2 * r[3]) * s
        return ItemParams(
            label=label, shape=SHAPES[label % n], striped=label >= n,
            center=(radius + (s - 2 * radius) * r[4], radius + (s - 2 * radius) * r[5]), radius=radius,
            angle=2 * math.pi * r[6], color=color, stripe_color=stripe_color,
            stripe_period=(0.25 + 0.25 * r[7]) * radius, background=background, background_colors=bg_colors,
            background_angle=math.pi * r[8], background_period=(0.08 + 0.22 * r[9]) * s,
            background_noise=noise, grain=grain,
        )

    def _local_coords(self, p: ItemParams) -> tuple[np.ndarray, np.ndarray]:
        x, y = _pixel_grid(self.size)
        dx, dy = x - p.center[0], y - p.center[1]
        c, s = math.cos(p.angle), math.sin(p.angle)
        return (c * dx + s * dy) / p.radius, (-s * dx + c * dy) / p.radius

    def _shape_mask(self, p: ItemParams) -> np.ndarray:
        u, v = self._local_coords(p)
        return _SHAPE_FUNCTIONS[p.shape](u, v)

    def render_background(self, p: ItemParams) -> torch.Tensor:
        """The uint8 (3, size, size) background of ``p`` alone (what the image holds outside the mask)."""
        if p.grain.shape != (self.size, self.size):
            raise ValueError(f"these parameters are for {p.grain.shape[0]}x{p.grain.shape[1]} images, "
                             f"but this dataset renders {self.size}x{self.size}")
        x, y = _pixel_grid(self.size)
        c, s = math.cos(p.background_angle), math.sin(p.background_angle)
        along, across = c * x + s * y, -s * x + c * y
        if p.background == "gradient":
            t = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
        elif p.background == "stripes":
            t = 0.5 + 0.5 * np.sin(2 * math.pi * along / p.background_period)
        elif p.background == "checker":
            t = (np.floor(along / p.background_period) + np.floor(across / p.background_period)) % 2
        else:  # "noise": bilinear upsampling of a coarse random field
            t = _bilinear(p.background_noise, self.size)
        c0, c1 = (np.asarray(col, dtype=np.float32)[:, None, None] for col in p.background_colors)
        image = c0 + (c1 - c0) * t.astype(np.float32)[None] + p.grain[None]
        return torch.from_numpy(np.clip(np.rint(image), 0, 255).astype(np.uint8))

    def render(self, p: ItemParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``p``: returns the uint8 image (3, size, size) and the bool shape mask (size, size)."""
        u, v = self._local_coords(p)
        mask = _SHAPE_FUNCTIONS[p.shape](u, v)
        image = self.render_background(p).numpy()
        fill = np.asarray(p.color, dtype=np.uint8)[:, None, None]
        if p.striped:
            stripes = np.floor(u * p.radius / p.stripe_period) % 2 == 1
            fill = np.where(stripes[None], np.asarray(p.stripe_color, dtype=np.uint8)[:, None, None], fill)
        image = np.where(mask[None], fill, image)
        return torch.from_numpy(image), torch.from_numpy(mask)


def _contrasting_color(rng: np.random.Generator, others) -> tuple[int, int, int]:
    """A random colour at RGB distance >= _MIN_CONTRAST from each of ``others`` (best of 32 draws)."""
    candidates = rng.integers(0, 256, (32, 3))
    diff = candidates[:, None, :] - np.asarray(others)[None]  # (32, len(others), 3)
    distance = np.sqrt((diff * diff).sum(axis=2).min(axis=1))
    ok = np.flatnonzero(distance >= _MIN_CONTRAST)
    pick = ok[0] if ok.size else int(np.argmax(distance))
    return tuple(candidates[pick].tolist())


def _bilinear(field: np.ndarray, size: int) -> np.ndarray:
    """Upsample a (g, g) field to (size, size) by bilinear interpolation (cell centres aligned)."""
    g = field.shape[0]
    pos = np.clip((np.arange(size) + 0.5) * g / size - 0.5, 0, g - 1)
    lo = np.minimum(pos.astype(np.int64), g - 2)
    w = (pos - lo)[:, None]
    rows = field[lo] * (1 - w) + field[lo + 1] * w  # (size, g)
    return rows[:, lo] * (1 - w.T) + rows[:, lo + 1] * w.T
