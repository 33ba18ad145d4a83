"""OnlineGenAugLoader end to end: real producer processes with the tiny generator, failures, cleanup."""

import gc
import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from onlineaug import OnlineGenAugLoader, ProducerError
from onlineaug.datasets import SyntheticShapes
from onlineaug.generators import GeneratorNotFoundError
from onlineaug.recipes import register_recipe
from onlineaug.recipes.diffusemix import DiffuseMix
from waiting import wait_until

SIZE = 32
# resize="squash": SyntheticShapes images are already SIZE x SIZE, so real rows are the dataset's images exactly
TINY = dict(generator="tiny", generator_devices=["cpu"], image_size=SIZE, generation_size=SIZE,
            recipe_options={"num_inference_steps": 2}, generator_batch_size=2, num_workers=0, progress=False,
            resize="squash")


def segments_of(loader):
    spec = loader.pool.spec
    return [os.path.join("/dev/shm", spec.data_name), os.path.join("/dev/shm", spec.control_name)]


@pytest.fixture(scope="module")
def shapes():
    return SyntheticShapes(num_classes=10, size=SIZE, length=64, seed=0)


@pytest.mark.slow
def test_genmix_end_to_end_with_a_real_producer(shapes, device):
    loader = OnlineGenAugLoader(shapes, recipe="genmix", num_classes=10, batch_size=8, p_aug=0.5, pool_size=16,
                                max_reuse=4, seed=0, warmup=4, device=device, **TINY)
    with loader:
        assert len(loader) == 8 and loader.dataset is shapes
        batches = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches += list(loader)
        stats = loader.stats()
        files = segments_of(loader)
        assert all(os.path.exists(f) for f in files)
    assert not any(os.path.exists(f) for f in files)  # close() freed every segment
    for images, targets in batches:
        assert images.shape == (8, 3, SIZE, SIZE) and images.dtype == torch.float32 and images.device == device
        assert targets.shape == (8, 10)
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        assert ((targets == 0) | (targets == 1)).all()  # GenMix preserves labels: one-hot targets
    for key in ("real", "generated", "misses", "pool_ready", "produced", "producer_restarts", "gen_images_per_s"):
        assert key in stats
    assert stats["real"] + stats["generated"] == 16 * 8
    assert stats["generated"] >= 4  # warmup filled the pool before the first batch
    assert stats["produced"] >= 4 and stats["gen_images_per_s"] > 0
    assert stats["fresh"] + stats["reused"] == stats["generated"]
    assert stats["producer_restarts"] == 0


class ExplodingRecipe(DiffuseMix):
    """A recipe whose generator step fails, to check that producer errors reach the trainer."""

    name = "test-exploding"

    def produce(self, models, batch, ctx):
        raise RuntimeError("boom from inside the producer")


register_recipe(ExplodingRecipe)


def test_a_producer_exception_reaches_the_trainer_with_its_traceback(shapes):
    loader = OnlineGenAugLoader(shapes, recipe="test-exploding", num_classes=10, batch_size=8, pool_size=8,
                                warmup=1, warmup_timeout=120, **TINY)
    with pytest.raises(ProducerError) as info:
        with loader:
            next(iter(loader))
    message = str(info.value)
    assert "producer 0 (generator device cpu) failed" in message
    assert "boom from inside the producer" in message and "in produce" in message  # the remote traceback
    assert loader.pool is None  # closed by the with-block


def test_after_a_producer_error_the_loader_does_not_carry_on_without_producers(shapes):
    loader = OnlineGenAugLoader(shapes, recipe="test-exploding", num_classes=10, batch_size=8, pool_size=8,
                                warmup=1, warmup_timeout=120, **TINY)
    try:
        with pytest.raises(ProducerError):
            next(iter(loader))
        with pytest.raises(RuntimeError, match="producers were stopped after an earlier error .* create a new loader"):
            next(iter(loader))
    finally:
        loader.close()


