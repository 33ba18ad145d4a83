"""Producers as Ray actors (``producers="ray"``): generator GPUs anywhere in a Ray cluster, feeding local pools.

Why: the generator:trainer GPU ratio a recipe needs (``python -m onlineaug plan``) is often more GPUs than a
trainer node has. Ray places producer actors on any node of its cluster; each trainer rank keeps its own
shared-memory pool (:mod:`onlineaug.pool`) and its batch path is unchanged: it never waits on the network.

Pieces:

* :class:`ProducerActor`: one actor per generator GPU (``ray_actor_options``, ``{"num_gpus": 1}`` by default;
  ``{"num_gpus": 0}`` on CPUs). It runs the same :class:`~onlineaug.producer.Producer` as a local producer process
  (the recipe code is unchanged), one *lane* per trainer rank that uses it: the models are loaded once, each lane
  has its rank's seeds, retries, counters and source set. A job names its lane and carries its rank's source set
  (an object ref, fetched once per version), so any actor serves any rank, each from its own shard.
* :class:`ProducerGroupActor`: a small named actor (``num_cpus=0``, namespace ``"onlineaug"``) that creates the
  producer actors once for every loader of one group (``ray_group``: by default the ``torchrun`` run id, so the
  ranks of one job share them), counts the loaders attached, counts actor restarts, and kills the actors when the
  last loader detaches.
* :class:`RayFeeder`: a thread in each trainer process. It submits jobs to the actors while the local pool has
  room for their rows (backpressure: at most ``in_flight_per_actor`` jobs per actor, and never more rows in flight
  than the pool's writable slots, so memory is bounded), waits for finished payloads (``ray.wait``) and writes
  them into the local pool as the pool's only producer, exactly as a local producer would (a slot being written
  is never served, see :mod:`onlineaug.pool`).

Failures: an exception in an actor reaches the trainer as :class:`~onlineaug.producer_processes.ProducerError`
with the actor's traceback (a constructor's failure too); an actor process that dies is restarted by Ray
(``max_restarts``, the loader's), the restart is counted in ``producer_restarts``, and the job it was running is
simply dropped (its rows were never written); an actor whose restarts are used up stops the loader with an error
that says so. ``close()`` stops the feeder and, from the last loader of the group, kills the actors and the group.

Ray is optional (``pip install "onlineaug[ray]"``): nothing here imports it at module import time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
import warnings
import weakref

import numpy as np

NAMESPACE = "onlineaug"
INSTALL_HINT = ('producers="ray" needs Ray, which is not installed: pip install "onlineaug[ray]" (or pip install '
                '"ray>=2.40"), on the trainer nodes and on every node of the Ray cluster')
DEFAULT_ACTOR_OPTIONS = {"num_gpus": 1}
IN_FLIGHT_PER_ACTOR = 2  # one job running, one queued: an actor never idles between jobs
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TEMP_PREFIX = "onlineaug-ray-"


def import_ray():
    """``ray``, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return ray


def connect(address: str | None):
    """Connect to Ray: an existing ``ray.init`` is kept; else ``ray.init(address)`` (None: a local cluster, or
    the one ``RAY_ADDRESS`` names)."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, namespace=None, include_dashboard=False, log_to_driver=True)
    return ray


def default_group() -> str:
    """The group that loaders share actors in when ``ray_group`` is not given: the ``torchrun`` job (its run id,
    else its master address and port), so every rank of one job shares one set of actors; outside ``torchrun``,
    a fresh name (this loader alone)."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run:
        return f"torchrun-{run}"
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        return f"torchrun-{os.environ['MASTER_ADDR']}-{os.environ['MASTER_PORT']}"
    return f"loader-{uuid.uuid4().hex[:12]}"


def settings_fingerprint(settings, dataset_fingerprint: str) -> str:
    """What loaders sharing a group must agree on (the actors were built from the first one's settings)."""
    text = repr((settings.recipe.name, sorted((k, repr(v)) for k, v in settings.recipe.describe().items()),
                 dataset_fingerprint, sorted((r, repr(dataclasses.asdict(s))) for r, s in settings.specs.items()),
                 settings.num_classes, settings.image_size, settings.batch_size, settings.seed,
                 repr(settings.item_format), repr(settings.policy)))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def clean_traceback(text: str) -> str:
    return _ANSI.sub("", text)


