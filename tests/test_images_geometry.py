"""The training crop (resize= squash, center_crop, random_resized_crop): torchvision's semantics, seeded per
(seed, rank, epoch, index), the same geometry on real rows and on producer sources, and dict rows end to end."""

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from onlineaug import OnlineGenAugLoader
from onlineaug.images import (
    NO_BOX,
    RESIZE_MODES,
    ItemFormat,
    UInt8ImageDataset,
    crop_box,
    crop_resize,
    item_rng,
    random_resized_crop_box,
    resize_uint8,
)
from onlineaug.models import LoadPolicy
from onlineaug.producer import Producer, ProducerSettings
from onlineaug.recipes import get_recipe
from onlineaug.recipes.base import Jobs
from onlineaug.sources import SourceSet

SIZE, GENERATION = 16, 24


class DictRows(torch.utils.data.Dataset):
    """A Hugging Face-style dataset: dict rows of non-square (H, W, 3) uint8 images (module level: picklable)."""

    def __init__(self, length=12, image_key="img", label_key="fine_label", num_classes=3):
        self.length, self.image_key, self.label_key, self.num_classes = length, image_key, label_key, num_classes

    def __len__(self):
        return self.length

    def image(self, index):
        height, width = (20 + 3 * index, 37) if index % 2 else (41, 22 + index)  # landscape and portrait
        g = torch.Generator().manual_seed(index)
        return torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()

    def __getitem__(self, index):
        return {self.image_key: self.image(index), self.label_key: index % self.num_classes, "caption": "unused"}


def chw(rows, index):
    return torch.from_numpy(rows.image(index)).permute(2, 0, 1)


# ---- boxes: torchvision's rules -------------------------------------------------------------------------------
@pytest.mark.parametrize("height, width", [(7, 12), (12, 7), (10, 16), (9, 9), (31, 46)])
def test_center_crop_box_is_torchvisions_center_crop(height, width):
    image = torch.arange(height * width, dtype=torch.int32).view(1, height, width)
    top, left, h, w = crop_box(height, width, "center_crop")
    side = min(height, width)
    assert (h, w) == (side, side)
    assert torch.equal(image[:, top:top + h, left:left + w], TF.center_crop(image, [side, side]))
    assert crop_box(height, width, "squash") == (0, 0, height, width)


def test_center_crop_row_equals_torchvisions_resize_then_center_crop():
    image = torch.randint(0, 256, (3, 20, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    expected = TF.center_crop(TF.resize(image, 20, antialias=True), [20, 20])  # Resize(S) + CenterCrop(S)
    assert torch.equal(crop_resize(image, crop_box(20, 40, "center_crop"), 20), expected)


@pytest.mark.parametrize("height, width, box", [
    (10, 1000, (0, 493, 10, 13)),  # no try fits: torchvision's fallback, aspect ratio clamped to 4/3
    (1000, 10, (493, 0, 13, 10)),  # clamped to 3/4
])
def test_random_resized_crop_falls_back_to_torchvisions_central_box(height, width, box):
    assert random_resized_crop_box(height, width, np.random.default_rng(0)) == box
    image = torch.zeros(1, height, width)
    torch.manual_seed(0)
    assert RandomResizedCrop.get_params(image, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3]) == box


def test_random_resized_crop_boxes_follow_torchvisions_distribution():
    height, width, n = 48, 64, 4000
    rng = np.random.default_rng(0)
    ours = np.array([random_resized_crop_box(height, width, rng) for _ in range(n)])
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    theirs = np.array([RandomResizedCrop.get_params(image, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])
                       for _ in range(n)])
    for boxes in (ours, theirs):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = {name: (b[:, 2] * b[:, 3]) / (height * width) for name, b in (("ours", ours), ("theirs", theirs))}
    aspect = {name: np.log(b[:, 3] / b[:, 2]) for name, b in (("ours", ours), ("theirs", theirs))}
    assert 0.07 < area["ours"].min() < 0.1 and area["ours"].max() > 0.95  # scale = (0.08, 1)
    assert np.exp(aspect["ours"]).min() > 3 / 4 - 0.05 and np.exp(aspect["ours"]).max() < 4 / 3 + 0.05
    # same distribution as torchvision's: means and quartiles within a few standard errors (4000 draws)
    for values in (area, aspect):
        assert abs(values["ours"].mean() - values["theirs"].mean()) < 5 * values["theirs"].std() / math.sqrt(n)
        for q in (0.25, 0.5, 0.75):
            assert abs(np.quantile(values["ours"], q) - np.quantile(values["theirs"], q)) < 0.03


