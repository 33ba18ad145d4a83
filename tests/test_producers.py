"""Producers through the loader: sources that respect the sampler, rejection, one-time preparation, recipe switching.

Real producer processes with the tiny generator at 16 px and one denoising step (the cheapest real pipeline).
"""

import logging
import os
import signal
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler, Subset, SubsetRandomSampler, WeightedRandomSampler

from onlineaug import OnlineGenAugLoader
from onlineaug.datasets import SyntheticShapes
from onlineaug.generators import save_tiny_pipeline
from onlineaug.recipes.base import NON_FINITE, Produced
from onlineaug.recipes.diffusemix import DiffuseMix
from waiting import serve_until, wait_until

SIZE = 16
FAST = dict(generator="tiny", generator_devices=["cpu"], image_size=SIZE, generation_size=SIZE,
            recipe_options={"num_inference_steps": 1}, generator_batch_size=4, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def shapes():
    return SyntheticShapes(num_classes=4, size=SIZE, length=100, seed=0)


def generated_sources(loader, wanted: int, max_epochs: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """(index, label) of the first ``wanted`` generated rows served (info from ``return_info=True``)."""
    indices, labels = [], []
    for epoch in range(max_epochs):
        loader.set_epoch(epoch)
        for _, _, info in loader:
            generated = info["generated"].cpu()
            indices += info["index"].cpu()[generated].tolist()
            labels += info["label"].cpu()[generated].tolist()
        if len(indices) >= wanted:
            return np.array(indices), np.array(labels)
        wait_until(lambda: loader.stats()["pool_ready"] >= 4, timeout=30)
    raise AssertionError(f"only {len(indices)} generated rows after {max_epochs} epochs: {loader.stats()}")


# ------------------------------------------------------------------------------- sources respect the sampler
@pytest.mark.slow
def test_a_subset_random_sampler_keeps_the_held_out_split_out_of_the_generator(shapes):
    train = list(range(50))
    loader = OnlineGenAugLoader(shapes, recipe="diffusemix", num_classes=4, batch_size=10, p_aug=1.0,
                                sampler=SubsetRandomSampler(train), pool_size=16, max_reuse=1, warmup=8,
                                return_info=True, **FAST)
    with loader:
        indices, labels = generated_sources(loader, 24)
    assert set(indices.tolist()) <= set(train)  # the leak: indices 51-93 came from the held-out half
    assert all(shapes.sample_params(i).label == l for i, l in zip(indices, labels))  # served as the source's class


@pytest.mark.slow
def test_a_subset_dataset_generates_from_its_own_items_only(shapes):
    subset = Subset(shapes, list(range(60, 100)))
    loader = OnlineGenAugLoader(subset, recipe="diffusemix", num_classes=4, batch_size=10, p_aug=1.0,
                                pool_size=16, max_reuse=1, warmup=8, return_info=True, **FAST)
    with loader:
        indices, _ = generated_sources(loader, 24)
    assert set(indices.tolist()) <= set(range(40))  # indices of the Subset, as its real rows are


@pytest.mark.slow
def test_a_distributed_sampler_shard_is_all_a_rank_generates_from(shapes):
    # no shuffle: the shard is the same every epoch (a shuffled one changes at set_epoch, and is re-published)
    sampler = DistributedSampler(shapes, num_replicas=2, rank=1, shuffle=False)
    shard = set(sampler)
    assert shard == set(range(1, 100, 2))
    loader = OnlineGenAugLoader(shapes, recipe="diffusemix", num_classes=4, batch_size=10, p_aug=1.0,
                                sampler=sampler, rank=1, pool_size=16, max_reuse=1, warmup=8, return_info=True,
                                **FAST)
    with loader:
        indices, _ = generated_sources(loader, 24)
    assert len(shard) == 50 and set(indices.tolist()) <= shard


@pytest.mark.slow
def test_a_weighted_sampler_with_a_zero_weight_class_never_generates_from_it(shapes):
    labels = np.array([shapes.sample_params(i).label for i in range(len(shapes))])
    weights = np.where(labels == 2, 0.0, 1.0)
    sampler = WeightedRandomSampler(weights.tolist(), num_samples=len(shapes), replacement=True)
    loader = OnlineGenAugLoader(shapes, recipe="diffusemix", num_classes=4, batch_size=10, p_aug=1.0,
                                sampler=sampler, pool_size=16, max_reuse=1, warmup=8, return_info=True, **FAST)
    with loader:
        indices, served_labels = generated_sources(loader, 24)
    assert not (labels[indices] == 2).any() and not (served_labels == 2).any()
    assert set(served_labels.tolist()) == {0, 1, 3}  # the other classes are all drawn


# ---------------------------------------------------------------------------------------------- rejection
@pytest.fixture(scope="module")
def nan_generator(tmp_path_factory):
    """A real pipeline folder whose VAE decoder outputs NaN (as an fp16 overflow does)."""
    from diffusers import AutoencoderKL

    path = save_tiny_pipeline(tmp_path_factory.mktemp("nan") / "pipe", task="instruct-pix2pix")
    vae = AutoencoderKL.from_pretrained(os.path.join(path, "vae"))
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(float("nan"))
    vae.save_pretrained(os.path.join(path, "vae"))
    return path


@pytest.mark.slow
def test_a_nan_producing_generator_is_dropped_and_counted_never_served(shapes, nan_generator):
    options = {**FAST, "generator": nan_generator}
    loader = OnlineGenAugLoader(shapes, recipe="diffusemix", num_classes=4, batch_size=10, p_aug=1.0,
                                pool_size=8, max_reuse=1, **options)
    with loader:
        assert wait_until(lambda: loader.stats()["rejected"].get(NON_FINITE, 0) >= 8)
        batches = list(loader)
        stats = loader.stats()
    assert stats["generated"] == 0 and stats["pool_ready"] == 0 and stats["produced"] == 0
    assert stats["misses"] == stats["real"] == len(shapes)  # every coin asked for a pooled sample; none existed
    assert all(torch.isfinite(images).all() for images, _ in batches)


# -------------------------------------------------------------------------------------- prepare once
class PreparingDiffuseMix(DiffuseMix):
    """DiffuseMix whose ``prepare`` logs each call (one line per call, any process) and picks the prompt."""

    name = "test-preparing-diffusemix"

    def __init__(self, *, log_path: str, **options):
        super().__init__(**options)
        self.log_path = log_path

    def prepare_key(self):
        return {"log": self.log_path}

    def prepare(self, models, ctx):
        with open(self.log_path, "a") as log:
            log.write(f"{os.getpid()} rank {ctx.rank}\n")
        assert set(models) == {"edit"} and len(ctx.sources.indices) == 100
        return {"prompt_id": 3}

    def produce(self, models, batch, ctx):
        produced = super().produce(models, batch, ctx)
        produced.payload["prompt_id"][:] = ctx.state["prompt_id"]  # the state reached this producer
        return produced


@pytest.mark.slow
def test_prepare_runs_once_across_two_producers_and_a_restart(shapes, tmp_path):
    log = tmp_path / "prepare.log"
    recipe = PreparingDiffuseMix(log_path=str(log), num_inference_steps=1, generation_size=SIZE)
    options = {**FAST, "generator_devices": ["cpu", "cpu"]}
    del options["recipe_options"], options["generation_size"]
    loader = OnlineGenAugLoader(shapes, recipe=recipe, num_classes=4, batch_size=10, p_aug=1.0, pool_size=16,
                                max_reuse=1, warmup=8, return_info=True, **options)
    with loader:
        assert wait_until(lambda: loader.stats()["produced"] >= 8)
        victim = loader.producers.pids[0]
        os.kill(victim, signal.SIGKILL)
        serve_until(loader, lambda: loader.stats()["producer_restarts"] >= 1)
        assert loader.producers.pids[0] != victim
        restarted = loader.stats()["produced"]
        serve_until(loader, lambda: loader.stats()["produced"] >= restarted + 8)
        assert wait_until(lambda: loader.stats()["pool_ready"] >= 4)
        _, _, info = next(iter(loader))
    assert len(log.read_text().splitlines()) == 1
    generated = info["generated"].cpu()
    assert generated.any() and (info["prompt_id"].cpu()[generated] == 3).all()


# ---------------------------------------------------------------------------------- switching recipes
def test_switching_a_generating_config_to_a_batch_time_recipe_keeps_working(shapes, caplog):
    config = dict(num_classes=4, batch_size=10, image_size=SIZE, generator="tiny", generator_devices=["cpu"],
                  generation_size=SIZE, generator_batch_size=4, compile_unet=False, warmup=0, num_workers=0,
                  progress=False)
    with caplog.at_level(logging.INFO, logger="onlineaug"):
        loader = OnlineGenAugLoader(shapes, recipe="cutmix", **config)
    with loader:
        images, targets = next(iter(loader))
        assert loader._resources.producers is None  # nothing generates
    assert images.shape == (10, 3, SIZE, SIZE)
    torch.testing.assert_close(targets.sum(1), torch.ones(10))
    assert any("cutmix" in r.getMessage() and "generation_size" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"recipe 'cutmix' has no option\(s\) \['num_inference_steps'\]; its "
                                         r"options are: alpha"):
        OnlineGenAugLoader(shapes, recipe="cutmix", recipe_options={"num_inference_steps": 2}, **config)


def test_the_tiny_generator_defaults_the_generation_size_to_the_training_size(shapes):
    loader = OnlineGenAugLoader(shapes, recipe="genmix", num_classes=4, image_size=SIZE, generator="tiny",
                                num_workers=0, progress=False)
    try:
        assert loader.recipe.generation_size == SIZE  # GenMix's own default is 512 px: nothing on a CPU
    finally:
        loader.close()


# ------------------------------------------------------------------------------- two models in one producer
class FilteredDiffuseMix(DiffuseMix):
    """DiffuseMix with a CLIP filter that keeps, on purpose, only the better half of each batch."""

    name = "test-filtered-diffusemix"
    reject_reasons = (NON_FINITE, "clip_filter")

    def model_roles(self):
        from onlineaug.models import ModelRole

        return {**super().model_roles(), "filter": ModelRole("clip", "openai/clip-vit-base-patch32")}

    def produce(self, models, batch, ctx):
        produced = super().produce(models, batch, ctx)  # the edit; NaN rows already rejected
        embedder = models["filter"]
        scores = embedder.embed_images(produced.payload["generated"]) @ embedder.embed_texts(["a photo"]).T
        keep = torch.zeros(len(scores), dtype=torch.bool)
        keep[scores.flatten().argsort(descending=True)[:len(scores) // 2]] = True
        rows = produced.rows[keep]
        return Produced({k: v[keep] for k, v in produced.payload.items()}, rows=rows,
                        rejected={**produced.rejected, "clip_filter": produced.rows[~keep]})


@pytest.mark.slow
def test_two_models_in_one_producer_and_the_filter_rejections_are_counted(shapes):
    recipe = FilteredDiffuseMix(num_inference_steps=1, generation_size=SIZE)
    options = {k: v for k, v in FAST.items() if k not in ("recipe_options", "generation_size")}
    loader = OnlineGenAugLoader(shapes, recipe=recipe, num_classes=4, batch_size=10, p_aug=1.0, pool_size=16,
                                max_reuse=1, return_info=True, **options)
    with loader:
        serve_until(loader, lambda: loader.stats()["produced"] >= 8)
        stats = loader.stats()
    # each batch of 4 jobs: 2 kept, 2 rejected by the filter (never retried: max_retries = 0)
    # (a snapshot may fall between a step's pool writes and its rejection counts)
    assert stats["rejected"]["clip_filter"] in (stats["produced"], stats["produced"] - 2)
    assert stats["rejected"][NON_FINITE] == 0