@pytest.mark.slow
def test_a_killed_producer_is_restarted_while_batches_keep_coming(shapes):
    loader = OnlineGenAugLoader(shapes, recipe="genmix", num_classes=10, batch_size=8, pool_size=8, warmup=2,
                                max_restarts=2, **TINY)
    with loader:
        iterator = iter(loader)
        next(iterator)
        old_pid = loader.producers.pids[0]
        os.kill(old_pid, signal.SIGKILL)
        served = 0
        deadline = time.monotonic() + 60
        while loader.stats()["producer_restarts"] == 0 and time.monotonic() < deadline:
            try:
                images, targets = next(iterator)
            except StopIteration:
                iterator = iter(loader)
                continue
            served += 1
            assert torch.isfinite(images).all()
        stats = loader.stats()
        assert stats["producer_restarts"] == 1 and served >= 1
        assert loader.producers.pids[0] != old_pid
        produced = stats["produced"]
        assert wait_until(lambda: loader.stats()["produced"] > produced, timeout=90)  # the new one produces


def test_the_restart_limit_raises_a_clear_error(shapes):
    loader = OnlineGenAugLoader(shapes, recipe="genmix", num_classes=10, batch_size=8, pool_size=8,
                                max_restarts=0, **TINY)
    with loader:
        os.kill(loader.producers.pids[0], signal.SIGKILL)
        assert wait_until(lambda: not loader.producers.is_alive(0), timeout=10)
        with pytest.raises(RuntimeError, match=r"producer 0 \(device cpu\) died with exit code -9, and 0 restarts in "
                                               r"the last 3600 s used up the budget \(max_restarts=0 per "
                                               r"restart_window_s=3600\)"):
            for _ in loader:
                pass


def test_segments_are_freed_on_garbage_collection(shapes):
    loader = OnlineGenAugLoader(shapes, recipe="genmix", num_classes=10, batch_size=8, pool_size=8, **TINY)
    loader.start()
    files = segments_of(loader)
    assert all(os.path.exists(f) for f in files)
    del loader
    gc.collect()
    assert not any(os.path.exists(f) for f in files)


