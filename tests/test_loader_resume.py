"""state_dict() / load_state_dict(): a loader restarted from a mid-epoch state continues the same real-sample
stream and batch-time parameters as an uninterrupted run, across epoch boundaries, without loading the batches
already served; states from other settings and samplers whose order cannot be saved are refused clearly."""

import io
import logging
import re

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, Sampler, SubsetRandomSampler

from onlineaug import OnlineGenAugLoader
from onlineaug.datasets import SyntheticShapes
from onlineaug.seeding import derive_seed

SIZE = 16
LENGTH = 40
BATCH = 6  # 7 batches per epoch, the last one of 4


@pytest.fixture(scope="module")
def shapes():
    return SyntheticShapes(num_classes=4, size=SIZE, length=LENGTH, seed=0)


def make(dataset, **overrides):
    options = dict(recipe="cutmix", num_classes=4, batch_size=BATCH, image_size=SIZE, num_workers=0, progress=False,
                   return_info=True, seed=3)
    options.update(overrides)
    return OnlineGenAugLoader(dataset, **options)


def collect(batches):
    return [(images.clone(), targets.clone(), {k: v.clone() for k, v in info.items()}) for images, targets, info in
            batches]


def uninterrupted(dataset, epochs, **overrides):
    loader = make(dataset, **overrides)
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out.append(collect(loader))
    return out


def through_a_file(state):
    """What a checkpoint does to the state: torch.save, then torch.load (weights_only, torch's default)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_batches(expected, got):
    assert len(got) == len(expected)
    for (images, targets, info), (images2, targets2, info2) in zip(expected, got):
        torch.testing.assert_close(images2, images, rtol=0, atol=0)
        torch.testing.assert_close(targets2, targets, rtol=0, atol=0)
        assert info2.keys() == info.keys()
        for key in info:
            assert torch.equal(info2[key], info[key]), key


def batch_noise(images):
    """A batch transform that draws from torch's global generator (as kornia does): seeded per batch."""
    return images + 0.01 * torch.rand_like(images)


@pytest.mark.parametrize("recipe, prefetch, workers, transforms", [
    ("cutmix", 2, 0, None),  # batches assembled ahead: the state is the one of the batches handed out
    ("mixup", 0, 2, batch_noise),  # DataLoader workers fetch ahead; the transforms' seeds follow the batch number
])
def test_a_mid_epoch_state_continues_exactly_where_the_run_stopped(shapes, recipe, prefetch, workers, transforms):
    settings = dict(recipe=recipe, prefetch=prefetch, num_workers=workers, batch_transforms=transforms)
    expected = uninterrupted(shapes, 3, **settings)
    first = make(shapes, **settings)
    first.set_epoch(0)
    collect(first)
    first.set_epoch(1)
    for served, _ in enumerate(first, start=1):
        if served == 3:
            state = through_a_file(first.state_dict())
            break
    assert state["position"]["epoch"] == 1 and state["position"]["batches_in_epoch"] == 3
    assert state["counts"]["batches"] == 7 + 3 and state["counts"]["real"] == LENGTH + 3 * BATCH

    second = make(shapes, **settings)
    second.load_state_dict(state)
    second.set_epoch(1)  # the saved epoch: the position is kept
    assert_same_batches(expected[1][3:], collect(second))
    assert_same_batches(expected[2], collect(second))  # the next pass is epoch 2, as without the restart
    stats = second.stats()
    assert stats["batches"] == 3 * 7 and stats["real"] == 3 * LENGTH


def test_a_state_taken_at_the_end_of_an_epoch_starts_the_next_one(shapes):
    expected = uninterrupted(shapes, 2)
    first = make(shapes)
    collect(first)  # epoch 0, whole
    state = first.state_dict()
    assert state["position"] is None and state["epoch"] == 0
    second = make(shapes)
    second.load_state_dict(state)
    assert_same_batches(expected[1], collect(second))  # no set_epoch: the next pass is epoch 1


def test_a_state_at_the_last_batch_of_an_epoch_is_a_whole_epoch(shapes):
    first = make(shapes)
    for _ in first:  # the state inside the loop body of the last batch
        state = first.state_dict()
    assert state["position"] is None  # nothing left of epoch 0
    second = make(shapes)
    second.load_state_dict(state)
    assert_same_batches(uninterrupted(shapes, 2)[1], collect(second))


