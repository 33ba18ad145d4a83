"""What stats() shows beyond the counters (per-class generated counts, the recent miss rate, serves per sample), the
miss-rate warning (once, with what to change), and the log_every hook."""

import logging

import pytest
import torch

from onlineaug import OnlineGenAugLoader, flat_stats
from onlineaug.datasets import SyntheticShapes
from onlineaug.monitor import ServeMonitor, miss_rate_advice

import test_loader_misses  # noqa: F401 - registers "test-stalled-genmix" (a producer that never finishes)

SIZE = 16


def miss_rate_records(caplog):
    return [r for r in caplog.records if r.name == "onlineaug" and "were misses" in r.getMessage()]


def test_the_miss_rate_warning_fires_once_and_says_what_to_change(caplog):
    caplog.set_level(logging.WARNING, logger="onlineaug")
    dataset = SyntheticShapes(num_classes=4, size=SIZE, length=48, seed=0)
    loader = OnlineGenAugLoader(dataset, recipe="test-stalled-genmix", num_classes=4, batch_size=2, image_size=SIZE,
                                p_aug=0.5, pool_size=4, generator_batch_size=2, num_workers=0, progress=False,
                                recipe_options={"num_inference_steps": 1}, miss_window=5, warn_miss_rate=0.5)
    with loader:
        for step, _ in enumerate(loader, start=1):
            if step == 4:  # a window is 5 batches: not yet
                assert not miss_rate_records(caplog)
                assert loader.stats()["miss_rate"] == 1.0
        stats = loader.stats()
    assert stats["batches"] == 24 and stats["generated"] == 0 and stats["misses"] > 0
    records = miss_rate_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING  # once, over 24 batches of misses
    message = records[0].getMessage()
    assert "100% of the generated samples asked for over the last 5 batches were misses" in message
    assert "p_aug=0.5, max_reuse=8, 1 generator device(s)" in message
    assert "add generator devices, raise max_reuse or lower p_aug" in message
    assert "python -m onlineaug plan --measure" in message  # nothing made yet: no rate to plan with


def test_the_advice_gives_the_plans_numbers_for_the_measured_rates():
    message = miss_rate_advice(0.75, 50, p_aug=0.5, max_reuse=8, generators=1, trainer_images_per_s=100.0,
                               producer_images_per_s=2.0)
    # fresh needed = 0.5 x 100 / 8 = 6.25/s = 3.1 producers of 2/s -> 4; with 1: max_reuse = ceil(50 / 2) = 25,
    # or p_aug = 2 x 8 / 100 = 0.16
    assert message.startswith("75% of the generated samples asked for over the last 50 batches were misses")
    assert "so keeping both needs 4 generator devices" in message
    assert "with 1: max_reuse=25 keeps p_aug=0.5, or p_aug=0.16 keeps max_reuse=8" in message
    assert ("`python -m onlineaug plan --trainer-images-per-s 100.0 --producer-images-per-s 2 --p-aug 0.5 "
            "--max-reuse 8 --generator-gpus 1` prints the numbers") in message


def test_the_monitor_counts_per_class_and_over_its_window_only():
    monitor = ServeMonitor(num_classes=3, window=2, warn_above=0.5)
    monitor.record({"generated": 2, "misses": 2, "real": 2}, torch.tensor([2, 2]).numpy(), now=0.0)
    monitor.record({"generated": 1, "misses": 0, "real": 3}, torch.tensor([0]).numpy(), now=1.0)
    assert monitor.generated_per_class.tolist() == [1, 0, 2]
    assert monitor.miss_rate() == pytest.approx(2 / 5)  # 2 misses of 5 asked for
    assert monitor.samples_per_s() == pytest.approx(4.0)  # the second batch's 4 samples in 1 s
    assert not monitor.should_warn()
    monitor.record({"generated": 0, "misses": 3, "real": 4}, None, now=2.0)  # the first batch leaves the window
    assert monitor.miss_rate() == pytest.approx(3 / 4)
    assert monitor.should_warn() and not monitor.should_warn()  # once


def test_log_every_hands_the_stats_to_the_users_function(caplog):
    dataset = SyntheticShapes(num_classes=4, size=SIZE, length=40, seed=0)
    calls = []
    loader = OnlineGenAugLoader(dataset, recipe="cutmix", num_classes=4, batch_size=6, image_size=SIZE, num_workers=0,
                                progress=False, log_every=3, log_fn=lambda stats, step: calls.append((step, stats)))
    assert sum(1 for _ in loader) == 7
    assert [step for step, _ in calls] == [3, 6]
    assert [stats["batches"] for _, stats in calls] == [3, 6] and calls[1][1]["real"] == 36
    for key in ("generated_per_class", "miss_rate", "mean_serves", "store_samples", "store_bytes"):
        assert key in calls[0][1]
    flat = flat_stats(calls[1][1])
    assert flat["generated_per_class/3"] == 0 and flat["real"] == 36 and "rejected" not in flat
    assert all(isinstance(v, (int, float)) for v in flat.values())
    caplog.set_level(logging.INFO, logger="onlineaug")
    quiet = OnlineGenAugLoader(dataset, recipe="cutmix", num_classes=4, batch_size=6, image_size=SIZE, num_workers=0,
                               progress=False, log_every=7)
    list(quiet)
    assert [r.getMessage() for r in caplog.records if "batch 7:" in r.getMessage()] == [
        "onlineaug: batch 7: generated 0.0% (0), misses 0 (0% over the last 50 batches), 0 produced, pool 0/0 ready"]
    with pytest.raises(ValueError, match="pass log_every=N"):
        OnlineGenAugLoader(dataset, recipe="cutmix", num_classes=4, image_size=SIZE, log_fn=print)


def test_flat_stats_flattens_nested_counts():
    assert flat_stats({"a": 1, "rejected": {"clip_filter": 2}, "per": [3, 4], "name": "x", "ok": True}) == {
        "a": 1, "rejected/clip_filter": 2, "per/0": 3, "per/1": 4}