KILLED_TRAINER = textwrap.dedent("""
    import os, sys, time
    import torch
    from onlineaug import OnlineGenAugLoader
    from onlineaug.datasets import SyntheticShapes
    if sys.argv[2] == "large":  # a launch record of about 60 MB: the trainer dies while it is still being written
        images = torch.randint(0, 256, (20000, 3, 32, 32), dtype=torch.uint8)
        dataset = torch.utils.data.TensorDataset(images, torch.arange(20000) % 10)
    else:
        dataset = SyntheticShapes(num_classes=10, size=32, length=64)
    loader = OnlineGenAugLoader(dataset, recipe="genmix",
                                num_classes=10, batch_size=8, image_size=32, generation_size=32, pool_size=8,
                                num_workers=0, recipe_options={"num_inference_steps": 2}, progress=False)
    loader.start()
    child = 0
    if sys.argv[1] == "fork":  # like a DataLoader worker: it inherits the producers' stdin pipes, so no EOF
        child = os.fork()
        if child == 0:
            time.sleep(600)
            os._exit(0)
    spec = loader.pool.spec
    print(spec.data_name, spec.control_name, loader.producers.pids[0], child, flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("forked_child, dataset", [(False, "small"), (True, "small"), (False, "large")])
def test_segments_and_producers_go_away_when_the_trainer_is_killed(forked_child, dataset):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    trainer = subprocess.Popen([sys.executable, "-c", KILLED_TRAINER, "fork" if forked_child else "plain", dataset],
                               stdout=subprocess.PIPE, text=True, env=env)
    child_pid = 0
    try:
        data_name, control_name, producer_pid, child_pid = trainer.stdout.readline().split()
        child_pid = int(child_pid)
        files = [os.path.join("/dev/shm", data_name), os.path.join("/dev/shm", control_name)]
        assert all(os.path.exists(f) for f in files)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()

        def producer_gone():
            try:
                os.kill(int(producer_pid), 0)
            except ProcessLookupError:
                return True
            with open(f"/proc/{producer_pid}/stat") as stat:  # a zombie awaiting its reaper counts as gone
                return stat.read().split()[2] == "Z"

        assert wait_until(lambda: not any(os.path.exists(f) for f in files), timeout=15)
        assert wait_until(producer_gone, timeout=15)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        if child_pid:
            os.kill(child_pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------ bad input
class Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def truncated_png():
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8) + 100).save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()[:60]))  # header parses; pixel data is cut off


@pytest.mark.parametrize("item, error, message", [
    (("not an image", 1), TypeError, r"dataset item 0: expected an image .* got a str"),
    ((torch.zeros(3, 8, 8, dtype=torch.uint8), "cat"), TypeError, r"expected an integer class label .* got a str"),
    ((torch.zeros(3, 8, 8, dtype=torch.uint8), 12), ValueError, r"label 12 is out of range for num_classes=10"),
    ((torch.full((3, 8, 8), 3.0), 1), ValueError, r"float image must hold values in \[0, 1\]"),
    ((torch.zeros(5, 8, 8, dtype=torch.uint8),), TypeError, r"expected an \(image, label\) pair"),
])
def test_bad_dataset_items_give_clear_errors(item, error, message):
    loader = OnlineGenAugLoader(Items([item]), recipe="none", num_classes=10, batch_size=1, image_size=8,
                                num_workers=0)
    with pytest.raises(error, match=message):
        next(iter(loader))


def test_a_corrupt_image_names_the_item():
    loader = OnlineGenAugLoader(Items([(truncated_png(), 1)]), recipe="none", num_classes=10, batch_size=1,
                                image_size=8, num_workers=0)
    with pytest.raises(ValueError, match=r"dataset item 0: the image could not be decoded .*corrupt or truncated"):
        next(iter(loader))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(recipe="no-such-recipe"), ValueError, r"unknown recipe 'no-such-recipe'; available recipes: .*genmix"),
    (dict(num_classes=7), ValueError, r"num_classes=7 but the dataset has 10 classes"),
    (dict(pool_size=0), ValueError, r"argument pool_size=0 is invalid: expected an int >= 1"),
    (dict(pool_size=10**9), MemoryError, r"the sample pool needs [\d,]+ bytes of shared memory"),
    (dict(p_aug=1.5), ValueError, r"argument p_aug=1.5 is invalid: expected a number in \[0.0, 1.0\]"),
    (dict(p_aug="0.5"), TypeError, r"argument p_aug='0.5' is invalid: expected a number"),
    (dict(p_aug=None), TypeError, r"argument p_aug=None is invalid: expected a number"),
    (dict(generator_devices=None), TypeError, r"argument generator_devices=None is invalid: expected a list of devices"),
    (dict(mean="abc"), TypeError, r"argument mean='abc' is invalid: expected 3 numbers"),
    (dict(std=(0.2, 0.2, 0)), ValueError, r"argument std\[2\]=0 is invalid: expected a number > 0.0"),
    (dict(rank="a"), TypeError, r"argument rank='a' is invalid: expected an int"),
    (dict(compile_unet="yes"), ValueError, r"argument compile_unet='yes' is invalid: expected one of \[False, True"),
    (dict(backend="cuda"), ValueError, r"argument backend='cuda' is invalid: expected one of \['auto', 'triton', 'torch'\]"),
    (dict(recipe_options={"guidance_scale": "high"}), TypeError,
     r"recipe 'genmix': option guidance_scale='high' is invalid: expected a number"),
    (dict(recipe_options={"bogus": 1}), ValueError, r"recipe 'genmix' has no option\(s\) \['bogus'\]; its options are"),
    (dict(models={"filter": "tiny"}), ValueError, r"models names unknown roles \['filter'\]; this recipe's roles: edit"),
    (dict(device="cuda:0"), ValueError, r"asks for CUDA but torch.cuda.is_available\(\) is False"),
    (dict(warmup=100, pool_size=10), ValueError, r"warmup=100 can never be reached with pool_size=10"),
])
def test_bad_loader_arguments_give_clear_errors(shapes, kwargs, error, message):
    if kwargs.get("device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    arguments = dict(recipe="genmix", num_classes=10, batch_size=8, **TINY)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        OnlineGenAugLoader(shapes, **arguments)


def test_a_missing_weights_folder_says_how_to_get_the_weights(shapes, tmp_path):
    arguments = dict(TINY, generator=str(tmp_path / "no-such-pipeline"))
    with pytest.raises(GeneratorNotFoundError, match=r"(?s)huggingface-cli download.*HF_HOME"):
        OnlineGenAugLoader(shapes, recipe="genmix", num_classes=10, batch_size=8, **arguments)


def test_unpicklable_datasets_are_refused_up_front():
    class Local(Items):  # a class local to a function cannot be pickled
        pass

    dataset = Local([(torch.zeros(3, 8, 8, dtype=torch.uint8), 0)])
    with pytest.raises(TypeError, match="the dataset must be picklable"):
        OnlineGenAugLoader(dataset, recipe="genmix", num_classes=10, batch_size=1, **TINY)


def test_batches_are_deterministic_by_seed_and_epoch(shapes, device):
    def first_batch(seed, epoch, rank=0):
        loader = OnlineGenAugLoader(shapes, recipe="cutmix", num_classes=10, batch_size=8, image_size=SIZE,
                                    p_aug=1.0, seed=seed, num_workers=0, device=device, rank=rank)
        loader.set_epoch(epoch)
        return next(iter(loader))

    a, b = first_batch(0, 0), first_batch(0, 0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a[0], first_batch(1, 0)[0])
    assert not torch.equal(a[0], first_batch(0, 1)[0])
    assert not torch.equal(a[0], first_batch(0, 0, rank=1)[0])  # distributed ranks draw different batches


README_SNIPPET = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from onlineaug import OnlineGenAugLoader
    from onlineaug.datasets import SyntheticShapes

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 10))
    epochs = 1
    def soft_cross_entropy(logits, targets):
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()

    train_set = SyntheticShapes(num_classes=10, size=64, length=128, seed=0)   # or any map-style Dataset
    loader = OnlineGenAugLoader(
        train_set, recipe="genmix", num_classes=10, batch_size=64, image_size=64,
        generator="tiny",                  # or "timbrooks/instruct-pix2pix", or a local folder
        device="cpu", generator_devices=["cpu"],   # e.g. device="cuda:0", generator_devices=["cuda:1", "cuda:2"]
        p_aug=0.5, pool_size=256, max_reuse=8, num_workers=2, seed=0)
    with loader:
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for images, targets in loader:     # images: float (B,3,64,64) normalized, on `device`
                loss = soft_cross_entropy(model(images), targets)   # targets: (B,10) soft labels, rows sum to 1
                assert images.shape == (64, 3, 64, 64) and torch.allclose(targets.sum(1), torch.ones(64))
        print(loader.stats())
""")