def test_random_crops_are_seeded_by_seed_rank_epoch_and_index():
    def box(seed=0, rank=0, epoch=0, index=0):
        return random_resized_crop_box(200, 300, item_rng(seed, rank, epoch, index))

    def boxes(seed=0, rank=0, epoch=0, first=0):
        return [box(seed, rank, epoch, first + i) for i in range(4)]

    assert box() == box() and boxes() == boxes()  # reproducible
    for other in (dict(seed=1), dict(rank=1), dict(epoch=1), dict(first=4)):
        assert boxes(**other) != boxes(), other
    with pytest.raises(ValueError, match="needs a seeded generator"):
        crop_box(10, 10, "random_resized_crop")


# ---- real rows --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("resize", RESIZE_MODES)
def test_real_rows_are_the_modes_box_resized(resize):
    rows = DictRows()
    fmt = ItemFormat(image_key="img", label_key="fine_label", resize=resize)
    dataset = UInt8ImageDataset(rows, SIZE, 3, fmt, seed=5, rank=1)
    for epoch, index in ((0, 1), (3, 2), (3, 5)):
        image, label, returned = dataset[(epoch, index)]
        full = chw(rows, index)
        rng = item_rng(5, 1, epoch, index) if resize == "random_resized_crop" else None
        expected = crop_resize(full, crop_box(*full.shape[1:], resize, rng), SIZE)
        assert image.shape == (3, SIZE, SIZE) and (label, returned) == (index % 3, index)
        assert torch.equal(image, expected)
        if resize == "squash":
            assert torch.equal(image, resize_uint8(full, SIZE))
    random = UInt8ImageDataset(rows, SIZE, 3, ItemFormat("img", "fine_label", "random_resized_crop"), seed=5)
    assert any(not torch.equal(random[(0, i)][0], random[(1, i)][0]) for i in range(4))  # a new crop each epoch


# ---- producer sources: one box, resized to the generation size and to the training size ---------------------------
def producer(resize, *, generation=0, seed=3):
    rows = DictRows()
    settings = ProducerSettings(
        recipe=get_recipe("diffusemix", generation_size=GENERATION), dataset=rows, num_classes=3, class_names=None,
        image_size=SIZE, batch_size=4, seed=seed, trainer_rank=0, roles={}, specs={}, policy=LoadPolicy(),
        pool_fields={}, item_format=ItemFormat(image_key="img", label_key="fine_label", resize=resize))
    sources = SourceSet(np.arange(len(rows)))
    return Producer(settings, rank=0, device="cpu", generation=generation, sources=sources), rows


JOBS = np.array([1, 4, -1, 7])


@pytest.mark.parametrize("resize", RESIZE_MODES)
def test_producer_sources_cut_one_box_for_the_generation_and_the_training_size(resize):
    made, rows = producer(resize)
    batch = made._load_sources(Jobs(JOBS), np.zeros(len(JOBS), np.int64))
    assert batch.images.shape == (4, 3, GENERATION, GENERATION) and batch.originals.shape == (4, 3, SIZE, SIZE)
    assert batch.crops.dtype == torch.int64 and batch.crops.shape == (4, 4)
    assert tuple(batch.crops[2].tolist()) == NO_BOX and batch.labels[2] == -1  # no source image
    for row, index in enumerate(JOBS.tolist()):
        if index < 0:
            continue
        full, box = chw(rows, index), tuple(batch.crops[row].tolist())
        assert torch.equal(batch.images[row], crop_resize(full, box, GENERATION))
        assert torch.equal(batch.originals[row], crop_resize(full, box, SIZE))
        assert batch.labels[row] == index % 3
        if resize != "random_resized_crop":  # deterministic: the box, and the original, a real row would have
            assert box == crop_box(*full.shape[1:], resize)
            real = UInt8ImageDataset(rows, SIZE, 3, made.settings.item_format)[(0, index)][0]
            assert torch.equal(batch.originals[row], real)


