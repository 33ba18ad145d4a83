"""``batch_transforms=``: kornia (or any callable) on the mixed batch, after mixing and before normalisation.

The loader asks the recipe for the mixed batch unnormalised (a context of mean 0 and std 1), runs the transforms on
the trainer's device with torch's global generators seeded per batch, then normalises.
"""

import dataclasses

import kornia.augmentation as K
import pytest
import torch

from onlineaug import OnlineGenAugLoader, ops
from onlineaug.datasets import SyntheticShapes
from onlineaug.loader import IMAGENET_MEAN, IMAGENET_STD, _seeded_global_rng
from onlineaug.recipes import Batch, BatchContext, get_recipe

SIZE = 32
MEAN = torch.tensor(IMAGENET_MEAN)
STD = torch.tensor(IMAGENET_STD)


@pytest.fixture(scope="module")
def shapes():
    return SyntheticShapes(num_classes=10, size=SIZE, length=32, seed=0)


def flip_and_jitter():
    return K.AugmentationSequential(K.RandomHorizontalFlip(p=0.5), K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=1.0))


def make_loader(dataset, device, **kwargs):
    return OnlineGenAugLoader(dataset, recipe="cutmix", num_classes=10, batch_size=8, image_size=SIZE, p_aug=1.0,
                              num_workers=0, seed=3, device=device, progress=False, **kwargs)


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - MEAN.to(images.device).view(1, 3, 1, 1)) / STD.to(images.device).view(1, 3, 1, 1)


def test_kornia_runs_on_the_mixed_unnormalised_batch_then_the_loader_normalises(shapes, device):
    # the mixed batch itself: the same loader and seed with mean 0 and std 1 serves it unnormalised
    with make_loader(shapes, device, mean=(0, 0, 0), std=(1, 1, 1)) as plain:
        mixed = list(plain)
    aug = flip_and_jitter()
    with make_loader(shapes, device, batch_transforms=aug) as loader:
        served = []
        for images, targets in loader:
            served.append((images, targets, aug._params))  # the parameters kornia drew for this batch
    assert len(served) == len(mixed) == 4
    for (images, targets, params), (raw, raw_targets) in zip(served, mixed):
        assert images.device == device and images.dtype == torch.float32
        assert raw.min() >= 0 and raw.max() <= 1  # what the transforms see: the mixed batch in [0, 1]
        expected = normalise(aug(raw, params=params))  # the same kornia op, same parameters, then normalising
        torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(targets, raw_targets)  # labels are the mix's: the transforms keep them
        flipped = params[0].data["batch_prob"]
        assert 0 < flipped.sum() < len(flipped)  # some rows flipped, some not: the check is not vacuous
        assert not torch.allclose(images, normalise(raw), atol=1e-2)  # the jitter changed every row
    # a new batch draws new parameters
    assert not torch.equal(served[0][2][1].data["brightness_factor"], served[1][2][1].data["brightness_factor"])


def test_transform_draws_are_seeded_by_the_loader_not_the_caller(shapes, device):
    runs = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)  # the caller's global state differs; the loader's seed does not
        with make_loader(shapes, device, batch_transforms=flip_and_jitter()) as loader:
            runs.append([images for images, _ in loader])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with make_loader(shapes, device, batch_transforms=flip_and_jitter()) as loader:
        loader.set_epoch(1)
        other_epoch = next(iter(loader))[0]
    assert not torch.equal(other_epoch, runs[0][0])


def test_the_callers_global_random_state_is_restored(device):
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    with _seeded_global_rng(device, 123):
        inside = torch.rand(4)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)
    with _seeded_global_rng(device, 123):
        torch.testing.assert_close(torch.rand(4), inside, rtol=0, atol=0)  # the seed alone decides the draws


def test_any_callable_works_and_its_output_is_normalised_in_out_dtype(shapes, device):
    def invert(images):
        return 1 - images

    with make_loader(shapes, device, mean=(0, 0, 0), std=(1, 1, 1)) as plain:
        raw = next(iter(plain))[0]
    with make_loader(shapes, device, batch_transforms=invert, out_dtype=torch.bfloat16) as loader:
        images = next(iter(loader))[0]
    assert images.dtype == torch.bfloat16
    torch.testing.assert_close(images.float(), normalise(1 - raw), rtol=1e-2, atol=2e-2)  # bf16 rounding


@pytest.mark.parametrize("transform, error, message", [
    ("flip", TypeError, r"batch_transforms=.*callable"),
    (lambda images: (images, None), TypeError, r"one tensor of the shape it was given, \(8, 3, 32, 32\); got tuple"),
    (lambda images: images[:, :, :16, :16], TypeError, r"got \(8, 3, 16, 16\)\. Keep the size"),
])
def test_bad_transforms_are_refused(shapes, transform, error, message):
    with pytest.raises(error, match=message):
        with make_loader(shapes, "cpu", batch_transforms=transform) as loader:
            next(iter(loader))


@pytest.mark.parametrize("name", ["genmix", "diffusemix", "cutmix", "mixup", "none"])
def test_each_recipe_mixes_unnormalised_in_a_mean_0_std_1_context(name, device):
    """The design's premise: every recipe normalises with its context, so mean 0 / std 1 gives the mixed batch in
    [0, 1], generated and real rows alike, and normalising it gives what the recipe returns normally."""
    recipe = get_recipe(name, **({"generation_size": 64} if name in ("genmix", "diffusemix") else {}))
    g = torch.Generator().manual_seed(5)
    fractals = torch.randint(0, 256, (4, 3, 16, 16), generator=g, dtype=torch.uint8).to(device)
    ctx = BatchContext(num_classes=5, image_size=16, mean=MEAN.to(device), std=STD.to(device), label_smoothing=0.0,
                       out_dtype=torch.float32, p_aug=1.0, fractals=fractals)
    raw_ctx = dataclasses.replace(ctx, mean=torch.zeros(3, device=device), std=torch.ones(3, device=device))
    images = lambda: torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8)  # noqa: E731
    fields = {"image": images(), "original": images(), "generated": images(), "label": torch.arange(6) % 5,
              "prompt_id": torch.zeros(6, dtype=torch.int64)}
    generated = torch.tensor([True, False, True, False, True, True])
    batch = Batch(fields={k: v.to(device) for k, v in fields.items()}, generated=generated.to(device))
    params = recipe.sample_params(batch, ctx, torch.Generator(device=device).manual_seed(0))
    normal = recipe.apply(batch, params, ctx)
    unnormalised = recipe.apply(batch, params, raw_ctx)
    assert unnormalised[0].min() >= 0 and unnormalised[0].max() <= 1
    torch.testing.assert_close(normalise(unnormalised[0]), normal[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unnormalised[1], normal[1])
    if name in ("genmix", "diffusemix"):  # generated rows are blended, real rows are the originals
        real = ~generated
        torch.testing.assert_close(unnormalised[0][real.to(device)].cpu(), fields["original"][real].float() / 255)
        assert not torch.allclose(unnormalised[0][generated.to(device)].cpu(),
                                  fields["original"][generated].float() / 255)
    if name == "none":
        torch.testing.assert_close(unnormalised[0].cpu(), ops.normalize(fields["image"], torch.zeros(3), torch.ones(3)))