MAIN_DATASET = textwrap.dedent("""
    import torch
    from onlineaug import OnlineGenAugLoader

    class Plain(torch.utils.data.Dataset):   # defined in the script: producers must import the script
        def __len__(self):
            return 16
        def __getitem__(self, index):
            return torch.full((3, 32, 32), index * 10, dtype=torch.uint8), index % 4

    if __name__ == "__main__":
        loader = OnlineGenAugLoader(Plain(), recipe="diffusemix", num_classes=4, batch_size=4, image_size=32,
                                    generation_size=32, recipe_options={"num_inference_steps": 1}, warmup=2,
                                    num_workers=0, pool_size=4, progress=False)
        with loader:
            next(iter(loader))
            print("produced", loader.stats()["produced"])
""")


def run_script(tmp_path, source, timeout=240):
    script = tmp_path / "train.py"
    script.write_text(source)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=tmp_path)


@pytest.mark.slow
def test_the_readme_snippet_runs_as_written_without_a_main_guard(tmp_path):
    result = run_script(tmp_path, README_SNIPPET)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'generated'" in result.stdout and "'misses'" in result.stdout


@pytest.mark.slow
def test_a_dataset_defined_in_the_users_script_reaches_the_producers(tmp_path):
    result = run_script(tmp_path, MAIN_DATASET)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split("produced")[-1]) >= 2


