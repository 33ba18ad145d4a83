import math
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from onlineaug.datasets import MAX_CLASSES, SHAPES, SyntheticShapes


def _same_item(a, b) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True))


def test_same_seed_same_items_different_seed_different_items():
    a, b = SyntheticShapes(length=50, seed=3), SyntheticShapes(length=50, seed=3)
    c = SyntheticShapes(length=50, seed=4)
    for i in range(50):
        assert _same_item(a[i], b[i])
    differing = sum(not torch.equal(a[i][0], c[i][0]) for i in range(50))
    assert differing == 50


def test_item_is_a_function_of_seed_and_index_only():
    short, long = SyntheticShapes(length=10, seed=7), SyntheticShapes(length=1000, seed=7)
    forward = [short[i] for i in range(10)]
    backward = [long[i] for i in reversed(range(10))][::-1]
    for x, y in zip(forward, backward):
        assert _same_item(x, y)
    # ... and of the index: every item has its own random draws.
    params = [long.sample_params(i) for i in range(200)]
    assert len({p.center for p in params}) == 200 and len({p.angle for p in params}) == 200


@pytest.mark.parametrize("size", [16, 17, 64, 101])
def test_item_types_shapes_and_range(size):
    ds = SyntheticShapes(num_classes=MAX_CLASSES, size=size, length=48, return_mask=True)
    for i in range(len(ds)):
        image, label, mask = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, size, size)
        assert type(label) is int and 0 <= label < MAX_CLASSES
        assert mask.dtype == torch.bool and mask.shape == (size, size)
        assert image.is_contiguous()
    # Not a degenerate image: backgrounds and shapes use a good part of the range.
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    assert images.min() < 30 and images.max() > 225


def test_labels_are_balanced_and_match_the_drawn_shape():
    ds = SyntheticShapes(num_classes=10, length=2000)
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels == [i % 10 for i in range(2000)]
    assert Counter(labels) == {c: 200 for c in range(10)}
    assert ds.classes == list(SHAPES[:10])
    for i in range(40):
        assert ds.sample_params(i).shape == ds.classes[ds[i][1]]


def test_classes_beyond_the_shape_types_are_striped_variants():
    ds = SyntheticShapes(num_classes=MAX_CLASSES, length=MAX_CLASSES)
    n = len(SHAPES)
    assert len(ds.classes) == len(set(ds.classes)) == MAX_CLASSES
    assert ds.classes[n:] == [f"striped_{name}" for name in SHAPES]
    for i in range(MAX_CLASSES):
        p = ds.sample_params(i)
        assert p.striped == (i >= n) and p.shape == SHAPES[i % n]


@pytest.mark.parametrize("size", [16, 64])
def test_mask_is_exactly_the_drawn_shape(size):
    ds = SyntheticShapes(num_classes=MAX_CLASSES, size=size, length=96, seed=1, return_mask=True)
    for i in range(len(ds)):
        image, label, mask = ds[i]
        p = ds.sample_params(i)
        assert mask.any(), f"item {i} ({ds.classes[label]}) has an empty mask"
        assert torch.equal(ds.foreground_mask(i), mask)
        inside = image[:, mask].T  # (n, 3): no anti-aliasing, so exactly the fill colour(s)
        fills = [p.color, p.stripe_color] if p.striped else [p.color]
        matches = torch.stack([(inside == torch.tensor(c, dtype=torch.uint8)).all(dim=1) for c in fills])
        assert matches.any(dim=0).all()
        assert matches[0].any()  # the shape's own colour is always drawn
        background = ds.render_background(p)
        assert torch.equal(image[:, ~mask], background[:, ~mask])


def test_shape_colour_contrasts_with_the_background_colours():
    ds = SyntheticShapes(length=200)
    for i in range(len(ds)):
        p = ds.sample_params(i)
        for c in p.background_colors:
            assert math.dist(p.color, c) >= 100


def _polygon_area(vertices):
    x, y = np.asarray(vertices, dtype=float).T
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _lens_area(r1, r2, d):
    # Intersection of two discs of radii r1, r2 whose centres are d apart.
    a1 = r1 * r1 * math.acos((d * d + r1 * r1 - r2 * r2) / (2 * d * r1))
    a2 = r2 * r2 * math.acos((d * d + r2 * r2 - r1 * r1) / (2 * d * r2))
    return a1 + a2 - 0.5 * math.sqrt((-d + r1 + r2) * (d + r1 - r2) * (d - r1 + r2) * (d + r1 + r2))