# ------------------------------------------------------------------------------------------------ actors
class ProducerActor:
    """One producer on one Ray worker (wrapped by ``ray.remote`` in :class:`ProducerGroupActor`)."""

    def __init__(self, settings_blob: bytes, rank: int, group, num_threads: int | None, sys_path: list[str]):
        import sys

        import ray
        import torch
        from ray import cloudpickle

        from onlineaug.producer_processes import PRODUCER_ENV

        os.environ[PRODUCER_ENV] = "1"  # a loader started by an imported user script says what went wrong
        for entry in reversed(sys_path):  # the driver's path (its script's folder, a source checkout) where it exists
            if entry and entry not in sys.path and os.path.isdir(entry):
                sys.path.insert(0, entry)
        with warnings.catch_warnings():  # Ray deprecates the attribute it reads internally, not the API
            warnings.simplefilter("ignore")
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        # a restart gets a new generation from the group: counted there, and new seeds (no repeated samples)
        self.generation = ray.get(group.note_restart.remote(rank)) if restarted else 0
        self.rank = rank
        self.settings = cloudpickle.loads(settings_blob)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        _sweep_temporary()
        self.temporary = tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-")  # lanes' prepared state
        self.lanes: dict[str, tuple[str, object]] = {}  # lane -> (sources key, Producer)

    def info(self) -> dict:
        import socket

        return {"pid": os.getpid(), "node": socket.gethostname(), "device": self.device,
                "generation": self.generation, "lanes": sorted(self.lanes)}

    def _lane_settings(self, lane: str, trainer_rank: int):
        settings = dataclasses.replace(self.settings, trainer_rank=trainer_rank, store_dir=None)
        if settings.prepared_path is not None:  # the trainer's folder may be on another node: prepare here
            settings.prepared_path = os.path.join(self.temporary, f"prepared-{lane}.pt")
        return settings

    def produce(self, lane: str, trainer_rank: int, sources_key: str, sources_box: list) -> dict:
        """One batch for trainer ``lane``; ``sources_box`` holds the ref of its ``(indices, weights)``."""
        import ray

        from onlineaug.producer import Producer
        from onlineaug.sources import SourceSet

        known = self.lanes.get(lane)
        if known is None or known[0] != sources_key:
            indices, weights = ray.get(sources_box[0])
            if known is None:
                models = next(iter(self.lanes.values()))[1].models if self.lanes else None  # loaded once
                settings = self._lane_settings(lane, trainer_rank)
                labels = settings.labels[indices] if settings.labels is not None else None
                producer = Producer(settings, rank=self.rank, device=self.device, generation=self.generation,
                                    sources=SourceSet(indices, weights, labels), models=models)
            else:
                producer = known[1]
                producer.set_sources(indices, weights)
            self.lanes[lane] = known = (sources_key, producer)
        producer = known[1]
        start = time.monotonic_ns()
        rows = producer.step()
        return {"rows": rows, "counts": dict(producer.counts), "generation": self.generation,
                "busy_ns": time.monotonic_ns() - start}

    def drop_lane(self, lane: str) -> None:
        self.lanes.pop(lane, None)


def _sweep_temporary() -> None:
    """Remove the temporary folders of actors on this host whose process is gone (killed actors leave theirs)."""
    from onlineaug.store import _alive

    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid = name[len(_TEMP_PREFIX):].split("-", 1)[0] if name.startswith(_TEMP_PREFIX) else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


class ProducerGroupActor:
    """The actors of one group, the loaders attached to them, and the actors' restarts (a named actor)."""

    def __init__(self):
        self.actors = None
        self.fingerprint = None
        self.users: set[str] = set()
        self.generations: list[int] = []

    def attach(self, user: str, fingerprint: str, settings_blob: bytes, count: int, options: dict,
               max_restarts: int, num_threads: int | None, sys_path: list[str]):
        import ray

        if self.actors is None:
            me = ray.get_runtime_context().current_actor
            # put by this actor, which owns it: an actor restarted later fetches its settings from here
            self.settings_ref = ray.put(settings_blob)
            remote = ray.remote(ProducerActor).options(**options, max_restarts=max_restarts, max_task_retries=0)
            self.actors = [remote.remote(self.settings_ref, rank, me, num_threads, sys_path) for rank in range(count)]
            self.fingerprint, self.generations = fingerprint, [0] * count
        elif fingerprint != self.fingerprint or count != len(self.actors):
            raise ValueError(f"this Ray group already runs {len(self.actors)} producer actors for other loader "
                             f"settings (recipe, options, models, dataset, sizes or ray_actors differ); every loader "
                             f"of a group must be built alike, or give each its own ray_group=")
        self.users.add(user)
        return self.actors, list(self.generations)

    def note_restart(self, rank: int) -> int:
        self.generations[rank] += 1
        return self.generations[rank]

    def detach(self, user: str) -> bool:
        """Forget ``user``; the last one out kills the actors (True: nothing is left but this actor)."""
        import ray

        self.users.discard(user)
        if self.users:
            return False
        for actor in self.actors or []:
            ray.kill(actor, no_restart=True)
        self.actors = None
        return True


