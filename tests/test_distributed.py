"""Training under ``torchrun``: shards per rank, generator GPUs per rank, one voice per node, global counters.

The device rules are pure functions, tested here with made-up GPU counts; the rest runs in a real
``torchrun --nproc_per_node=2`` gloo group on the CPU (``tests/distributed_worker.py``).
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from onlineaug import OnlineGenAugLoader
from onlineaug.datasets import SyntheticShapes
from onlineaug.devices import assign_generator_devices, producer_threads, shared_generator_gpus
from onlineaug.distributed import Layout, layout
from onlineaug.producer_processes import DISTRIBUTED_ENV, PRODUCER_ENV, producer_environment

pytestmark = pytest.mark.xdist_group("torchrun")  # one worker runs the module: its fixture is shared
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------- generator devices
@pytest.mark.parametrize("num_gpus, local_world_size", [(8, 2), (8, 3), (4, 1), (9, 4), (3, 1), (16, 4)])
def test_auto_deals_every_free_gpu_to_exactly_one_local_rank(num_gpus, local_world_size):
    dealt = [assign_generator_devices(num_gpus, r, local_world_size, "auto") for r in range(local_world_size)]
    flat = [d for devices in dealt for d in devices]
    assert sorted(flat) == sorted(f"cuda:{i}" for i in range(local_world_size, num_gpus))  # no trainer GPU
    assert len(set(flat)) == len(flat)  # no GPU twice
    sizes = [len(devices) for devices in dealt]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1  # round-robin: balanced
    assert dealt[0][0] == f"cuda:{local_world_size}" and (local_world_size == 1 or
                                                           dealt[1][0] == f"cuda:{local_world_size + 1}")


def test_auto_with_no_free_gpu_or_too_few_says_what_to_do():
    with pytest.raises(ValueError, match=r"found no GPU to generate on: this node has 2 GPU\(s\) and its 2 trainer "
                                         r"rank\(s\) use cuda:0..cuda:1.*generator_devices=\['cpu'\]"):
        assign_generator_devices(2, 0, 2, "auto")
    with pytest.raises(ValueError, match=r"found no GPU"):
        assign_generator_devices(0, 0, 1, "auto")
    with pytest.raises(ValueError, match=r"1 free GPU\(s\) \(cuda:3\) for 3 trainer ranks.*"
                                         r"allow_shared_generator_devices=True"):
        assign_generator_devices(4, 1, 3, "auto")
    with pytest.raises(ValueError, match=r"2 free GPU\(s\) \(cuda:3..cuda:4\) for 3 trainer ranks"):
        assign_generator_devices(5, 1, 3, "auto")
    shared = [assign_generator_devices(4, r, 3, "auto", allow_shared=True) for r in range(3)]
    assert shared == [["cuda:3"], ["cuda:3"], ["cuda:3"]]
    with pytest.raises(ValueError, match=r"assumes local rank i trains on cuda:i .* trains on cuda:3"):
        assign_generator_devices(8, 1, 2, "auto", trainer_gpu=3)
    assert assign_generator_devices(8, 1, 2, "auto", trainer_gpu=1) == ["cuda:3", "cuda:5", "cuda:7"]


def test_explicit_devices_per_rank_as_a_dict_a_callable_or_one_list():
    per_rank = {0: "cuda:2", 1: ["cuda:3", torch.device("cuda", 4)]}
    assert assign_generator_devices(8, 0, 2, per_rank) == ["cuda:2"]
    assert assign_generator_devices(8, 1, 2, per_rank) == ["cuda:3", "cuda:4"]
    assert assign_generator_devices(8, 1, 2, lambda local_rank: [f"cuda:{2 + 2 * local_rank}"]) == ["cuda:4"]
    assert assign_generator_devices(0, 1, 2, ("cpu",)) == ["cpu"]
    with pytest.raises(ValueError, match=r"a dict without local rank 2 \(it has \[0, 1\]\)"):
        assign_generator_devices(8, 2, 3, per_rank)
    with pytest.raises(TypeError, match=r"generator_devices\(1\) returned 7: expected a list of devices"):
        assign_generator_devices(8, 1, 2, lambda local_rank: 7)
    with pytest.raises(TypeError, match=r"generator_devices\[0\]=None is invalid: expected a list of devices"):
        assign_generator_devices(8, 0, 2, {0: None})
    with pytest.raises(ValueError, match=r"local rank 2 is outside \[0, 2\)"):
        assign_generator_devices(8, 2, 2, "auto")


def record(rank, generators, trainer=None, node="a"):
    return {"rank": rank, "node": node, "trainer": trainer, "generators": generators}


def test_shared_generator_gpus_are_found_across_ranks_of_one_node():
    assert shared_generator_gpus([record(0, ["cuda:2"], "cuda:0"), record(1, ["cuda:3"], "cuda:1")]) == []
    assert shared_generator_gpus([record(0, ["cuda:0"], "cuda:0")]) == []  # one GPU both trains and generates
    assert shared_generator_gpus([record(0, ["cuda:2"], node="a"), record(1, ["cuda:2"], node="b")]) == []
    assert shared_generator_gpus([record(0, [], "cuda:0"), record(1, [], "cuda:0")]) == []  # not generating
    assert shared_generator_gpus([record(0, ["cuda:2", "cuda:3"], "cuda:0"), record(1, ["cuda:3"], "cuda:1")]) == [
        "cuda:3 on node a (rank 0 generates, rank 1 generates)"]
    assert shared_generator_gpus([record(0, ["cuda:1"], "cuda:0"), record(1, [], "cuda:1")]) == [
        "cuda:1 on node a (rank 0 generates, rank 1 trains)"]


@pytest.mark.parametrize("cpus, local_world_size, cpu_producers, expected",
                         [(16, 2, 1, 4), (16, 2, 3, 2), (16, 1, 1, 8), (2, 2, 1, 1), (64, 8, 1, 4), (8, 1, 0, None)])
def test_cpu_producer_threads_are_divided_among_the_local_processes(cpus, local_world_size, cpu_producers, expected):
    threads = producer_threads(cpus, local_world_size, cpu_producers)
    assert threads == expected
    if threads is not None and cpus >= 2 * local_world_size * (cpu_producers + 1):
        assert local_world_size * (cpu_producers + 1) * threads <= cpus  # the node is not oversubscribed


def test_auto_through_the_loader_on_a_node_without_a_spare_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    shapes = SyntheticShapes(num_classes=4, size=16, length=8)
    with pytest.raises(ValueError, match=r"found no GPU to generate on: this node has 1 GPU\(s\)"):
        OnlineGenAugLoader(shapes, recipe="genmix", num_classes=4, image_size=16, generator_devices="auto")


# ------------------------------------------------------------------------------------ without a group
def test_producers_never_see_the_trainers_process_group_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        assert name in DISTRIBUTED_ENV
    for name in DISTRIBUTED_ENV:
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("ONLINEAUG_TEST_KEPT", "yes")
    env = producer_environment(num_threads=3)
    assert not set(DISTRIBUTED_ENV) & set(env)
    assert env["ONLINEAUG_TEST_KEPT"] == "yes" and env[PRODUCER_ENV] == "1" and env["OMP_NUM_THREADS"] == "3"


def test_the_layout_comes_from_torchrun_variables_and_only_local_rank_0_speaks(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert layout() == Layout() and Layout().speaks and not Layout().distributed
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert layout() == Layout(local_rank=1, local_world_size=2) and not layout().speaks
    shapes = SyntheticShapes(num_classes=4, size=16, length=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # local rank 1: the empty-epoch warning is rank 0's to give
        quiet = OnlineGenAugLoader(shapes, recipe="cutmix", num_classes=4, image_size=16, batch_size=16,
                                   drop_last=True, num_workers=0)
    assert not quiet.progress
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.warns(RuntimeWarning, match="every epoch is empty"):
        OnlineGenAugLoader(shapes, recipe="cutmix", num_classes=4, image_size=16, batch_size=16, drop_last=True,
                           num_workers=0)
    monkeypatch.setenv("LOCAL_RANK", "one")
    with pytest.raises(ValueError, match=r"LOCAL_RANK='one' is not an int >= 0"):
        layout()


def test_reduced_stats_without_a_process_group_are_this_processes_stats():
    shapes = SyntheticShapes(num_classes=4, size=16, length=8)
    loader = OnlineGenAugLoader(shapes, recipe="cutmix", num_classes=4, image_size=16, batch_size=4, num_workers=0)
    list(loader)
    assert loader.stats(reduce=True) == loader.stats() and loader.stats()["real"] == 8
    with pytest.raises(TypeError, match=r"reduce='yes' is invalid"):
        loader.stats(reduce="yes")


# ---------------------------------------------------------------------------- a real torchrun gloo group
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of two torchrun ranks saw (``tests/distributed_worker.py``)."""
    out = tmp_path_factory.mktemp("torchrun")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               TRITON_INTERPRET="1")
    for name in DISTRIBUTED_ENV:
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "tests", "distributed_worker.py"), str(out)]
    result = subprocess.run(command, env=env, cwd=str(out), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def check_sums(per_rank: list[dict], reduced: dict) -> None:
    for key, value in reduced.items():
        if key == "rejected":
            assert value == {r: sum(s[key][r] for s in per_rank) for r in value}
        elif key == "generated_share":
            served = reduced["real"] + reduced["generated"]
            assert value == pytest.approx(reduced["generated"] / served)
        elif key == "generated_per_class":
            assert value == [sum(counts) for counts in zip(*(s[key] for s in per_rank))]
        elif key == "mean_serves":
            assert value == pytest.approx(reduced["generated"] / reduced["fresh"] if reduced["fresh"] else 0.0)
        elif key == "miss_rate":  # a rate: the mean over the ranks
            assert value == pytest.approx(sum(s[key] for s in per_rank) / len(per_rank))
        elif key in ("store_samples", "store_bytes"):  # one store for all ranks: its size, not a sum
            assert value in {s[key] for s in per_rank}
        else:
            assert value == pytest.approx(sum(s[key] for s in per_rank)), key


@pytest.mark.slow
def test_each_rank_iterates_its_own_shard_and_epochs_reshuffle(ranks):
    parts = [r["batch"] for r in ranks]
    assert [r["local_rank"] for r in ranks] == [0, 1]
    for part in parts:
        assert part["sampler"] == "DistributedSampler" and part["len"] == 3  # 24 / 2 ranks / batch 4
    for epoch in range(2):
        shards = [set(part["epochs"][epoch]["shard"]) for part in parts]
        assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(24))
        for part, shard in zip(parts, shards):
            rows = [index for index, _ in part["epochs"][epoch]["rows"]]
            assert len(rows) == 12 and set(rows) == shard
    for part in parts:
        assert part["epochs"][0]["shard"] != part["epochs"][1]["shard"]  # set_epoch reached the sampler
    assert [part["user_sampler_kept"] for part in parts] == [True, True]
    assert [part["user_sampler_rows"] for part in parts] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


