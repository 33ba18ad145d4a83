"""A generative loader whose first batches served nothing generated logs why, once (issue: defaults that generate)."""

import logging
import time

import pytest

from onlineaug import OnlineGenAugLoader
from onlineaug.datasets import SyntheticShapes
from onlineaug.loader import ONLY_MISSES_BATCHES
from onlineaug.recipes import register_recipe
from onlineaug.recipes.genmix import GenMix

SIZE = 16


class StalledGenMix(GenMix):
    """GenMix whose producer never finishes a generation (a slow model on a slow device, to the trainer)."""

    name = "test-stalled-genmix"

    def produce(self, models, batch, ctx):
        time.sleep(600)


register_recipe(StalledGenMix)


def stalled_loader(p_aug):
    dataset = SyntheticShapes(num_classes=4, size=SIZE, length=ONLY_MISSES_BATCHES * 4 + 8, seed=0)
    return OnlineGenAugLoader(dataset, recipe="test-stalled-genmix", num_classes=4, batch_size=2, image_size=SIZE,
                              p_aug=p_aug, pool_size=4, generator_batch_size=2, num_workers=0, progress=False,
                              recipe_options={"num_inference_steps": 3})


def only_misses_records(caplog):
    return [r for r in caplog.records if r.name == "onlineaug" and "served only misses" in r.getMessage()]


@pytest.mark.slow  # the first generative loader in a process imports diffusers (10-30 s on a loaded CPU)
def test_only_misses_for_the_first_batches_is_logged_once_with_the_reason(caplog):
    caplog.set_level(logging.WARNING, logger="onlineaug")
    with stalled_loader(p_aug=1.0) as loader:
        for step, _ in enumerate(loader):
            if step == ONLY_MISSES_BATCHES - 2:  # not yet: one batch short of the threshold
                assert not only_misses_records(caplog)
        stats = loader.stats()
    assert stats["batches"] > ONLY_MISSES_BATCHES and stats["generated"] == 0
    records = only_misses_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert f"the first {ONLY_MISSES_BATCHES} batches served only misses ({ONLY_MISSES_BATCHES * 2} real samples" \
        in message
    assert "no producer has finished a generation yet" in message
    assert f"'tiny' at {SIZE} px, 3 denoising steps, 2 per call on cpu" in message  # the settings that decide speed
    assert "warmup=N" in message and "num_inference_steps" in message and "generator_devices" in message


def test_no_log_when_no_generated_sample_was_wanted(caplog):
    caplog.set_level(logging.WARNING, logger="onlineaug")
    with stalled_loader(p_aug=0.0) as loader:
        assert sum(1 for _ in loader) > ONLY_MISSES_BATCHES
        assert loader.stats()["misses"] == 0
    assert not only_misses_records(caplog)