# -------------------------------------------------------------------------------------------- the feeder
class RayFeeder:
    """Keeps the trainer's local pool filled from the group's actors, on a thread (see the module doc).

    The local pool is created with one producer slot owner (rank 0): this feeder. ``poll()`` re-raises, on the
    training thread, what went wrong in an actor.
    """

    def __init__(self, ray, actors: list, generations: list[int], pool, *, lane: str, trainer_rank: int,
                 batch_size: int, max_restarts: int, in_flight_per_actor: int = IN_FLIGHT_PER_ACTOR,
                 store_writer=None):
        self.ray, self.actors, self.pool = ray, list(actors), pool
        self.lane, self.trainer_rank, self.batch_size = lane, trainer_rank, batch_size
        self.max_restarts, self.in_flight_per_actor, self.store = max_restarts, in_flight_per_actor, store_writer
        self._attached_generations = list(generations)
        self._generations = list(generations)  # the newest generation each actor reported
        self._counts_seen: dict[tuple[int, int], dict[str, int]] = {}
        self._in_flight: dict = {}  # ref -> actor rank
        self._per_actor = [0] * len(self.actors)
        self._retry_at = [0.0] * len(self.actors)
        self._sources = None  # (key, [ref])
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="onlineaug-ray-feeder")
        # Made after the pool, so at interpreter exit it runs before the pool's own finalizer unmaps the segments
        # (weakref finalizers run newest first): the thread never writes into memory that is gone.
        self._halt = weakref.finalize(self._stop, _halt, self._stop, self._thread)
        self.error: BaseException | None = None
        self.failure: str | None = None
        self.jobs_done = 0
        self.collect_ns = 0  # feeder time spent fetching results and writing them into the pool

    @property
    def restarts(self) -> int:
        return sum(max(0, seen - first) for seen, first in zip(self._generations, self._attached_generations))

    def publish_sources(self, indices: np.ndarray, weights: np.ndarray | None) -> None:
        ref = self.ray.put((np.asarray(indices, dtype=np.int64), None if weights is None else np.asarray(weights)))
        with self._lock:
            self._sources = (secrets.token_hex(6), [ref])

    def start(self) -> "RayFeeder":
        if self.pool.started_ns[0] == 0:
            self.pool.started_ns[0] = time.monotonic_ns()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._halt()
        self._in_flight.clear()  # dropping the refs frees their results

    def poll(self) -> None:
        """Raise an actor's failure on the calling (training) thread, once; later calls say it happened."""
        if self.failure is not None:
            raise RuntimeError(f"the Ray producers were stopped after an earlier error ({self.failure}); create a "
                               f"new loader")
        if self.error is not None:
            error, self.error = self.error, None
            self.failure = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            raise error

    # ------------------------------------------------------------------------------------------ thread
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._submit()
                refs = list(self._in_flight)
                if not refs:
                    self._stop.wait(0.01)
                    continue
                done, _ = self.ray.wait(refs, num_returns=1, timeout=0.05)
                for ref in done:
                    self._collect(ref)
                self.pool.heartbeat_ns[0] = time.monotonic_ns()
        except BaseException as error:  # noqa: BLE001 - re-raised on the training thread by poll()
            self.error = error

    def _submit(self) -> None:
        with self._lock:
            sources = self._sources
        if sources is None:
            return
        room = self.pool.writable_count(0) - self.batch_size * len(self._in_flight)
        now = time.monotonic()
        while room >= min(self.batch_size, self.pool.spec.num_slots):
            ready = [a for a in range(len(self.actors))
                     if self._per_actor[a] < self.in_flight_per_actor and self._retry_at[a] <= now]
            if not ready:
                return
            actor = min(ready, key=lambda a: self._per_actor[a])
            ref = self.actors[actor].produce.remote(self.lane, self.trainer_rank, sources[0], sources[1])
            self._in_flight[ref] = actor
            self._per_actor[actor] += 1
            room -= self.batch_size

    def _collect(self, ref) -> None:
        from ray import exceptions

        from onlineaug.producer_processes import ProducerError

        actor = self._in_flight.pop(ref)
        self._per_actor[actor] -= 1
        start = time.monotonic_ns()
        try:
            result = self.ray.get(ref)
        except exceptions.RayTaskError as error:  # the recipe or the producer raised: the actor's traceback
            raise ProducerError(actor, f"Ray actor {actor}", clean_traceback(str(error))) from None
        except exceptions.ActorDiedError as error:
            if error.actor_init_failed:  # its constructor raised (missing weights, a bad recipe option, ...)
                raise ProducerError(actor, f"Ray actor {actor}", clean_traceback(str(error))) from None
            raise RuntimeError(
                f"Ray producer actor {actor} died and Ray will not restart it: its restarts (max_restarts="
                f"{self.max_restarts}) are used up, or it was killed for good. Look for out-of-memory kills on its "
                f"node, or raise max_restarts. Ray said: {clean_traceback(str(error)).splitlines()[0]}") from None
        except exceptions.RayActorError:  # died mid-job and being restarted by Ray: the job's rows are lost
            self._retry_at[actor] = time.monotonic() + 0.2
            return
        self._generations[actor] = max(self._generations[actor], int(result["generation"]))
        self._write(actor, result)
        self.collect_ns += time.monotonic_ns() - start
        self.jobs_done += 1

    def _write(self, actor: int, result: dict) -> None:
        pool, rows = self.pool, result["rows"]
        count = len(next(iter(rows.values()))) if rows else 0
        row = 0
        while row < count and not self._stop.is_set():
            for slot in pool.choose_slots_to_write(0, count - row).tolist():
                if pool.write(int(slot), {name: array[row] for name, array in rows.items()}):
                    row += 1
            if row < count:
                time.sleep(0.001)  # a slot the trainer is reading right now, or no room: try again
        if self.store is not None and row:
            self.store.append({name: array[:row] for name, array in rows.items()})
        pool.produced[0] += row
        pool.counters["steps"][0] += 1
        pool.busy_ns[0] += int(result["busy_ns"])
        seen = self._counts_seen.setdefault((actor, int(result["generation"])), {})
        for name, total in result["counts"].items():  # the lane's running totals: add the deltas
            if name in pool.counters:
                pool.counters[name][0] += int(total) - seen.get(name, 0)
                seen[name] = int(total)


