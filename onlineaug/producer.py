"""The producer: dataset sources -> the recipe's models -> payload rows. One per generator device.

:class:`Producer` holds what one producer needs (its models, by role, loaded once under one
:class:`~onlineaug.models.LoadPolicy`; the recipe; the source set; the prepared state) and makes one batch per
:meth:`Producer.step`: plan jobs (regenerations of rejected jobs first), load their source images, run
``recipe.produce``, and check what came back:

* more rows than jobs is an error in the recipe (never silently dropped);
* fewer rows is normal: rejected rows (by the recipe's reason, or ``non_finite`` for NaN/inf outputs, which are
  never written as black images) are regenerated up to ``recipe.max_retries`` times and counted; rows neither
  kept nor rejected are counted as ``dropped``;
* every payload field must have the pool's shape and dtype.

The same class runs in a local producer process (:mod:`onlineaug.producer_processes`, which writes the rows into
the shared-memory pool) and in a Ray actor (:mod:`onlineaug.ray_pool`, whose payloads a trainer-side feeder writes
into the pool): it knows nothing of the pool.

Preparation (``recipe.prepare``) runs once per loader: the first producer to need it computes it under a file
lock and saves it (atomically) where every producer and every restart loads it, and in the on-disk cache when
the loader has a ``cache_dir``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import os
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch

from onlineaug.images import NO_BOX, ItemFormat, crop_box, crop_resize, load_image
from onlineaug.models import LoadPolicy, ModelRole, ModelSpec, describe_model, load_model
from onlineaug.pool import Field
from onlineaug.recipes.base import DROPPED, NON_FINITE, Jobs, ProducerContext, Produced, Recipe, SourceBatch
from onlineaug.seeding import numpy_generator, torch_generator
from onlineaug.sources import SourceSet



@dataclasses.dataclass
class ProducerSettings:
    """What every producer of one loader shares (pickled once, sent to each producer process)."""

    recipe: Recipe
    dataset: Any
    num_classes: int
    class_names: list[str] | None
    image_size: int
    batch_size: int
    seed: int
    trainer_rank: int
    roles: dict[str, ModelRole]
    specs: dict[str, ModelSpec]
    policy: LoadPolicy
    pool_fields: dict[str, Field]
    labels: np.ndarray | None = None  # every dataset item's label, when the recipe draws by class
    prepared_path: str | None = None  # where the prepared state is shared (None: the recipe prepares nothing)
    prepare_cache_path: str | None = None  # the on-disk cache file for it (None: no cache)
    item_format: ItemFormat = dataclasses.field(default_factory=ItemFormat)  # dict keys, crop geometry
    index_cache_dir: str | None = None  # the folder for the recipe's per-index results (None: no disk cache)
    store_dir: str | None = None  # the sample store's folder producers append to (None: no store, onlineaug.store)
    store_shard_size: int = 64  # samples per store shard
    store_run: int = 0  # complete shards in the store when the run started (seeds: no run repeats another's)


def reject_reasons(recipe: Recipe) -> tuple[str, ...]:
    """Every reason a producer counts a row as not written (the pool's counters are named after them)."""
    return tuple(dict.fromkeys((*recipe.reject_reasons, NON_FINITE, DROPPED)))


def counter_names(recipe: Recipe) -> tuple[str, ...]:
    return tuple(f"rejected:{reason}" for reason in reject_reasons(recipe))


def prepare_cache_key(settings: ProducerSettings, dataset_fingerprint: str, sources: SourceSet) -> str | None:
    """The prepared state's cache key: (dataset, source set, models, recipe settings), or None if none."""
    key = settings.recipe.prepare_key()
    if key is None:
        return None
    models = {role: (describe_model(settings.roles[role], spec), dataclasses.asdict(spec))
              for role, spec in settings.specs.items()}
    text = repr((settings.recipe.name, sorted(key.items()), dataset_fingerprint, sources.fingerprint(),
                 sorted(models.items()), settings.image_size, settings.seed,
                 sorted(dataclasses.asdict(settings.item_format).items())))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def index_cache_key(settings: ProducerSettings, dataset_fingerprint: str) -> str | None:
    """The per-index cache's key: (dataset, the models of the roles it names, recipe settings), or None if none.

    Unlike :func:`prepare_cache_key` it leaves out the source set (results are per index, whoever draws it).
    """
    key = settings.recipe.index_cache_key()
    if key is None:
        return None
    roles = [role for role in key.get("roles", tuple(settings.specs)) if role in settings.specs]
    models = {role: (describe_model(settings.roles[role], settings.specs[role]),
                     dataclasses.asdict(settings.specs[role])) for role in roles}
    text = repr((settings.recipe.name, sorted(key.items()), dataset_fingerprint, sorted(models.items()),
                 settings.image_size, settings.seed))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class Producer:
    """One producer's models and state; :meth:`step` makes one batch of payload rows."""

    def __init__(self, settings: ProducerSettings, *, rank: int, device: str, generation: int = 0,
                 sources: SourceSet, beat: Callable[[], None] = lambda: None, models: Mapping | None = None):
        """``models``: models already loaded by role (a Ray actor that serves several trainer ranks loads them once
        and runs one Producer per rank on them); None loads them here under ``settings.policy``."""
        self.settings, self.rank, self.generation, self.beat = settings, rank, generation, beat
        self.recipe = settings.recipe
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if models is None:
            self.models = {role: load_model(settings.roles[role], spec, device=self.device, policy=settings.policy,
                                            seed=settings.seed, dataset=settings.dataset)
                           for role, spec in settings.specs.items()}
            for model in self.models.values():
                _beat_on_forward(model, beat)
        else:
            self.models = dict(models)
        role = f"trainer{settings.trainer_rank}/producer"  # streams differ by trainer, producer rank and restart
        if settings.store_dir is not None:  # and by the store's size: a later run adds new samples, not copies
            role += f"/store{settings.store_run}"
        self.context = ProducerContext(
            device=self.device, rank=rank, trainer_rank=settings.trainer_rank, num_classes=settings.num_classes,
            class_names=settings.class_names, image_size=settings.image_size, sources=sources,
            generator=torch_generator(settings.seed, role, rank, generation, device=self.device),
            rng=numpy_generator(settings.seed, f"{role}/jobs", rank, generation), dataset=settings.dataset,
            cache_dir=settings.index_cache_dir, item_format=settings.item_format)
        self.context.state = self._prepared_state()
        # random crops of source images (resize="random_resized_crop"): a seeded stream per producer and restart
        self._crop_rng = numpy_generator(settings.seed, f"{role}/crops", rank, generation)
        self._retries: collections.deque[tuple[Jobs, int]] = collections.deque()  # (one job, attempts so far)
        self.counts = collections.Counter()

    # --------------------------------------------------------------------------------------- sources
    def set_sources(self, indices: np.ndarray, weights: np.ndarray | None) -> None:
        labels = self.settings.labels[indices] if self.settings.labels is not None else None
        self.context.sources = SourceSet(indices, weights, labels)
        allowed = set(indices.tolist())
        self._retries = collections.deque((job, n) for job, n in self._retries
                                          if job.indices[0] < 0 or int(job.indices[0]) in allowed)

    # ----------------------------------------------------------------------------------- preparation
    def _prepared_state(self):
        path = self.settings.prepared_path
        if path is None:
            return None
        for candidate in (path, self.settings.prepare_cache_path):
            if candidate and os.path.exists(candidate):
                return _load_state(candidate)
        with _file_lock(path + ".lock", beat=self.beat):
            if os.path.exists(path):  # another producer prepared it while we waited
                return _load_state(path)
            with torch.inference_mode():
                state = self.recipe.prepare(self.models, self.context)
            for target in (path, self.settings.prepare_cache_path):
                if target:
                    _save_state(state, target)
            return state

    # ------------------------------------------------------------------------------------------ jobs
    def _next_jobs(self, count: int) -> tuple[Jobs, np.ndarray]:
        retried, attempts = [], []
        while self._retries and len(retried) < count:
            job, tries = self._retries.popleft()
            retried.append(job)
            attempts.append(tries)
        fresh = self.recipe.plan_jobs(self.context, count - len(retried)) if len(retried) < count else None
        parts = retried + ([fresh] if fresh is not None else [])
        jobs = Jobs.concat(parts)
        if len(jobs) != count:
            raise ValueError(f"recipe {self.recipe.name!r}: plan_jobs returned {len(jobs) - len(retried)} jobs, "
                             f"{count - len(retried)} were asked for")
        return jobs, np.array(attempts + [0] * (count - len(retried)), dtype=np.int64)

    def _load_sources(self, jobs: Jobs, attempts: np.ndarray) -> SourceBatch:
        """Each job's source item, cropped once as a real sample is (``settings.item_format.resize``): the same
        box resized to the generation size (``images``) and to the training size (``originals``)."""
        settings, size = self.settings, self.recipe.generation_size or self.settings.image_size
        fmt = settings.item_format
        images, originals, labels, crops = [], [], [], []
        for index in jobs.indices.tolist():
            if index < 0:  # a job without a source image (text-to-image)
                images.append(torch.zeros(3, size, size, dtype=torch.uint8))
                originals.append(torch.zeros(3, settings.image_size, settings.image_size, dtype=torch.uint8))
                labels.append(-1)
                crops.append(NO_BOX)
                continue
            image, label = load_image(settings.dataset, index, settings.num_classes, fmt)
            box = crop_box(image.shape[-2], image.shape[-1], fmt.resize, self._crop_rng)
            images.append(crop_resize(image, box, size))
            originals.append(crop_resize(image, box, settings.image_size))
            labels.append(label)
            crops.append(box)
        return SourceBatch(
            images=torch.stack(images).to(self.device), originals=torch.stack(originals),
            labels=torch.tensor(labels, dtype=torch.int64), indices=torch.from_numpy(jobs.indices.copy()),
            values={k: torch.as_tensor(np.asarray(v)) for k, v in jobs.values.items()},
            attempts=torch.from_numpy(attempts), crops=torch.tensor(crops, dtype=torch.int64).reshape(-1, 4))

    # ------------------------------------------------------------------------------------------- step
    def step(self) -> dict[str, np.ndarray]:
        """Generate one batch; return the kept rows as host arrays (field -> (m, ...)), m <= batch size."""
        self.beat()
        jobs, attempts = self._next_jobs(self.settings.batch_size)
        batch = self._load_sources(jobs, attempts)
        with torch.inference_mode():
            result = self.recipe.produce(self.models, batch, self.context)
        rows, payload, rejected = self._check(result, len(jobs))
        for reason, job_rows in rejected.items():
            self.counts[f"rejected:{reason}"] += len(job_rows)
            for row in job_rows:
                if attempts[row] < self.recipe.max_retries:
                    self._retries.append((jobs.take([row]), int(attempts[row]) + 1))
        unaccounted = len(jobs) - len(rows) - sum(len(r) for r in rejected.values())
        self.counts[f"rejected:{DROPPED}"] += unaccounted
        return payload

    def _check(self, result, n: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, list[int]]]:
        """Validate what ``produce`` returned; drop non-finite rows. Returns (rows, host payload, rejected)."""
        name = self.recipe.name
        if isinstance(result, Mapping):
            result = Produced(dict(result))
        if not isinstance(result, Produced):
            raise TypeError(f"recipe {name!r}: produce must return a dict of tensors or a Produced, got "
                            f"{type(result).__name__}")
        fields = self.settings.pool_fields
        if set(result.payload) != set(fields):
            raise ValueError(f"recipe {name!r}: produce returned fields {sorted(result.payload)}, the pool "
                             f"expects {sorted(fields)}")
        counts = {len(v) for v in result.payload.values()}
        if len(counts) != 1:
            raise ValueError(f"recipe {name!r}: produce returned fields with different row counts {sorted(counts)}")
        m = counts.pop()
        if m > n:
            raise ValueError(f"recipe {name!r}: produce returned {m} rows for {n} jobs; extra rows are a bug in "
                             f"the recipe, not something to drop silently")
        rows = np.arange(m) if result.rows is None else result.rows.detach().cpu().numpy().astype(np.int64)
        if rows.shape != (m,) or (m and (rows.min() < 0 or rows.max() >= n)) or len(set(rows.tolist())) != m:
            raise ValueError(f"recipe {name!r}: Produced.rows must name {m} distinct job rows in [0, {n})")
        rejected = {reason: sorted(set(np.asarray(r.detach().cpu() if isinstance(r, torch.Tensor) else r,
                                                  dtype=np.int64).tolist()))
                    for reason, r in result.rejected.items()}
        unknown = set(rejected) - set(reject_reasons(self.recipe))
        if unknown:
            raise ValueError(f"recipe {name!r}: rejected rows for undeclared reasons {sorted(unknown)}; declare "
                             f"them in reject_reasons")
        host = {}
        finite = np.ones(m, dtype=bool)
        for field, value in result.payload.items():
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if array.shape[1:] != fields[field].shape or array.dtype != np.dtype(fields[field].dtype):
                raise TypeError(f"recipe {name!r}: field {field!r} is {array.dtype} {array.shape[1:]}, the pool "
                                f"expects {fields[field].dtype} {fields[field].shape}")
            if np.issubdtype(array.dtype, np.floating):
                finite &= np.isfinite(array).all(axis=tuple(range(1, array.ndim)))  # m may be 0
            host[field] = array
        if not finite.all():
            rejected.setdefault(NON_FINITE, []).extend(rows[~finite].tolist())
            host = {k: v[finite] for k, v in host.items()}
            rows = rows[finite]
        return rows, host, rejected