@pytest.mark.slow
def test_reduced_stats_are_the_sums_over_the_ranks(ranks):
    for part_name in ("batch", "generated"):
        per_rank = [r[part_name]["stats"] for r in ranks]
        for rank in ranks:
            check_sums(per_rank, rank[part_name]["reduced"])
    batch = [r["batch"]["stats"] for r in ranks]
    assert [s["batches"] for s in batch] == [7, 8]  # the ranks differ, so a sum is not twice one rank


@pytest.mark.slow
def test_progress_bars_and_warnings_come_from_local_rank_0_only(ranks):
    assert "warmup: generating with tiny" in ranks[0]["generated"]["warmup_stderr"]
    assert ranks[1]["generated"]["warmup_stderr"] == ""
    assert len(ranks[0]["batch"]["warnings"]) == 1 and "every epoch is empty" in ranks[0]["batch"]["warnings"][0]
    assert ranks[1]["batch"]["warnings"] == []


@pytest.mark.slow
def test_a_bad_generator_devices_entry_on_one_rank_stops_every_rank(ranks):
    assert ranks[1]["batch"]["device_error"].startswith("generator_devices is a dict without local rank 1")
    assert ranks[0]["batch"]["device_error"].startswith("rank 1 could not choose its generator devices")


@pytest.mark.slow
def test_generated_samples_come_from_the_ranks_own_shard(ranks):
    served = 0
    for rank in ranks:
        for epoch in rank["generated"]["epochs"]:
            generated = [index for index, was_generated in epoch["rows"] if was_generated]
            assert set(generated) <= set(epoch["shard"]), (rank["rank"], epoch["epoch"])
            assert len(epoch["rows"]) == 12
            served += len(generated)
    assert served >= 2 and all(r["generated"]["stats"]["generated"] >= 1 for r in ranks)  # warmup filled both pools
    shards = [set(r["generated"]["epochs"][0]["shard"]) for r in ranks]
    assert not shards[0] & shards[1]