def test_stats_count_served_batches_not_those_assembled_ahead(shapes):
    loader = OnlineGenAugLoader(shapes, recipe="cutmix", num_classes=10, batch_size=8, image_size=SIZE,
                                num_workers=0, prefetch=3)
    iterator = iter(loader)
    next(iterator)  # four batches are assembled by now
    stats = loader.stats()
    assert stats["batches"] == 1 and stats["real"] + stats["generated"] == 8
    assert sum(1 for _ in iterator) == len(loader) - 1 and loader.stats()["batches"] == len(loader)


def test_using_a_closed_loader_mid_epoch_is_a_clear_error(shapes):
    loader = OnlineGenAugLoader(shapes, recipe="genmix", num_classes=10, batch_size=8, pool_size=8, **TINY)
    iterator = iter(loader)
    next(iterator)
    loader.close()
    with pytest.raises(RuntimeError, match="this loader was closed while iterating over it"):
        next(iterator)


def denormalize(images):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images.cpu() * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


@pytest.mark.slow
def test_generated_rows_are_the_pooled_original_over_its_edit(shapes, device):
    """With a hard top/bottom mask and no fractal, a generated row's top half is a dataset image of the row's
    label (the pooled original) and its bottom half is the edit; real rows are dataset images."""
    options = {"num_inference_steps": 2, "lam": 0.0, "blend_width": 0.0, "splits": ("top_bottom",),
               "flips": (False,)}
    loader = OnlineGenAugLoader(shapes, recipe="genmix", num_classes=10, batch_size=8, p_aug=0.5, pool_size=8,
                                warmup=4, device=device, **dict(TINY, recipe_options=options))
    originals = torch.stack([shapes[i][0] for i in range(len(shapes))])
    labels = torch.tensor([shapes[i][1] for i in range(len(shapes))])
    half = SIZE // 2
    generated_rows = 0
    with loader:
        for images, targets in loader:
            pixels, label_of_row = denormalize(images), targets.argmax(1).cpu()
            for row in range(8):
                whole = (originals == pixels[row]).flatten(1).all(1)
                top = (originals[:, :, :half] == pixels[row, :, :half]).flatten(1).all(1)
                if whole.any():  # a real sample
                    assert (labels[whole] == label_of_row[row]).all()
                    continue
                generated_rows += 1
                assert top.any(), "the top half of a generated row must be its (pooled) original"
                assert (labels[top] == label_of_row[row]).all(), "the target must be the original's label"
    assert generated_rows > 0 and generated_rows == loader.stats()["generated"]


def test_a_torn_read_keeps_the_real_sample(monkeypatch):
    from onlineaug.batching import BatchAssembler
    from onlineaug.pool import SamplePool
    from onlineaug.recipes import get_recipe

    recipe = get_recipe("diffusemix", generation_size=64)
    pool = SamplePool.create(recipe.pool_fields(8), num_slots=4, num_producers=1, max_reuse=8)
    try:
        for slot in range(4):
            pool.write(slot, {"original": np.full((3, 8, 8), 200, np.uint8), "generated": np.zeros((3, 8, 8), np.uint8),
                              "label": np.int64(9), "index": np.int64(0), "prompt_id": np.int64(0)})
        assembler = BatchAssembler(recipe, pool, device=torch.device("cpu"), image_size=8, batch_size=4, p_aug=1.0)
        real = torch.full((4, 3, 8, 8), 7, dtype=torch.uint8)
        read = pool.read

        def torn_on_slot_1(slot, seq, out):  # the copy lands, then the producer is seen to have started a write
            result = read(slot, seq, out)
            return None if slot == 1 else result

        monkeypatch.setattr(pool, "read", torn_on_slot_1)
        ready = assembler.assemble(real.clone(), torch.tensor([0, 1, 2, 3]), torch.arange(4), np.random.default_rng(0))
        generated = ready.batch.generated.tolist()
        assert generated.count(False) == 1 and ready.counts["misses"] == 1 and ready.counts["generated"] == 3
        kept = generated.index(False)
        assert (ready.batch.fields["original"][kept] == 7).all() and ready.batch.fields["label"][kept] == kept
        for row in (r for r in range(4) if generated[r]):
            assert (ready.batch.fields["original"][row] == 200).all() and ready.batch.fields["label"][row] == 9
    finally:
        pool.close()