def test_producer_random_crops_are_reproducible_and_differ_between_restarts():
    def crops(**kwargs):
        made, _ = producer("random_resized_crop", **kwargs)
        return [made._load_sources(Jobs(JOBS), np.zeros(4, np.int64)).crops for _ in range(2)]

    first, again = crops(), crops()
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # seeded
    assert not torch.equal(first[0], first[1])  # each batch draws new boxes
    assert not torch.equal(first[0], crops(generation=1)[0])  # a restarted producer draws a new stream
    height_width = [chw(DictRows(), i).shape[1:] for i in JOBS.tolist() if i >= 0]
    boxes = [b for b in first[0].tolist() if b != list(NO_BOX)]
    for (top, left, h, w), (height, width) in zip(boxes, height_width):
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        assert 0.08 * height * width - 2 * (h + w) <= h * w  # scale >= 0.08, up to rounding


# ---- dict rows through the loader -----------------------------------------------------------------------------
@pytest.mark.parametrize("resize", RESIZE_MODES)
def test_dict_rows_through_the_loader_follow_the_geometry_in_each_epoch_and_worker(resize):
    rows = DictRows()
    loader = OnlineGenAugLoader(rows, recipe="none", num_classes=3, batch_size=4, image_size=SIZE, resize=resize,
                                image_key="img", label_key="fine_label", mean=(0, 0, 0), std=(1, 1, 1), seed=9,
                                num_workers=2 if resize == "random_resized_crop" else 0, return_info=True,
                                progress=False)
    try:
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            for images, targets, info in loader:
                for row, index in enumerate(info["index"].tolist()):
                    full = chw(rows, index)
                    rng = item_rng(9, 0, epoch, index) if resize == "random_resized_crop" else None
                    expected = crop_resize(full, crop_box(*full.shape[1:], resize, rng), SIZE)
                    assert torch.equal((images[row] * 255).round().to(torch.uint8), expected)
                    assert targets[row].argmax() == index % 3 and info["label"][row] == index % 3
    finally:
        loader.close()


def test_dict_rows_with_a_batch_time_recipe():
    loader = OnlineGenAugLoader(DictRows(length=8, image_key="image", label_key="label"), recipe="cutmix",
                                num_classes=3, batch_size=8, image_size=SIZE, num_workers=0, progress=False)
    with loader:
        images, targets = next(iter(loader))
    assert images.shape == (8, 3, SIZE, SIZE) and torch.isfinite(images).all()
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert ((targets > 0).sum(1) <= 2).all()  # CutMix: the own class and the partner's


@pytest.mark.parametrize("bad, error, message", [
    (dict(resize="crop"), ValueError, r"argument resize='crop' is invalid: expected one of \['squash', "
                                      r"'center_crop', 'random_resized_crop'\]"),
    (dict(image_key=0), TypeError, r"argument image_key=0 is invalid: expected a non-empty string"),
])
def test_bad_item_arguments(bad, error, message):
    with pytest.raises(error, match=message):
        OnlineGenAugLoader(DictRows(), recipe="none", num_classes=3, image_size=SIZE, **bad)


def test_dict_rows_without_the_keys_name_the_arguments():
    loader = OnlineGenAugLoader(DictRows(), recipe="none", num_classes=3, image_size=SIZE, num_workers=0,
                                batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"dict without the key\(s\) \['image', 'label'\] .*pass image_key="):
        next(iter(loader))


@pytest.mark.slow
def test_generated_rows_share_the_real_rows_geometry_with_the_tiny_generator():
    """A real producer process (tiny generator, 16 px, 1 step) on dict rows: each pooled original is exactly
    the real row of its source index (center_crop is deterministic), and the generated rows are served."""
    rows = DictRows(image_key="image", label_key="label")
    loader = OnlineGenAugLoader(rows, recipe="diffusemix", num_classes=3, batch_size=4, image_size=SIZE,
                                generation_size=16, resize="center_crop", recipe_options={"num_inference_steps": 1},
                                generator="tiny", generator_devices=["cpu"], generator_batch_size=2, pool_size=4,
                                warmup=2, p_aug=1.0, num_workers=0, return_info=True, progress=False)
    real = UInt8ImageDataset(rows, SIZE, 3, ItemFormat(resize="center_crop"))
    with loader:
        images, targets, info = next(iter(loader))
        pooled = loader.pool.peek(4)
    assert info["generated"].any() and images.shape == (4, 3, SIZE, SIZE)
    assert pooled
    for sample in pooled:
        index = int(sample["index"])
        assert torch.equal(torch.from_numpy(sample["original"]), real[(0, index)][0])
        assert int(sample["label"]) == index % 3
