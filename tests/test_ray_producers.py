"""``producers="ray"``: producer actors in a local Ray cluster (2 CPUs) feeding two loaders' local pools.

One module-scoped cluster (``ray.init`` costs seconds); the tiny generator at 32 px, 2 denoising steps. The two
loaders stand for two trainer ranks: each has its own shard (a ``SubsetRandomSampler``), both share one group of
two CPU actors.
"""

import os
import signal
import sys
import time

import numpy as np
import pytest
import ray
import torch
from torch.utils.data import SubsetRandomSampler

from onlineaug import OnlineGenAugLoader, ProducerError
from onlineaug.datasets import SyntheticShapes
from onlineaug.ray_pool import INSTALL_HINT, NAMESPACE
from onlineaug.recipes import register_recipe
from onlineaug.recipes.diffusemix import DiffuseMix

pytestmark = pytest.mark.xdist_group("ray")  # one worker runs the module: its fixture is shared
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
RAY = dict(producers="ray", ray_actors=2, ray_actor_options={"num_gpus": 0, "num_cpus": 1}, generator="tiny",
           image_size=SIZE, generation_size=SIZE, recipe_options={"num_inference_steps": 2}, generator_batch_size=2,
           num_workers=0, progress=False, resize="squash", num_classes=10)


class RayExplodingRecipe(DiffuseMix):
    """Fails in the actor, to check that the actor's traceback reaches the trainer."""

    name = "test-ray-exploding"

    def produce(self, models, batch, ctx):
        raise RuntimeError("boom from inside the Ray actor")


register_recipe(RayExplodingRecipe)


@pytest.fixture(scope="module")
def cluster():
    # the actors import onlineaug (and this module's recipe) from this checkout
    path = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shapes():
    return SyntheticShapes(num_classes=10, size=SIZE, length=64, seed=0)


def segments_of(loader):
    spec = loader.pool.spec
    return [os.path.join("/dev/shm", spec.data_name), os.path.join("/dev/shm", spec.control_name)]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def serve(loader, iterators, key):
    """The next batch of ``loader`` (a new pass when an epoch ends), sleeping a little as a training step would."""
    try:
        batch = next(iterators[key])
    except StopIteration:
        iterators[key] = iter(loader)
        batch = next(iterators[key])
    time.sleep(0.02)
    return batch


@pytest.mark.slow
def test_two_loaders_share_two_actors_survive_a_killed_actor_and_leave_nothing(cluster, shapes):
    shards = [np.arange(0, 32), np.arange(32, 64)]
    loaders = [OnlineGenAugLoader(shapes, batch_size=8, p_aug=1.0, pool_size=8, max_reuse=4, seed=0, warmup=2,
                                  warmup_timeout=120, max_restarts=2, rank=rank, return_info=True, ray_group="shared",
                                  sampler=SubsetRandomSampler(shards[rank].tolist()), **RAY) for rank in range(2)]
    for loader in loaders:
        loader.start()
    iterators = {rank: iter(loader) for rank, loader in enumerate(loaders)}  # iter waits for warmup
    generated = [set(), set()]

    def take(rank):
        images, targets, info = serve(loaders[rank], iterators, rank)
        assert images.shape == (8, 3, SIZE, SIZE) and torch.isfinite(images).all()
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        generated[rank].update(info["index"][info["generated"]].tolist())

    for _ in range(6):
        take(0)
        take(1)
    for rank in range(2):  # generated samples were served, each from its own rank's shard
        assert generated[rank] and generated[rank] <= set(shards[rank].tolist())
        assert loaders[rank].stats()["generated"] >= 2
    ours = loaders[0].ray_producers
    assert loaders[1].ray_producers.actors == ours.actors  # one group of actors for both
    infos = ours.infos()
    assert [info["device"] for info in infos] == ["cpu", "cpu"]
    for info in infos:  # any actor serves any rank
        assert info["lanes"] == sorted([loaders[0].ray_producers.lane, loaders[1].ray_producers.lane])

    # a loader built otherwise cannot join the group
    other = OnlineGenAugLoader(shapes, batch_size=8, pool_size=8, ray_group="shared",
                               **{**RAY, "recipe_options": {"num_inference_steps": 3}})
    with pytest.raises(ValueError, match=r"ray_group='shared': this Ray group already runs 2 producer actors for "
                                         r"other loader settings"):
        other.start()
    assert other.pool is None

    # an actor killed mid-run is restarted by Ray and counted, while both loaders keep serving batches
    os.kill(infos[0]["pid"], signal.SIGKILL)
    served, deadline = 0, time.monotonic() + 300  # a new worker process imports torch and rebuilds the generator
    while sum(loader.stats()["producer_restarts"] for loader in loaders) == 0:
        assert time.monotonic() < deadline, [loader.stats() for loader in loaders]
        take(0)
        take(1)
        served += 1
    assert served >= 1
    new = ours.infos()
    assert new[0]["pid"] != infos[0]["pid"] and new[0]["generation"] == 1 and new[1]["pid"] == infos[1]["pid"]
    produced = [loader.stats()["produced"] for loader in loaders]
    deadline = time.monotonic() + 90
    while any(loader.stats()["produced"] <= before for loader, before in zip(loaders, produced)):
        assert time.monotonic() < deadline
        take(0)
        take(1)

    # close(): the first loader leaves the actors to the second; the last one kills them and the group
    files = [segments_of(loader) for loader in loaders]
    actors, pids = ours.actors, [info["pid"] for info in new]
    loaders[0].close()
    assert not any(os.path.exists(f) for f in files[0])
    assert [alive(pid) for pid in pids] == [True, True]
    take(1)  # still fed
    loaders[1].close()
    assert not any(os.path.exists(f) for f in files[1])
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.info.remote(), timeout=30)
    with pytest.raises(ValueError):
        ray.get_actor("group-shared", namespace=NAMESPACE)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "actor processes are still running after close()"
        time.sleep(0.1)
    assert loaders[1].stats()["producer_restarts"] + loaders[0].stats()["producer_restarts"] >= 1  # kept after close


def test_an_actor_exception_reaches_the_trainer_with_the_actors_traceback(cluster, shapes):
    loader = OnlineGenAugLoader(shapes, recipe="test-ray-exploding", batch_size=8, pool_size=8, warmup=1,
                                warmup_timeout=120, **{**RAY, "ray_actors": 1})
    with pytest.raises(ProducerError) as info:
        with loader:
            next(iter(loader))
    message = str(info.value)
    assert message.startswith("producer 0 (generator device Ray actor 0) failed:")
    assert "boom from inside the Ray actor" in message and "in produce" in message and "\x1b[" not in message
    assert loader.pool is None and loader.ray_producers is None  # closed by the with-block


def test_without_ray_producers_ray_says_how_to_install_it(monkeypatch, shapes):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    with pytest.raises(ImportError) as info:
        OnlineGenAugLoader(shapes, batch_size=8, pool_size=8, **RAY)
    assert str(info.value) == INSTALL_HINT
    assert 'pip install "onlineaug[ray]"' in INSTALL_HINT


def test_generator_devices_and_ray_producers_do_not_mix(shapes):
    with pytest.raises(ValueError, match=r"generator_devices=\['cuda:1'\] names this node's devices, but with "
                                         r"producers='ray' the producers are Ray actors"):
        OnlineGenAugLoader(shapes, batch_size=8, pool_size=8, generator_devices=["cuda:1"], **RAY)
    with pytest.raises(ValueError, match=r"producers='remote' is invalid"):
        OnlineGenAugLoader(shapes, batch_size=8, pool_size=8, **{**RAY, "producers": "remote"})
