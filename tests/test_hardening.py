"""Stalls, late errors, leaks and debris: hung producers, restart budgets, worker shutdown, /tmp and /dev/shm debris."""

import glob
import logging
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest
import torch

from onlineaug import OnlineGenAugLoader
from onlineaug import producer_processes
from onlineaug.datasets import SyntheticShapes
from onlineaug.pool import SEGMENT_PREFIX, sweep_stale_segments
from onlineaug.producer_processes import ProducerGroup
from waiting import serve_until, wait_until

SIZE = 16
FAST = dict(generator="tiny", generator_devices=["cpu"], image_size=SIZE, generation_size=SIZE,
            recipe_options={"num_inference_steps": 1}, generator_batch_size=2, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def shapes():
    return SyntheticShapes(num_classes=4, size=SIZE, length=40, seed=0)


# ------------------------------------------------------------------------------ hung producers (heartbeat)
@pytest.mark.slow
def test_a_stopped_producer_is_reported_restarted_and_counted(shapes, caplog):
    loader = OnlineGenAugLoader(shapes, recipe="diffusemix", num_classes=4, batch_size=8, pool_size=8, max_reuse=1,
                                heartbeat_timeout_s=2.0, max_restarts=2, **FAST)
    with loader, caplog.at_level(logging.WARNING, logger="onlineaug"):
        serve_until(loader, lambda: loader.stats()["produced"] >= 2)  # past start-up: the heartbeat limit applies
        stopped = loader.producers.pids[0]
        os.kill(stopped, signal.SIGSTOP)  # as a stuck CUDA call: alive, silent
        serve_until(loader, lambda: loader.stats()["producer_hangs"] >= 1)
        serve_until(loader, lambda: loader.producers.pids[0] not in (None, stopped))
        stats = loader.stats()
    assert stats["producer_hangs"] == 1 and stats["producer_restarts"] == 1
    assert any("producer 0 (device cpu) sent no heartbeat" in r.getMessage() and "restarting it" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ProcessLookupError):
        os.kill(stopped, 0)  # killed, and reaped


def test_close_does_not_wait_on_a_stopped_producer(shapes):
    loader = OnlineGenAugLoader(shapes, recipe="diffusemix", num_classes=4, batch_size=8, pool_size=8, **FAST)
    loader.start()
    pid = loader.producers.pids[0]
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    loader.close()
    assert time.monotonic() - start < 2.5  # SIGTERM + SIGCONT; SIGKILL after 2 s at most
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# ----------------------------------------------------------------------------------- restart budget
class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_the_restart_budget_is_per_time_window_not_a_lifetime_total(monkeypatch, tmp_path):
    clock = _Clock()
    monkeypatch.setattr(producer_processes.time, "monotonic", clock)
    shared = producer_processes.Shared(None, "none", 1, str(tmp_path))
    group = ProducerGroup({"settings": 1}, ["cpu"], shared, num_threads=[None], max_restarts=2, restart_window_s=3600)
    respawned = []
    monkeypatch.setattr(group, "_respawn_in_background", respawned.append)
    group._use_restart_budget(0, "was killed (OOM)")
    clock.now += 1800
    group._use_restart_budget(0, "was killed (OOM)")
    clock.now += 1000  # both still inside the last hour: the budget is used up
    with pytest.raises(RuntimeError, match=r"2 restarts in the last 3600 s used up the budget \(max_restarts=2 per "
                                           r"restart_window_s=3600\)"):
        group._use_restart_budget(0, "was killed (OOM)")

    group = ProducerGroup({"settings": 1}, ["cpu"], shared, num_threads=[None], max_restarts=2, restart_window_s=3600)
    monkeypatch.setattr(group, "_respawn_in_background", respawned.append)
    for _ in range(10):  # one OOM kill every 40 minutes for 6 hours: never more than 2 in an hour
        group._use_restart_budget(0, "was killed (OOM)")
        clock.now += 2400
    assert group.restarts == 10 and len(respawned) == 2 + 10


# --------------------------------------------------------------- restarts do not stall the training thread
class CountingPickles(torch.utils.data.Dataset):
    """A dataset that counts how often the trainer pickles it."""

    pickled = 0

    def __init__(self, shapes):
        self.shapes = shapes
        self.classes = [f"class {i}" for i in range(4)]

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, index):
        return self.shapes[index]

    def __getstate__(self):
        type(self).pickled += 1
        return self.__dict__


@pytest.mark.slow
def test_a_restart_neither_repickles_the_dataset_nor_blocks_the_training_thread(shapes):
    dataset = CountingPickles(shapes)
    loader = OnlineGenAugLoader(dataset, recipe="diffusemix", num_classes=4, batch_size=8, pool_size=8, max_reuse=1,
                                **FAST)
    with loader:
        serve_until(loader, lambda: loader.stats()["produced"] >= 2)
        pickled = CountingPickles.pickled
        os.kill(loader.producers.pids[0], signal.SIGKILL)
        assert wait_until(lambda: not loader.producers.is_alive(0), timeout=10)
        slowest = 0.0
        iterator = iter(loader)
        while loader.stats()["producer_restarts"] == 0:
            start = time.monotonic()
            try:
                next(iterator)
            except StopIteration:
                iterator = iter(loader)
            slowest = max(slowest, time.monotonic() - start)
        assert CountingPickles.pickled == pickled  # the launch record reuses the bytes pickled at start
        assert slowest < 1.0  # the new interpreter starts in a background thread (~seconds), not in next()