def test_epochs_reshuffle_without_set_epoch_and_set_epoch_replays(shapes):
    loader = OnlineGenAugLoader(shapes, recipe="none", num_classes=10, batch_size=64, image_size=SIZE, num_workers=0)
    first, second = next(iter(loader))[0], next(iter(loader))[0]
    assert not torch.equal(first, second) and loader.epoch == 1
    loader.set_epoch(0)
    torch.testing.assert_close(next(iter(loader))[0], first, rtol=0, atol=0)


def test_a_sampler_works_with_the_default_arguments(shapes):
    sampler = torch.utils.data.SequentialSampler(shapes)
    loader = OnlineGenAugLoader(shapes, recipe="none", num_classes=10, batch_size=4, image_size=SIZE,
                                num_workers=0, sampler=sampler, resize="squash")
    images, _ = next(iter(loader))
    expected = torch.stack([shapes[i][0] for i in range(4)])
    torch.testing.assert_close(denormalize(images), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="either sampler or shuffle=True"):
        OnlineGenAugLoader(shapes, recipe="none", num_classes=10, sampler=sampler, shuffle=True)


def test_epochs_advance_a_distributed_sampler_too(shapes):
    sampler = torch.utils.data.DistributedSampler(shapes, num_replicas=2, rank=1, shuffle=True, seed=0)
    loader = OnlineGenAugLoader(shapes, recipe="none", num_classes=10, batch_size=32, image_size=SIZE,
                                num_workers=0, sampler=sampler)
    first, second = next(iter(loader))[0], next(iter(loader))[0]
    assert sampler.epoch == 1 and not torch.equal(first, second)


UNGUARDED_SCRIPT = textwrap.dedent("""
    import torch
    from onlineaug import OnlineGenAugLoader

    class Plain(torch.utils.data.Dataset):   # defined in the script, and no main guard below
        def __len__(self):
            return 16
        def __getitem__(self, index):
            return torch.zeros((3, 32, 32), dtype=torch.uint8), 0

    loader = OnlineGenAugLoader(Plain(), recipe="diffusemix", num_classes=4, batch_size=4, image_size=32,
                                generation_size=32, warmup=1, num_workers=0, pool_size=4, progress=False)
    with loader:
        next(iter(loader))
""")


@pytest.mark.slow
def test_a_script_without_a_main_guard_gets_a_clear_error(tmp_path):
    result = run_script(tmp_path, UNGUARDED_SCRIPT)
    assert result.returncode != 0
    assert "ProducerError" in result.stderr and 'if __name__ == "__main__":' in result.stderr


def test_a_recipe_whose_payload_is_all_real_fields_assembles_batch_after_batch(device):
    """E.g. a recipe that stores a replacement image and label only: no pool-only host buffers."""
    from onlineaug.batching import BatchAssembler
    from onlineaug.pool import Field, SamplePool
    from onlineaug.recipes import get_recipe

    recipe = get_recipe("cutmix")
    fields = {"image": Field((3, 8, 8), "uint8"), "label": Field((), "int64"), "index": Field((), "int64")}
    recipe.pool_fields = lambda image_size: fields  # this instance only
    pool = SamplePool.create(fields, num_slots=4, num_producers=1, max_reuse=8)
    try:
        for slot in range(4):
            pool.write(slot, {"image": np.full((3, 8, 8), 200, np.uint8), "label": np.int64(3), "index": np.int64(1)})
        assembler = BatchAssembler(recipe, pool, device=device, image_size=8, batch_size=4, p_aug=1.0)
        rng = np.random.default_rng(0)
        for size in (4, 4, 3):  # a short last batch too
            ready = assembler.assemble(torch.zeros(size, 3, 8, 8, dtype=torch.uint8), torch.zeros(size, dtype=torch.int64),
                                       torch.arange(size), rng)
            batch = ready.wait()
            assert batch.generated.all() and (batch.fields["image"] == 200).all() and (batch.fields["label"] == 3).all()
    finally:
        pool.close()
