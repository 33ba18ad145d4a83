"""The on-disk sample store: complete tar shards, atomic under kills, keyed by settings; warm start and offline
training from it (store_policy="read"), sampler-respecting, with max_reuse counted across the run."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import numpy as np
import pytest
import torch
from torch.utils.data import SubsetRandomSampler

from onlineaug import OnlineGenAugLoader
from onlineaug.datasets import SyntheticShapes
from onlineaug.generate import fill_store
from onlineaug.pool import Field
from onlineaug.store import SampleStore, ShardWriter, read_shard

SIZE = 16
SHARD = 4
STORED = 8
TINY = dict(generator="tiny", generator_devices=["cpu"], image_size=SIZE, generation_size=SIZE,
            recipe_options={"num_inference_steps": 1}, generator_batch_size=2, num_workers=0, progress=False,
            resize="squash", store_shard_size=SHARD)


@pytest.fixture(scope="module")
def shapes():
    return SyntheticShapes(num_classes=4, size=SIZE, length=32, seed=0)


def make_loader(shapes, cache_dir, **overrides):
    options = dict(recipe="genmix", num_classes=4, batch_size=8, pool_size=4, max_reuse=2, seed=0,
                   cache_dir=cache_dir, **TINY)
    options.update(overrides)
    return OnlineGenAugLoader(shapes, **options)


@pytest.fixture(scope="module")
def store(shapes, tmp_path_factory):
    """A store of STORED genmix samples, made by the producer class the loader's producer processes run."""
    cache = str(tmp_path_factory.mktemp("cache"))
    loader = make_loader(shapes, cache)
    report = fill_store(loader, STORED, progress=False)
    loader.close()
    assert report["before"] == 0 and report["after"] == STORED
    return cache, loader.store_dir


def test_shards_are_complete_tar_files_that_the_standard_library_and_numpy_read(store, shapes):
    _, path = store
    names = sorted(n for n in os.listdir(path) if n.endswith(".tar"))
    assert len(names) == STORED // SHARD and not [n for n in os.listdir(path) if n.endswith(".tmp")]
    with open(os.path.join(path, "manifest.json")) as handle:
        manifest = json.load(handle)
    assert manifest["recipe"] == "genmix" and manifest["image_size"] == SIZE
    assert "num_inference_steps" in manifest["recipe_settings"] and "edit" in manifest["models"]
    for name in names:
        samples = {}
        with tarfile.open(os.path.join(path, name)) as tar:  # no onlineaug below: tarfile, json, numpy only
            for member in tar:
                key, _, kind = member.name.partition(".")
                data = tar.extractfile(member).read()
                value = json.loads(data) if kind == "json" else np.load(io.BytesIO(data), allow_pickle=False)
                samples.setdefault(key, {})[kind] = value
        assert len(samples) == SHARD
        for sample in samples.values():
            assert set(sample) == {"json"} | {f"{f}.npy" for f in manifest["fields"]}
            for field, spec in manifest["fields"].items():
                assert sample[f"{field}.npy"].shape == tuple(spec["shape"])
                assert sample[f"{field}.npy"].dtype == np.dtype(spec["dtype"])
            index = int(sample["index.npy"])
            assert sample["json"]["index"] == index and sample["json"]["label"] == int(sample["label.npy"])
            assert 0 <= index < len(shapes) and int(sample["label.npy"]) == shapes[index][1]  # GenMix keeps labels
            original = shapes[index][0].numpy()  # (3, S, S) uint8
            np.testing.assert_array_equal(sample["original.npy"], original)  # the source image, squashed = as is


WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from onlineaug.pool import Field
    from onlineaug.store import ShardWriter
    fields = {"index": Field((), "int64"), "label": Field((), "int64"), "image": Field((3, 4, 4), "uint8")}
    writer = ShardWriter(sys.argv[1], fields, shard_size=4)
    rows = {"index": np.arange(6), "label": np.arange(6) % 2, "image": np.full((6, 3, 4, 4), 7, np.uint8)}
    writer.append(rows)  # one shard sealed, two rows in the one being filled
    sys.stdout.write("appended\\n"); sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_writer_killed_mid_shard_leaves_no_torn_shard_and_the_next_writer_sweeps_its_file(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert result.returncode == -signal.SIGKILL and "appended" in result.stdout, result.stderr
    hidden = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert len(hidden) == 1 and hidden[0].endswith(".tar.tmp")  # the shard being filled: never visible
    fields = {"index": Field((), "int64"), "label": Field((), "int64"), "image": Field((3, 4, 4), "uint8")}
    store = SampleStore(str(tmp_path), fields)
    (shard,) = store.shards()
    rows = read_shard(shard, fields)
    np.testing.assert_array_equal(rows["index"], np.arange(4))
    assert (rows["image"] == 7).all()
    ShardWriter(str(tmp_path), fields, shard_size=4)  # a new writer on this host removes the dead one's file
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
    assert store.shards() == [shard]


def test_read_policy_serves_only_stored_samples_with_no_producer(store, shapes):
    cache, path = store
    stored = [read_shard(s, SampleStore.open(path, json.load(open(os.path.join(path, "manifest.json"))),
                                             create=False).fields) for s in sorted(SampleStore(path, {}).shards())]
    pairs = {(int(i), int(l)) for rows in stored for i, l in zip(rows["index"], rows["label"])}
    loader = make_loader(shapes, cache, store_policy="read", p_aug=1.0, return_info=True, max_reuse=8)
    with loader:
        assert loader.producers is None and loader.store_dir == path
        assert loader.stats()["pool_ready"] == 4 and loader.stats()["produced"] == 0  # full before any batch
        served = []
        for images, targets, info in loader:
            torch.testing.assert_close(targets.sum(1), torch.ones(len(targets)))
            generated = info["generated"]
            served += list(zip(info["index"][generated].tolist(), info["label"][generated].tolist()))
        stats = loader.stats()
    assert served and set(served) <= pairs  # every generated row is a stored one, with its stored label
    assert stats["generated"] == len(served) and stats["from_store"] >= 4


def test_stats_report_the_stores_size_and_what_was_served_per_class(store, shapes):
    cache, path = store
    loader = make_loader(shapes, cache, store_policy="read", p_aug=1.0, return_info=True, max_reuse=8)
    per_class = [0] * 4
    with loader:
        for _, _, info in loader:
            for label in info["label"][info["generated"]].tolist():
                per_class[label] += 1
        stats = loader.stats()
    shards = SampleStore(path, {}).shards()
    assert stats["store_samples"] == STORED and stats["store_bytes"] == sum(os.path.getsize(s) for s in shards)
    assert stats["generated_per_class"] == per_class and sum(per_class) == stats["generated"] > 0
    assert stats["mean_serves"] == pytest.approx(stats["generated"] / stats["fresh"])
    assert 1 <= stats["mean_serves"] <= 8  # max_reuse
    assert make_loader(shapes, None).stats()["store_samples"] == 0  # no cache_dir, no store


def test_other_settings_never_read_this_store(store, shapes):
    cache, path = store
    assert make_loader(shapes, cache).store_dir == path  # the same settings: the same store
    for overrides in ({"recipe_options": {"num_inference_steps": 2}}, {"image_size": 24, "generation_size": 24},
                      {"resize": "center_crop"}):
        other = make_loader(shapes, cache, **overrides)
        assert other.store_dir != path
        with pytest.raises(FileNotFoundError, match="holds no complete shard"):
            make_loader(shapes, cache, store_policy="read", **overrides)
    with pytest.raises(FileNotFoundError, match="holds no complete shard"):  # another dataset
        make_loader(SyntheticShapes(num_classes=4, size=SIZE, length=32, seed=1), cache, store_policy="read")
    with pytest.raises(ValueError, match="pass cache_dir"):
        make_loader(shapes, None, store_policy="read")
    with pytest.raises(ValueError, match="generates nothing"):
        make_loader(shapes, cache, recipe="cutmix", store_policy="read", recipe_options=None, generation_size=None)
    with pytest.raises(ValueError, match="store_policy"):
        make_loader(shapes, cache, store_policy="append")


def test_warm_start_respects_a_subset_sampler(store, shapes):
    cache, path = store
    fields = SampleStore.open(path, json.load(open(os.path.join(path, "manifest.json"))), create=False).fields
    indices = np.concatenate([read_shard(s, fields)["index"] for s in SampleStore(path, {}).shards()])
    subset = sorted(set(indices.tolist()))[: max(1, len(set(indices.tolist())) // 2)]
    inside = int(np.isin(indices, subset).sum())
    loader = make_loader(shapes, cache, store_policy="read", sampler=SubsetRandomSampler(subset), p_aug=1.0,
                         return_info=True, max_reuse=8, pool_size=8)
    with loader:
        pool = loader.pool
        ready = [int(pool.fields["index"][s]) for s in range(8) if pool.seq[s] > 0 and pool.seq[s] % 2 == 0]
        assert len(ready) == min(inside, 8) and set(ready) <= set(subset)
        for _, _, info in loader:
            assert set(info["index"].tolist()) <= set(subset)


def test_max_reuse_counts_serves_across_the_run(store, shapes):
    cache, _ = store
    loader = make_loader(shapes, cache, store_policy="read", p_aug=1.0, max_reuse=2, pool_size=4)
    with loader:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for _ in loader:
                time.sleep(0.02)  # let the feeder refill the slots served
            feeder = loader._resources.feeder
            if feeder.exhausted and loader.stats()["pool_ready"] == 0:
                break
        stats = loader.stats()
    # STORED samples, each served exactly max_reuse times over the run although the pool holds only 4
    assert stats["generated"] == STORED * 2
    assert stats["fresh"] == STORED and stats["reused"] == STORED
    assert stats["from_store"] >= STORED


def test_readwrite_warm_starts_before_any_generation(store, shapes):
    cache, _ = store
    loader = make_loader(shapes, cache, store_policy="readwrite")
    with loader:
        stats = loader.stats()
        assert loader.producers is not None  # then keeps generating
        assert stats["pool_ready"] == 4 and stats["produced"] == 0 and stats["from_store"] == 4
    write_only = make_loader(shapes, cache, store_policy="write")
    with write_only:
        assert write_only.stats()["pool_ready"] == 0


def test_generate_resumes_and_adds_new_samples(store, shapes):
    cache, path = store
    loader = make_loader(shapes, cache)
    fields = loader.recipe.pool_fields(SIZE)
    before = set(SampleStore(path, {}).shards())
    old = [read_shard(s, fields) for s in before]
    report = fill_store(loader, STORED + 2, progress=False)
    assert (report["before"], report["after"]) == (STORED, STORED + 2)
    assert fill_store(loader, STORED + 2, progress=False)["after"] == STORED + 2  # nothing left to do
    added = set(SampleStore(path, {}).shards()) - before
    new = [read_shard(s, fields) for s in added]
    new_images = np.concatenate([rows["generated"] for rows in new])
    old_images = np.concatenate([rows["generated"] for rows in old])
    assert len(new_images) == 2
    for image in new_images:  # seeded by the store's size: not a copy of an earlier sample
        assert not any(np.array_equal(image, o) for o in old_images)
    # leave the store as the other tests expect it
    for shard in added:
        os.unlink(shard)


def cli_shapes():
    """The dataset factory the command-line test names as ``test_store:cli_shapes``."""
    return SyntheticShapes(num_classes=4, size=SIZE, length=32, seed=0)


def test_generate_command_fills_a_store_the_loader_reads_and_resumes(tmp_path, capsys):
    from onlineaug.__main__ import main

    command = ["generate", "--recipe", "genmix", "--dataset", "test_store:cli_shapes", "--out", str(tmp_path),
               "--devices", "cpu", "--image-size", str(SIZE), "--resize", "squash", "--option",
               "num_inference_steps=1", "--batch-size", "2", "--shard-size", "2", "--no-progress"]
    assert main(command + ["--num-samples", "3"]) == 0
    assert "3 samples (3 new" in capsys.readouterr().out
    loader = make_loader(cli_shapes(), str(tmp_path), store_policy="read")  # the same settings: the same store
    store = SampleStore(loader.store_dir, loader.recipe.pool_fields(SIZE))
    assert [len(read_shard(s, store.fields)["index"]) for s in store.shards()] in ([2, 1], [1, 2])
    assert main(command + ["--num-samples", "4"]) == 0  # resumes: one more sample, not four
    assert "4 samples (1 new" in capsys.readouterr().out
    assert store.num_samples() == 4
    with loader:
        assert loader.stats()["pool_ready"] == 4 and loader.producers is None


@pytest.mark.slow
def test_producers_write_shards_and_one_killed_mid_shard_leaves_none_torn(tmp_path, shapes):
    loader = make_loader(shapes, str(tmp_path), store_policy="write", store_shard_size=3, pool_size=8, p_aug=1.0)
    with loader:
        path = loader.store_dir

        def filling():  # a complete shard and the producer's next one begun (3 rows per shard, 2 per step)
            names = os.listdir(path) if os.path.isdir(path) else []
            return [n for n in names if n.endswith(".tar")] and [n for n in names if n.endswith(".tmp")]

        deadline = time.monotonic() + 240
        while not filling() and time.monotonic() < deadline:
            for _ in loader:  # serve the pool: backpressure lets the producer go on
                pass
            time.sleep(0.05)
        assert filling(), "the producer wrote no shard in time"
        pid = loader.producers.pids[0]
        os.kill(pid, signal.SIGKILL)  # mid-shard: its next shard has rows in the temporary file
        assert wait_for_exit(pid)
        names = os.listdir(path)
    assert [n for n in names if n.endswith(".tmp")]  # the torn one: hidden, never read
    store = SampleStore(path, loader.recipe.pool_fields(SIZE))
    shards = store.shards()
    assert shards and all(len(read_shard(s, store.fields)["index"]) == 3 for s in shards)
    reader = make_loader(shapes, str(tmp_path), store_policy="read", pool_size=8)
    with reader:  # the next run reads every complete shard
        assert reader.stats()["pool_ready"] == min(8, 3 * len(shards))


def wait_for_exit(pid, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().split(") ")[-1].startswith("Z"):  # a zombie: dead, not yet reaped
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.02)
    return False