def _halt(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    if thread.is_alive() and thread is not threading.current_thread():
        thread.join(timeout=10.0)
    if thread.is_alive():  # stuck in Ray (a cluster gone): the pool must not be unmapped under it
        raise RuntimeError("the Ray feeder thread did not stop within 10 s")


# ---------------------------------------------------------------------------------------- one loader's use
class RayProducers:
    """What one loader holds of a Ray group: its group handle, the actors and its feeder."""

    def __init__(self, settings, pool, *, dataset_fingerprint: str, count: int, actor_options: dict | None,
                 group: str | None, address: str | None, max_restarts: int, store_writer=None):
        import sys

        from ray import cloudpickle

        self.ray = ray = connect(address)
        self.group_name = group or default_group()
        self.lane = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        options = dict(DEFAULT_ACTOR_OPTIONS if actor_options is None else actor_options)
        num_cpus = options.get("num_cpus", 1)
        threads = max(1, int(num_cpus)) if not options.get("num_gpus") else None
        self.group = ray.remote(ProducerGroupActor).options(
            name=f"group-{self.group_name}", namespace=NAMESPACE, get_if_exists=True, num_cpus=0,
            max_restarts=0).remote()
        blob = cloudpickle.dumps(settings)
        try:
            actors, generations = ray.get(self.group.attach.remote(
                self.lane, settings_fingerprint(settings, dataset_fingerprint), blob, count, options, max_restarts,
                threads, list(sys.path)))
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, ValueError):
                raise ValueError(f"ray_group={self.group_name!r}: {error.cause}") from None
            raise
        self.actors = actors
        self.feeder = RayFeeder(ray, actors, generations, pool, lane=self.lane, trainer_rank=settings.trainer_rank,
                                batch_size=settings.batch_size, max_restarts=max_restarts, store_writer=store_writer)

    def start(self) -> "RayProducers":
        self.feeder.start()
        return self

    @property
    def restarts(self) -> int:
        return self.feeder.restarts

    def publish_sources(self, indices, weights) -> None:
        self.feeder.publish_sources(indices, weights)

    def poll(self) -> None:
        self.feeder.poll()

    def infos(self, timeout: float = 60.0) -> list[dict]:
        """Each actor's pid, node, device and generation (waits for actors that are still starting)."""
        return self.ray.get([actor.info.remote() for actor in self.actors], timeout=timeout)

    def stop(self) -> None:
        """Stop the feeder and detach; the group's last loader kills its actors and the group actor."""
        self.feeder.stop()
        ray = self.ray
        if not ray.is_initialized():
            return  # ray.shutdown() ran first: the cluster took the actors with it
        try:
            last = ray.get(self.group.detach.remote(self.lane), timeout=30)
        except ray.exceptions.RayError:
            last = True  # the group is gone already
        if last:
            ray.kill(self.group, no_restart=True)
        else:
            for actor in self.actors:  # this rank's lane (its models stay for the other ranks)
                actor.drop_lane.remote(self.lane)


__all__ = ["DEFAULT_ACTOR_OPTIONS", "INSTALL_HINT", "NAMESPACE", "ProducerActor", "ProducerGroupActor", "RayFeeder",
           "RayProducers", "connect", "default_group", "import_ray"]