class CountingShapes(SyntheticShapes):
    """SyntheticShapes that counts the items read (the batches skipped on resume must not be)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = 0

    def __getitem__(self, index):
        self.reads += 1
        return super().__getitem__(index)


def test_resuming_loads_no_sample_of_the_batches_already_served():
    dataset = CountingShapes(num_classes=4, size=SIZE, length=LENGTH, seed=0)
    first = make(dataset)
    iterator = iter(first)
    for _ in range(5):
        next(iterator)
    state = first.state_dict()
    dataset.reads = 0
    second = make(dataset)
    second.load_state_dict(state)
    rest = collect(second)
    assert len(rest) == 2 and dataset.reads == BATCH + (LENGTH - 6 * BATCH)  # batches 6 and 7 only


def test_states_of_other_settings_are_refused_with_what_differs(shapes):
    first = make(shapes)
    next(iter(first))
    state = first.state_dict()
    for overrides, difference in (
            ({"batch_size": 8}, "batch_size: saved 6, this loader 8"),
            ({"seed": 4}, "seed: saved 3, this loader 4"),
            ({"recipe": "mixup"}, "recipe: saved 'cutmix', this loader 'mixup'")):
        with pytest.raises(ValueError, match=re.escape(difference)) as error:
            make(shapes, **overrides).load_state_dict(state)
        assert "Build the loader with the saved settings" in str(error.value)
    other = SyntheticShapes(num_classes=4, size=SIZE, length=LENGTH + 8, seed=0)
    with pytest.raises(ValueError, match=re.escape("dataset_length: saved 40, this loader 48")):
        make(other).load_state_dict(state)
    make(shapes, p_aug=0.25).load_state_dict(state)  # how much is mixed may change between runs
    with pytest.raises(TypeError, match="takes what OnlineGenAugLoader.state_dict"):
        make(shapes).load_state_dict({"epoch": 1})


class StatefulOrder(Sampler):
    """A sampler in torchdata's convention: its state after n indices, loaded before the next iteration, makes the
    iteration continue after them (it skips them itself). Its order is its own seeded permutation."""

    def __init__(self, length, seed):
        self.length, self.seed, self.yielded, self.next_yielded = length, seed, 0, None

    def __len__(self):
        return self.length

    def __iter__(self):
        order = np.random.default_rng(self.seed).permutation(self.length).tolist()
        start, self.next_yielded = self.next_yielded or 0, None
        self.yielded = start
        for index in order[start:]:
            self.yielded += 1
            yield index

    def state_dict(self):
        return {"yielded": self.yielded}

    def load_state_dict(self, state):
        self.next_yielded = state["yielded"]


@pytest.mark.parametrize("sampler_of", [
    lambda: SubsetRandomSampler(range(0, LENGTH, 2), generator=torch.Generator().manual_seed(5)),  # its generator
    lambda: StatefulOrder(LENGTH, seed=1),  # its own state_dict
], ids=["generator", "stateful"])
def test_a_users_sampler_with_its_own_state_continues_too(shapes, sampler_of):
    reference = make(shapes, sampler=sampler_of(), prefetch=2)
    expected = [collect(reference), collect(reference)]
    first = make(shapes, sampler=sampler_of(), prefetch=2)
    collect(first)
    iterator = iter(first)
    for _ in range(2):
        next(iterator)
    state = through_a_file(first.state_dict())
    second = make(shapes, sampler=sampler_of(), prefetch=2)
    second.load_state_dict(state)
    assert_same_batches(expected[1][2:], collect(second))


class OwnOrder(Sampler):
    def __init__(self, length):
        self.length = length

    def __len__(self):
        return self.length

    def __iter__(self):
        return iter(range(self.length - 1, -1, -1))


def test_samplers_whose_order_cannot_be_saved_are_refused_with_what_to_change(shapes):
    loader = make(shapes, sampler=RandomSampler(shapes))
    next(iter(loader))
    with pytest.raises(TypeError, match=re.escape("RandomSampler(generator=None): it draws from torch's global "
                                                  "random state. Pass it a generator")):
        loader.state_dict()
    loader = make(shapes, sampler=OwnOrder(LENGTH))
    next(iter(loader))
    with pytest.raises(TypeError, match="cannot save the order of a OwnOrder sampler: it has no state_dict"):
        loader.state_dict()


def test_set_epoch_of_another_epoch_drops_the_saved_position(shapes, caplog):
    first = make(shapes)
    iterator = iter(first)
    next(iterator)
    state = first.state_dict()
    second = make(shapes)
    second.load_state_dict(state)
    caplog.set_level(logging.WARNING, logger="onlineaug")
    second.set_epoch(4)
    assert "set_epoch(4) after load_state_dict of a state saved at batch 1 of epoch 0" in caplog.text
    assert_same_batches(uninterrupted(shapes, 5)[4], collect(second))


@pytest.mark.slow  # a producer process: the first generative loader in a process imports diffusers (20-35 s)
def test_a_generative_loader_resumes_its_real_stream_parameters_and_counters(shapes):
    """GenMix with a producer: which rows are generated depends on producer timing, but the coins (saved after the
    batches handed out, not after the three assembled ahead), the real indices of the rows served real in both runs,
    the batch-time draws made for every row (the fractal index) and the counters continue."""
    settings = dict(recipe="genmix", generation_size=SIZE, prefetch=3, pool_size=4, generator_batch_size=2,
                    recipe_options={"num_inference_steps": 1}, resize="squash", warmup=2)
    first = make(shapes, **settings)
    with first:
        expected = []
        for images, targets, info in first:
            expected.append((images, targets, info))
            if len(expected) == 2:
                state = through_a_file(first.state_dict())
        served = first.stats()
    coins = np.random.default_rng(derive_seed(3, "replace", 0, 0))
    for _ in range(2):
        coins.random(BATCH)  # one draw per row of each batch handed out
    assert state["position"]["rng"]["coins"] == coins.bit_generator.state
    assert state["counts"]["batches"] == 2 and state["pool_counters"]["produced"] >= 2  # warmup=2

    second = make(shapes, **settings)
    second.load_state_dict(state)
    with second:
        rest = collect(second)
        stats = second.stats()
    assert len(rest) == len(expected) - 2
    for (_, _, info), (_, _, info2) in zip(expected[2:], rest):
        real = ~info["generated"] & ~info2["generated"]
        assert torch.equal(info2["index"][real], info["index"][real])
        assert torch.equal(info2["fractal_index"], info["fractal_index"])
    assert stats["batches"] == served["batches"] and stats["real"] + stats["generated"] == LENGTH
    assert stats["produced"] >= state["pool_counters"]["produced"]  # continued from the saved run's
    assert sum(stats["generated_per_class"]) == stats["generated"]