# Area of each shape for radius 1, from geometry (not from the rasteriser).
_UNIT_AREAS = {
    "circle": math.pi,
    "square": 1.44**2,
    "triangle": 3 * math.sqrt(3) / 4,
    "cross": 2 * (0.6 * 1.9) - 0.6**2,
    "ring": math.pi * (1 - 0.55**2),
    "star": 10 * 0.5 * 0.45 * math.sin(math.pi / 5),
    "diamond": 2 * 0.65,
    "ellipse": math.pi * 0.5,
    "hexagon": 3 * math.sqrt(3) / 2,
    "crescent": math.pi - _lens_area(1.0, 0.8, 0.45),
    "arrow": 1.1 * 0.6 + 0.5 * 1.5 * 0.75,
}


def test_mask_area_matches_geometry():
    ds = SyntheticShapes(num_classes=len(SHAPES), size=128, length=5 * len(SHAPES), seed=2)
    for i in range(len(ds)):
        p = ds.sample_params(i)
        if p.shape not in _UNIT_AREAS:
            continue
        area = ds.foreground_mask(i).sum().item()
        expected = _UNIT_AREAS[p.shape] * p.radius**2
        assert area == pytest.approx(expected, rel=0.025), p.shape


def test_shape_lies_inside_the_image_and_ring_has_a_hole():
    ds = SyntheticShapes(num_classes=len(SHAPES), size=64, length=60, seed=5)
    ring, circle = SHAPES.index("ring"), SHAPES.index("circle")
    for i in range(len(ds)):
        p = ds.sample_params(i)
        assert p.radius <= p.center[0] <= 64 - p.radius and p.radius <= p.center[1] <= 64 - p.radius
        centre_pixel = ds.foreground_mask(i)[int(p.center[1]), int(p.center[0])].item()
        if i % len(SHAPES) == ring:
            assert not centre_pixel
        elif i % len(SHAPES) == circle:
            assert centre_pixel


def test_pickle_round_trip_gives_identical_items():
    ds = SyntheticShapes(num_classes=12, size=32, length=30, seed=11, return_mask=True)
    [ds[i] for i in range(5)]  # warm any caches: they must not end up in the pickle
    blob = pickle.dumps(ds)
    assert len(blob) < 1000
    clone = pickle.loads(blob)
    assert len(clone) == len(ds) and clone.classes == ds.classes
    for i in range(len(ds)):
        assert _same_item(clone[i], ds[i])


def test_indexing_behaves_like_a_list():
    ds = SyntheticShapes(length=7)
    assert _same_item(ds[-1], ds[6])
    assert _same_item(ds[-7], ds[0])
    assert _same_item(ds[np.int64(3)], ds[3])
    with pytest.raises(IndexError, match="out of range"):
        ds[7]
    with pytest.raises(IndexError, match="out of range"):
        ds[-8]
    with pytest.raises(TypeError, match="integers"):
        ds[1.0]
    assert list(range(len(SyntheticShapes(length=0)))) == []


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"num_classes": MAX_CLASSES + 1}, ValueError, f"\\[1, {MAX_CLASSES}\\]"),
        ({"num_classes": 2.0}, TypeError, "num_classes must be an int"),
        ({"size": 15}, ValueError, "size must be >= 16"),
        ({"size": True}, TypeError, "size must be an int"),
        ({"length": -1}, ValueError, "length"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": "0"}, TypeError, "seed"),
        ({"return_mask": 1}, TypeError, "return_mask"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        SyntheticShapes(**kwargs)


@pytest.mark.parametrize("context", [None, "spawn"])
def test_dataloader_workers_give_the_same_batches(context):
    ds = SyntheticShapes(num_classes=12, size=32, length=40, seed=9, return_mask=True)
    serial = list(DataLoader(ds, batch_size=8))
    parallel = list(DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context=context))
    assert len(serial) == len(parallel) == 5
    for a, b in zip(serial, parallel):
        assert _same_item(a, b)
    images, labels, masks = serial[0]
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.int64 and masks.dtype == torch.bool


def test_render_rejects_parameters_of_another_size():
    params = SyntheticShapes(size=16).sample_params(0)
    with pytest.raises(ValueError, match="16x16"):
        SyntheticShapes(size=32).render(params)