# ------------------------------------------------------------------------------------------- helpers
def _beat_on_forward(model, beat: Callable[[], None]) -> None:
    """Call ``beat`` before every forward of the model's top-level modules (each denoising step of a UNet).

    The heartbeat then shows the producer making progress inside long pipeline calls; a producer stopped or
    stuck in a kernel stops beating. Hooks go on the outermost modules (a compiled UNet's wrapper), outside
    any compiled region.
    """
    modules = [model] if isinstance(model, torch.nn.Module) else []
    components = getattr(model, "components", None)
    if isinstance(components, Mapping):
        modules += [m for m in components.values() if isinstance(m, torch.nn.Module)]
    modules += [m for m in vars(model).values() if isinstance(m, torch.nn.Module)] if hasattr(model, "__dict__") else []
    for module in {id(m): m for m in modules}.values():
        module.register_forward_pre_hook(lambda *_: beat())


def _save_state(state, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    torch.save(state, temporary)
    os.replace(temporary, path)  # atomic: readers see the whole file or none


def _load_state(path: str):
    return torch.load(path, map_location="cpu", weights_only=False)


@contextlib.contextmanager
def _file_lock(path: str, *, beat: Callable[[], None], poll_s: float = 0.1):
    """An exclusive lock between processes (``fcntl.flock``), beating while it waits."""
    import fcntl

    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                beat()
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fingerprint_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


__all__ = ["DROPPED", "NON_FINITE", "Producer", "ProducerSettings", "counter_names", "fingerprint_bytes", "standalone_context",
           "index_cache_key", "prepare_cache_key", "reject_reasons"]


def standalone_context(*, num_classes: int, image_size: int, device="cpu", class_names=None, sources=None,
                       dataset=None, seed: int = 0, state=None, cache_dir: str | None = None) -> ProducerContext:
    """A :class:`ProducerContext` outside a loader, to call a recipe's ``produce`` directly (tests, benchmarks)."""
    device = torch.device(device)
    if sources is None:
        length = len(dataset) if dataset is not None else 1
        sources = SourceSet(np.arange(length))
    return ProducerContext(device=device, rank=0, trainer_rank=0, num_classes=num_classes, class_names=class_names,
                           image_size=image_size, sources=sources,
                           generator=torch_generator(seed, "standalone", device=device),
                           rng=numpy_generator(seed, "standalone/jobs"), dataset=dataset, state=state,
                           cache_dir=cache_dir)