# ------------------------------------------------------------------------------------- leaks and debris
def test_close_shuts_down_persistent_dataloader_workers_at_once(shapes):
    loader = OnlineGenAugLoader(shapes, recipe="cutmix", num_classes=4, batch_size=8, image_size=SIZE,
                                num_workers=2, progress=False)
    next(iter(loader))
    workers = [w.pid for w in loader._dataloader._iterator._workers]
    assert len(workers) == 2
    loader.close()
    for pid in workers:  # gone now, not at garbage collection
        assert wait_until(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), timeout=5)


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


TRAINER = textwrap.dedent("""
    import sys, time
    from onlineaug import OnlineGenAugLoader
    from onlineaug.datasets import SyntheticShapes
    loader = OnlineGenAugLoader(SyntheticShapes(num_classes=4, size=16, length=40), recipe="diffusemix",
                                num_classes=4, batch_size=8, image_size=16, generation_size=16, pool_size=8,
                                num_workers=0, recipe_options={"num_inference_steps": 1}, progress=False)
    loader.start()
    loader.wait_for_pool(1, timeout=300)  # the producer runs (and watches its trainer)
    print(loader._resources.report_dir, loader.producers.pids[0], flush=True)
    if sys.argv[1] == "wait":
        time.sleep(600)
    loader.close()
""")


def _trainer(mode):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", TRAINER, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


@pytest.mark.slow
def test_a_killed_trainer_leaves_no_folder_no_segment_and_no_resource_tracker_warning():
    trainer = _trainer("wait")
    report_dir, producer = trainer.stdout.readline().split()
    assert os.path.isdir(report_dir)
    mine = set(glob.glob(f"/dev/shm/{SEGMENT_PREFIX}{trainer.pid}_*"))
    assert len(mine) == 3  # pool data, pool control, sources
    trainer.send_signal(signal.SIGKILL)
    _, stderr = trainer.communicate(timeout=30)
    assert wait_until(lambda: not os.path.exists(report_dir), timeout=60)
    assert wait_until(lambda: not any(os.path.exists(f) for f in mine), timeout=60)
    assert "resource_tracker" not in stderr and "leaked shared_memory" not in stderr


@pytest.mark.slow
def test_a_normal_exit_leaves_nothing_and_warns_nothing():
    trainer = _trainer("close")
    report_dir, _ = trainer.stdout.readline().split()
    _, stderr = trainer.communicate(timeout=60)
    assert trainer.returncode == 0, stderr
    assert not os.path.exists(report_dir)
    assert not glob.glob(f"/dev/shm/{SEGMENT_PREFIX}{trainer.pid}_*")
    assert "resource_tracker" not in stderr and "leaked" not in stderr


def test_segments_of_dead_trainers_are_swept_at_the_next_pool(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    names = [f"{SEGMENT_PREFIX}{pid}_abcd_pool_data", f"{SEGMENT_PREFIX}{os.getpid()}_abcd_pool_data", "other_1"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = []
    from onlineaug import pool

    original = pool._unlink_quietly
    pool._unlink_quietly = lambda name: (removed.append(name), os.remove(tmp_path / name))
    try:
        assert sweep_stale_segments(str(tmp_path)) == [names[0]]
    finally:
        pool._unlink_quietly = original
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])  # a live trainer's segment and others' are kept


# ---------------------------------------------------------------------------------------- item 15
STDIN_SCRIPT = textwrap.dedent("""
    import torch
    from onlineaug import OnlineGenAugLoader

    class Mine(torch.utils.data.Dataset):
        def __len__(self):
            return 8
        def __getitem__(self, i):
            return torch.zeros(3, 16, 16, dtype=torch.uint8), 0

    loader = OnlineGenAugLoader(Mine(), recipe="diffusemix", num_classes=2, batch_size=4, image_size=16,
                                generation_size=16, num_workers=0, progress=False)
    next(iter(loader))
""")


def test_a_script_piped_on_stdin_gets_the_interactive_session_error():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-"], input=STDIN_SCRIPT, capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode != 0
    assert "defined in an interactive session (e.g. `python -c`, `python - < script.py` or a notebook)" in run.stderr
    assert "FileNotFoundError" not in run.stderr


@pytest.mark.slow
def test_stats_after_close_keep_the_last_figures(shapes):
    loader = OnlineGenAugLoader(shapes, recipe="diffusemix", num_classes=4, batch_size=8, pool_size=8, max_reuse=1,
                                **FAST)
    with loader:
        serve_until(loader, lambda: loader.stats()["generated"] >= 2)
        before = loader.stats()
    after = loader.stats()
    assert after["produced"] >= before["produced"] > 0 and after["generated"] == before["generated"]
    assert after["pool_ready"] == 0


def test_drop_last_with_a_batch_larger_than_the_data_warns(shapes):
    with pytest.warns(RuntimeWarning, match=r"drop_last=True with batch_size=64 larger than the 40 samples the "
                                            r"sampler yields: every epoch is empty"):
        loader = OnlineGenAugLoader(shapes, recipe="cutmix", num_classes=4, batch_size=64, image_size=SIZE,
                                    drop_last=True, num_workers=0, progress=False)
    assert list(loader) == []


def test_set_epoch_rejects_what_is_not_an_epoch_number(shapes):
    loader = OnlineGenAugLoader(shapes, recipe="cutmix", num_classes=4, batch_size=8, image_size=SIZE,
                                num_workers=0, progress=False)
    with pytest.raises(TypeError, match=r"argument epoch='a' is invalid: expected an int"):
        loader.set_epoch("a")
    with pytest.raises(ValueError, match=r"argument epoch=-1 is invalid: expected an int >= 0"):
        loader.set_epoch(-1)
