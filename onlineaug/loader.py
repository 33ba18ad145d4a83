"""``OnlineGenAugLoader``: a drop-in training loader that mixes freshly generated samples into every batch.

Data path of one batch (see ``docs/architecture.md``):

1. real samples come through a standard ``torch.utils.data.DataLoader`` (workers, pinned memory) as uint8;
2. each sample is replaced, with probability ``p_aug``, by a generated sample from the shared-memory pool
   (copied from its slot into the batch's host buffers); with nothing ready the real sample is kept and a
   miss is counted: the trainer never waits for the generator;
3. the batch is copied to the trainer's device, and the recipe draws per-sample parameters with an explicit
   ``torch.Generator`` and mixes (fused kernels from :mod:`onlineaug.kernels`): normalised images and soft
   targets;
4. with ``batch_transforms``, the recipe mixes without normalising (its context's mean 0 and std 1: images in
   [0, 1]), the transforms run on the whole mixed batch on the trainer's device, and the loader normalises.

Producers start only from indices the sampler can yield (:mod:`onlineaug.sources`), and the trainer serves only
samples made from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import shutil
import time
import warnings
import weakref
from typing import Callable, Mapping, Sequence, Union

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from onlineaug import distributed
from onlineaug.batching import BatchAssembler, prefetch_batches
from onlineaug.checks import Checks
from onlineaug.devices import assign_generator_devices, parse_device, producer_threads
from onlineaug.images import DEFAULT_RESIZE, RESIZE_MODES, ItemFormat, UInt8ImageDataset, load_label
from onlineaug.models import LoadPolicy, ensure_available, resolve_models
from onlineaug.monitor import ServeMonitor, miss_rate_advice
from onlineaug.pool import PoolSpec, SamplePool, check_shm_capacity
from onlineaug.producer import (ProducerSettings, counter_names, fingerprint_bytes, index_cache_key, prepare_cache_key,
                                reject_reasons)
from onlineaug.producer_processes import PRODUCER_ENV, ProducerGroup, Shared, make_report_dir
from onlineaug.recipes import BatchContext, Recipe, get_recipe
from onlineaug.resume import (STATE_VERSION, EpochPass, ResumableSampler, check_settings, numpy_state,
                              sampler_kind)
from onlineaug.seeding import derive_seed, numpy_generator, torch_generator
from onlineaug.sources import SharedSources, SourceSet, dataset_labels, epoch_dependent, sampler_sources
from onlineaug.store import POLICIES as STORE_POLICIES, SampleStore, StoreFeeder, shard_samples, store_key, store_path

logger = logging.getLogger("onlineaug")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CHECK = Checks("OnlineGenAugLoader", "argument")
# generator_devices: devices, "auto", {local_rank: devices} or local_rank -> devices (onlineaug.devices)
DeviceSpec = Union[Sequence, str, Mapping, Callable]
_BACKENDS = ("auto", "triton", "torch")
# A generative loader that has served this many batches and not one generated sample logs why (once).
ONLY_MISSES_BATCHES = 20
# Counters that live in the pool (this run's producers) and that a resumed loader continues from the saved ones.
_POOL_COUNTERS = ("produced", "torn_reads", "producer_restarts", "producer_hangs", "from_store")
# Loader arguments that only matter to recipes that generate, with their defaults (for the "ignored" log line).
_GENERATION_ARGUMENTS = {"generator": "tiny", "models": None, "generation_size": None, "warmup": 0,
                         "generator_batch_size": 4, "compile_unet": False, "load_policy": None,
                         "generator_devices": ("cpu",), "producers": "local"}
PRODUCER_KINDS = ("local", "ray")


class _Resources:
    """What must be released when the loader is closed or garbage-collected."""

    def __init__(self):
        self.pool: SamplePool | None = None
        self.sources: SharedSources | None = None
        self.producers: ProducerGroup | None = None
        self.feeder: StoreFeeder | None = None  # store_policy="read": refills the pool from the sample store
        self.ray = None  # producers="ray": the Ray actors' feeder (onlineaug.ray_pool.RayProducers)
        self.report_dir: str | None = None
        self.dataloader: DataLoader | None = None

    def release(self) -> None:
        if self.producers is not None:
            self.producers.stop()
            self.producers = None
        if self.feeder is not None:
            self.feeder.stop()
            self.feeder = None
        if self.ray is not None:
            self.ray.stop()
            self.ray = None
        for name in ("pool", "sources"):
            if getattr(self, name) is not None:
                getattr(self, name).close()
                setattr(self, name, None)
        if self.report_dir is not None:
            shutil.rmtree(self.report_dir, ignore_errors=True)
            self.report_dir = None
        _shutdown_workers(self.dataloader)


def _shutdown_workers(dataloader: DataLoader | None) -> None:
    """Stop a DataLoader's persistent workers now, not at garbage collection."""
    iterator = getattr(dataloader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        dataloader._iterator = None


def _checked_rank(rank) -> int:
    if rank is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return torch.distributed.get_rank() if distributed else 0
    return _CHECK.integer("rank", rank, low=0)


def _checked_triple(name: str, values, *, positive: bool = False) -> tuple[float, float, float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != 3:
        _CHECK._fail(TypeError, name, values, "3 numbers (one per RGB channel, in [0, 1] pixel units)")
    return tuple(_CHECK.real(f"{name}[{i}]", v, low=0.0 if positive else None, low_open=positive)
                 for i, v in enumerate(values))


def _checked_policy(compile_unet, load_policy) -> LoadPolicy:
    from onlineaug.models.spec import COMPILE_MODES

    if not isinstance(compile_unet, (bool, str)) or compile_unet not in COMPILE_MODES:
        _CHECK._fail(TypeError if not isinstance(compile_unet, (bool, str)) else ValueError, "compile_unet",
                     compile_unet, f"one of {list(COMPILE_MODES)} (True is torch.compile's default mode)")
    if load_policy is None:
        return LoadPolicy(compile=compile_unet)
    if not isinstance(load_policy, LoadPolicy):
        _CHECK._fail(TypeError, "load_policy", load_policy, "an onlineaug.models.LoadPolicy or None")
    if compile_unet is not False and compile_unet != load_policy.compile:
        raise ValueError(f"compile_unet={compile_unet!r} disagrees with load_policy.compile={load_policy.compile!r}; "
                         f"with load_policy, set compile there (LoadPolicy(compile=...)) and leave compile_unet out")
    return load_policy


def _checked_devices(value) -> list[str]:
    if isinstance(value, (str, torch.device)):
        value = [value]
    if value is None or isinstance(value, bytes) or not isinstance(value, Sequence):
        _CHECK._fail(TypeError, "generator_devices", value, "a list of devices, e.g. ['cuda:1', 'cuda:2'] or ['cpu']")
    return [str(parse_device(d, "generator_devices")) for d in value]


class OnlineGenAugLoader:
    """Iterate ``(images, targets)`` batches with online generative augmentation.

    Args:
        dataset: a map-style dataset of ``(image, label)`` items, or of dicts (Hugging Face ``datasets`` rows)
            read with ``image_key``/``label_key``. Images follow torchvision's layouts: PIL images (8-bit and
            16-bit modes, float mode F in [0, 1]), (C,H,W) tensors, (H,W,C) or (H,W) arrays; uint8, uint16 or
            float in [0, 1] (see :mod:`onlineaug.images`). It must be picklable (it is sent to the producer
            processes, like to DataLoader workers under spawn).
        image_key, label_key: the image and label columns of dict items (default ``"image"``/``"label"``, as
            in Hugging Face image datasets).
        recipe: a registered recipe name (``onlineaug.recipes.available_recipes()``) or a ``Recipe``.
        num_classes: number of classes; targets are (B, num_classes) soft labels whose rows sum to 1.
        batch_size, shuffle, drop_last, num_workers, sampler, pin_memory: as for ``DataLoader`` (``shuffle``
            defaults to True without a sampler). Producers start only from indices the sampler can yield. With
            ``torch.distributed`` initialised (more than one rank) and no sampler, each rank gets a
            ``DistributedSampler`` with the loader's ``shuffle``, ``seed`` and ``drop_last``.
        image_size: training size; every image becomes image_size x image_size.
        resize: how an item becomes that square, with torchvision's semantics: ``"random_resized_crop"``
            (``RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3))``, seeded by seed, rank, epoch and index),
            ``"center_crop"`` (``Resize`` the shorter side, then ``CenterCrop``) or ``"squash"`` (the whole
            image, aspect ratio not kept). The default is ``"random_resized_crop"`` because it is the training
            crop of both torchvision's ImageNet reference recipe and timm's training transforms (the papers'
            baselines train with it); use ``"center_crop"`` for evaluation, and ``"squash"`` when the dataset's
            own transforms already crop (it is a no-op on images already at image_size). Producers cut each
            source item with the same geometry (one box, resized to the generation size and the training
            size), so generated and real rows match.
        generator: the recipe's main model (``recipe.main_role``): ``"tiny"`` (random weights built in
            process), ``"full-random"`` (full size, random weights: benchmarks), a hub id or a local folder.
        models: ``{role: source}`` for any of the recipe's model roles (``recipe.model_roles()``): a source
            string, or a dict with ``source``, ``lora``, ``lora_scale``, ``textual_inversion``. Roles not named
            follow ``generator`` when it is a random-weight source, else load their default.
        device: the trainer's device, where batches are mixed and returned.
        generator_devices: one producer process per entry (e.g. ``["cuda:1", "cuda:2"]``). Under ``torchrun``:
            ``"auto"`` (the node's GPUs no trainer uses, dealt round-robin among the local ranks), or a list per
            local rank, as a dict ``{local_rank: [...]}`` or a callable ``local_rank -> [...]``.
        producers: where producers run. ``"local"``: one process per ``generator_devices`` entry on this node.
            ``"ray"``: ``ray_actors`` Ray actors anywhere in a Ray cluster (``ray_address``, or the cluster of an
            existing ``ray.init``), running the same producer code; a feeder thread writes what they make into this
            process's pool, so batches never wait on the network. Actors are shared by every loader of one
            ``ray_group`` (by default the ranks of one ``torchrun`` job): any actor serves any rank, each from its
            own shard. Needs ``pip install "onlineaug[ray]"``; see :mod:`onlineaug.ray_pool`.
        ray_address: the Ray cluster to connect to when Ray is not initialised yet (None: ``RAY_ADDRESS`` or a
            new local cluster).
        ray_actors: producer actors in the group (one per generator GPU; ``python -m onlineaug plan`` says how
            many).
        ray_actor_options: Ray options of each actor (default ``{"num_gpus": 1}``; ``{"num_gpus": 0,
            "num_cpus": 1}`` generates on CPUs).
        ray_group: the name under which loaders share actors (default: the ``torchrun`` run id; outside
            ``torchrun`` a loader has its own).
        allow_shared_generator_devices: let two trainer ranks of a node generate on the same GPU (each loads its
            own models there); without it that is an error.
        p_aug: per-sample probability of serving a generated sample (or, for CutMix/Mixup, of mixing).
        pool_size: slots in the shared-memory pool; max_reuse: serves per generated sample.
        seed: seeds every random stream (sampler, replacement coins, batch-time parameters, producers), with
            the epoch: ``set_epoch`` chooses it, otherwise each new iteration starts the next epoch.
        mean, std: normalisation, in [0, 1] pixel units. label_smoothing: applied to the soft targets.
        class_names: names of the classes (default: ``dataset.classes``); recipes that prompt with class names
            need them.
        generation_size: the size the generator works at (default: the recipe's, e.g. 512 for GenMix; the
            training size with ``generator="tiny"``).
        warmup: before the first batch, wait until the pool holds this many generated samples.
        recipe_options: keyword arguments for the recipe (prompts, num_inference_steps, lam, ...); an unknown one
            is an error that lists the recipe's options.
        fractals: a folder of fractal images (PixMix/IPMix sets) or None for the built-in procedural bank.
        generator_batch_size: source images per pipeline call in each producer.
        compile_unet: ``torch.compile`` the denoiser in producers: False, True, or a mode ("max-autotune",
            "reduce-overhead", ...).
        load_policy: the producers' whole :class:`~onlineaug.models.LoadPolicy` (dtype, compile mode, compiled VAE,
            fused QKV, channels-last, ``cudnn.benchmark``) instead of ``compile_unet`` alone; the benchmarks use it.
        max_restarts, restart_window_s: producer restarts allowed in any window of that many seconds before the
            loader raises (a budget per window: occasional OOM kills over a long run do not end it).
        heartbeat_timeout_s, startup_timeout_s: a producer silent for that long (while producing / before its
            first batch) is reported, killed and restarted.
        out_dtype: dtype of the returned images (float32, or float16/bfloat16 for AMP training).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` for the batch-time kernels.
        prefetch: batches assembled ahead of the one being trained on; on CUDA their host-to-device copies run
            on a side stream meanwhile (0: assemble each batch when it is asked for).
        rank: this trainer's rank in distributed training, folded into every seed so that ranks draw and
            generate different samples (default: ``torch.distributed.get_rank()`` when initialised, else 0).
        return_info: yield ``(images, targets, info)``: ``info`` is a dict of (B,) tensors on ``device`` with
            ``generated``, ``index`` (the real sample's dataset index, or the generated sample's source),
            ``label`` and the recipe's own per-sample fields.
        cache_dir: a folder for what is worth keeping across runs (the recipe's preparation, e.g. DiffCoRe-Mix's
            thresholds), keyed by dataset, models and settings; and the sample store (:mod:`onlineaug.store`):
            tar shards of what producers generated, under a key of the recipe's settings, models, image size
            and dataset, so that a later loader with the same settings starts with a full pool.
        store_policy: what the loader does with the sample store under ``cache_dir``: ``"readwrite"`` (fill the
            pool from it at start, then generate and append), ``"write"`` (start empty, append), or ``"read"``
            (no producers and no generator at all: serve only stored samples, refilled from the store on a
            trainer thread; offline training from ``python -m onlineaug generate``). ``max_reuse`` counts serves
            across the run. Ignored without ``cache_dir``.
        store_shard_size: samples per store shard (a shard becomes visible once complete).
        progress: show progress bars (waiting for ``warmup``, reading labels, preparing). Under ``torchrun``
            progress bars and warnings come from local rank 0 only.
        batch_transforms: a callable on the mixed (B, 3, S, S) float batch in [0, 1] on ``device``, applied to real
            and generated rows alike after mixing and before normalisation, returning a batch of the same shape:
            a kornia ``AugmentationSequential`` (flips, colour jitter, ...) or any function. The recipe then mixes
            without normalising (every recipe normalises with its context's mean and std, so a context of mean 0
            and std 1 yields the mixed batch in [0, 1]; the fused kernels stay fused) and the loader normalises
            after the transforms, in ``out_dtype``. kornia draws its parameters from torch's global generators:
            each batch's call runs under ``torch.random.fork_rng`` with the CPU and ``device`` generators seeded
            from ``(seed, rank, epoch, batch)``, so the draws are reproducible and the caller's random state is
            left as it was.

        miss_window, warn_miss_rate: ``stats()["miss_rate"]`` is the share of the generated samples asked for that
            were misses over the last ``miss_window`` batches; when a whole window is above ``warn_miss_rate``, the
            ``"onlineaug"`` logger warns once with the measured rates and what to change (more generator devices,
            a higher ``max_reuse`` or a lower ``p_aug``, with the numbers :mod:`onlineaug.plan` gives). None: no
            warning.
        log_every, log_fn: every ``log_every`` batches, ``log_fn(stats, step)`` is called with :meth:`stats` and the
            batches served so far (``onlineaug.flat_stats`` makes it a flat dict of numbers for TensorBoard or
            Weights & Biases); without ``log_fn``, the ``"onlineaug"`` logger logs a one-line summary at INFO.

    A generative loader whose first :data:`ONLY_MISSES_BATCHES` batches served no generated sample logs a warning
    (logger ``"onlineaug"``) saying why: what the producers made so far, and what to change.

    Resume: :meth:`state_dict` (a plain dict, for ``torch.save``) taken mid-epoch and given to
    :meth:`load_state_dict` of a new loader with the same settings continues the epoch from the next batch: the same
    real indices, coins and batch-time parameters, the counters of :meth:`stats` (what is generated still depends on
    producer timing). See :mod:`onlineaug.resume`.
    """

    def __init__(self, dataset, recipe: str | Recipe = "genmix", *, num_classes: int, batch_size: int = 64,
                 image_size: int = 224, generator="tiny", models: Mapping | None = None, device="cpu",
                 generator_devices: DeviceSpec = ("cpu",), p_aug: float = 0.5, pool_size: int = 256,
                 max_reuse: int = 8, num_workers: int = 2, seed: int = 0, shuffle: bool | None = None,
                 drop_last: bool = False, sampler=None, pin_memory: bool | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 label_smoothing: float = 0.0, class_names: Sequence[str] | None = None,
                 generation_size: int | None = None, warmup: int = 0, warmup_timeout: float = 600.0,
                 recipe_options: Mapping | None = None, fractals=None, num_fractals: int = 64,
                 generator_batch_size: int = 4, compile_unet: bool | str = False,
                 load_policy: LoadPolicy | None = None, max_restarts: int = 3,
                 restart_window_s: float = 3600.0, heartbeat_timeout_s: float = 300.0,
                 startup_timeout_s: float = 1800.0, out_dtype: torch.dtype = torch.float32, backend: str = "auto",
                 prefetch: int = 1, rank: int | None = None, progress: bool = True, return_info: bool = False,
                 cache_dir: str | os.PathLike | None = None, resize: str = DEFAULT_RESIZE,
                 image_key: str = "image", label_key: str = "label", allow_shared_generator_devices: bool = False,
                 batch_transforms=None, store_policy: str = "readwrite", store_shard_size: int = 64,
                 miss_window: int = 50, warn_miss_rate: float | None = 0.5, log_every: int = 0,
                 log_fn: Callable[[dict, int], None] | None = None,
                 producers: str = "local", ray_address: str | None = None, ray_actors: int = 1,
                 ray_actor_options: Mapping | None = None, ray_group: str | None = None):
        check = _CHECK
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(f"dataset must be a map-style dataset (with __getitem__ and __len__), got "
                            f"{type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError("dataset is empty")
        self.num_classes = check.integer("num_classes", num_classes, low=1)
        self.batch_size = check.integer("batch_size", batch_size, low=1)
        self.image_size = check.integer("image_size", image_size, low=8)
        self.pool_size = check.integer("pool_size", pool_size, low=1)
        self.max_reuse = check.integer("max_reuse", max_reuse, low=1)
        num_workers = check.integer("num_workers", num_workers, low=0)
        self.warmup = check.integer("warmup", warmup, low=0)
        self.generator_batch_size = check.integer("generator_batch_size", generator_batch_size, low=1)
        self.max_restarts = check.integer("max_restarts", max_restarts, low=0)
        self.prefetch = check.integer("prefetch", prefetch, low=0)
        self.seed = check.integer("seed", seed, low=0)
        self.p_aug = check.probability("p_aug", p_aug)
        self.label_smoothing = check.real("label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True)
        self.warmup_timeout = check.real("warmup_timeout", warmup_timeout, low=0.0)
        self.restart_window_s = check.real("restart_window_s", restart_window_s, low=0.0, low_open=True)
        self.heartbeat_timeout_s = check.real("heartbeat_timeout_s", heartbeat_timeout_s, low=0.0, low_open=True)
        self.startup_timeout_s = check.real("startup_timeout_s", startup_timeout_s, low=0.0, low_open=True)
        mean, std = _checked_triple("mean", mean), _checked_triple("std", std, positive=True)
        if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            check._fail(ValueError, "out_dtype", out_dtype, "torch.float32, torch.float16 or torch.bfloat16")
        self.backend = check.choice("backend", backend, _BACKENDS)
        self._layout = distributed.layout()
        self.progress = check.boolean("progress", progress) and self._layout.speaks
        self.return_info = check.boolean("return_info", return_info)
        drop_last = check.boolean("drop_last", drop_last)
        self.rank = _checked_rank(rank)
        self.item_format = ItemFormat(image_key=check.text("image_key", image_key),
                                      label_key=check.text("label_key", label_key),
                                      resize=check.choice("resize", resize, RESIZE_MODES))
        self.cache_dir = None if cache_dir is None else os.path.abspath(os.fspath(cache_dir))
        if batch_transforms is not None and not callable(batch_transforms):
            check._fail(TypeError, "batch_transforms", batch_transforms,
                        "a callable on a (B, 3, H, W) float batch, e.g. kornia.augmentation.AugmentationSequential(...)")
        self.batch_transforms = batch_transforms
        self.store_policy = check.choice("store_policy", store_policy, STORE_POLICIES)
        self.store_shard_size = check.integer("store_shard_size", store_shard_size, low=1)
        self.producer_kind = check.choice("producers", producers, PRODUCER_KINDS)
        self.ray_address, self.ray_group = ray_address, ray_group
        self.ray_actors = check.integer("ray_actors", ray_actors, low=1)
        if ray_actor_options is not None and not isinstance(ray_actor_options, Mapping):
            check._fail(TypeError, "ray_actor_options", ray_actor_options, 'a dict of Ray actor options, e.g. '
                        '{"num_gpus": 1}')
        self.ray_actor_options = None if ray_actor_options is None else dict(ray_actor_options)
        if self.store_policy == "read" and self.cache_dir is None:
            raise ValueError("store_policy='read' serves samples from the sample store under cache_dir: pass "
                             "cache_dir (the folder given to the run or `python -m onlineaug generate` that made it)")
        known = getattr(dataset, "classes", None)
        if isinstance(known, (list, tuple)) and len(known) != num_classes:
            raise ValueError(f"num_classes={num_classes} but the dataset has {len(known)} classes "
                             f"(dataset.classes); pass num_classes={len(known)}")
        if class_names is None and isinstance(known, (list, tuple)) and all(isinstance(n, str) for n in known):
            class_names = known
        if class_names is not None:
            class_names = list(check.strings("class_names", class_names))
            if len(class_names) != num_classes:
                raise ValueError(f"class_names has {len(class_names)} names but num_classes={num_classes}")
        self.class_names = class_names
        if self.warmup > self.pool_size:
            raise ValueError(f"warmup={warmup} can never be reached with pool_size={pool_size}")
        self.miss_window = check.integer("miss_window", miss_window, low=1)
        self.warn_miss_rate = None if warn_miss_rate is None else check.probability("warn_miss_rate", warn_miss_rate)
        self.log_every = check.integer("log_every", log_every, low=0)
        if log_fn is not None and not callable(log_fn):
            check._fail(TypeError, "log_fn", log_fn, "a callable taking (stats, step), e.g. "
                        "lambda stats, step: wandb.log(flat_stats(stats), commit=False)")
        if log_fn is not None and self.log_every == 0:
            raise ValueError("log_fn is called every log_every batches: pass log_every=N (N >= 1) with it")
        self.log_fn = log_fn

        self.recipe = self._make_recipe(recipe, recipe_options, generation_size, generator, models)
        self.generative = self.recipe.generative
        self.device = parse_device(device, "device")
        given = {"generator": generator, "models": models, "generation_size": generation_size, "warmup": warmup,
                 "generator_batch_size": generator_batch_size, "compile_unet": compile_unet,
                 "load_policy": load_policy,
                 "generator_devices": tuple(generator_devices) if isinstance(generator_devices, (list, tuple))
                 else generator_devices, "producers": self.producer_kind}
        if self.generative and self.producer_kind == "ray":
            from onlineaug.ray_pool import import_ray

            import_ray()  # now, not at the first batch: says how to install it
            if given["generator_devices"] != _GENERATION_ARGUMENTS["generator_devices"]:
                raise ValueError(f"generator_devices={generator_devices!r} names this node's devices, but with "
                                 f"producers='ray' the producers are Ray actors: set their number with ray_actors= "
                                 f"and their resources with ray_actor_options= (e.g. {{'num_gpus': 1}})")
            self.generator_devices = [f"ray:{i}" for i in range(self.ray_actors)]
        if self.generative:
            if self.producer_kind == "local":
                self.generator_devices = self._generator_devices(
                    generator_devices, check.boolean("allow_shared_generator_devices", allow_shared_generator_devices))
            if not self.generator_devices:
                raise ValueError(f"recipe {self.recipe.name!r} needs at least one generator device")
            self.policy = _checked_policy(compile_unet, load_policy)
            self.roles = self.recipe.model_roles()
            self.specs = resolve_models(self.roles, self.recipe.main_role, generator, models)
            # slot owners of the local pool: each producer process, or the one Ray feeder
            owners = len(self.generator_devices) if self.producer_kind == "local" else 1
            per_producer = self.pool_size // owners
            if self.generator_batch_size > per_producer:
                raise ValueError(
                    f"generator_batch_size={generator_batch_size} is larger than the {per_producer} pool slots each "
                    f"producer owns (pool_size={pool_size} over {owners} producers): part of "
                    f"every generated batch would be thrown away; raise pool_size or lower generator_batch_size")
        else:
            ignored = [f"{k}={v!r}" for k, v in given.items() if v != _GENERATION_ARGUMENTS[k]]
            if ignored and self._layout.speaks:
                logger.info("onlineaug: recipe %r generates nothing: ignoring %s", self.recipe.name, ", ".join(ignored))
            self.generator_devices, self.roles, self.specs, self.policy = [], {}, {}, LoadPolicy()
        if self.recipe.needs_class_names and self.class_names is None:
            raise ValueError(f"recipe {self.recipe.name!r} builds prompts from class names: pass class_names=[...] "
                             f"(one per class) or use a dataset with a .classes attribute")
        self.generator = generator
        self.dataset = dataset
        self.epoch = 0
        self._epoch_chosen = True  # the first iteration runs epoch 0; later ones advance unless set_epoch is called

        self._sampler_generator = torch.Generator()
        if sampler is None:
            shuffle = True if shuffle is None else check.boolean("shuffle", shuffle)
            if self._layout.distributed:  # a shard per rank, the same permutation on every rank (seed + epoch)
                sampler = DistributedSampler(dataset, num_replicas=self._layout.world_size, rank=self._layout.rank,
                                             shuffle=shuffle, seed=self.seed, drop_last=drop_last)
            elif shuffle:
                sampler = RandomSampler(dataset, generator=self._sampler_generator)
            else:
                sampler = SequentialSampler(dataset)
        elif shuffle:
            raise ValueError("pass either sampler or shuffle=True, not both (as for DataLoader)")
        self.sampler = sampler

        self._dataset_bytes = None
        self._labels = None
        if self.generative:
            fields = self.recipe.pool_fields(self.image_size)
            probe = PoolSpec("", "", self.pool_size, len(self.generator_devices), self.max_reuse, tuple(fields.items()))
            check_shm_capacity(probe.data_bytes + probe.control_bytes, num_slots=self.pool_size,
                               slot_bytes=probe.slot_bytes)
            for role, spec in self.specs.items():  # fail now, not in a producer, if weights are missing
                if not self._reads_store_only:  # (offline training needs no weights)
                    ensure_available(role, self.roles[role], spec, dataset=dataset)
            try:
                self._dataset_bytes = pickle.dumps(dataset)
            except Exception as error:  # noqa: BLE001 - any pickling failure means the same thing
                raise TypeError(f"the dataset must be picklable to reach the producer processes (as for "
                                f"DataLoader workers under spawn): {error}") from error
            if self.recipe.needs_labels:
                fmt = self.item_format
                self._labels = dataset_labels(dataset, self.num_classes, progress=self.progress,
                                              label_of=lambda data, index: load_label(data, index, num_classes, fmt))
        self.store_dir, self._store_manifest = self._store_location()
        if self._reads_store_only and not self.generative:
            raise ValueError(f"store_policy='read' serves stored generated samples, but recipe {self.recipe.name!r} "
                             f"generates nothing; leave store_policy at its default")
        if self._reads_store_only and not SampleStore(self.store_dir, {}).shards():
            raise FileNotFoundError(
                f"store_policy='read' but the sample store for these settings ({self.store_dir}) holds no complete "
                f"shard: generate samples first (`python -m onlineaug generate --out {self.cache_dir} ...`, or a run "
                f"with store_policy='readwrite'), with the same recipe, recipe_options, models, image_size, resize "
                f"and dataset (any of them changes the store's key)")

        pin = self.device.type == "cuda" if pin_memory is None else check.boolean("pin_memory", pin_memory)
        # each index reaches its worker with the epoch; a pass can start after the batches already handed out
        self._item_sampler = ResumableSampler(sampler, self.batch_size)
        self._dataloader = DataLoader(
            UInt8ImageDataset(dataset, self.image_size, self.num_classes, self.item_format, seed=self.seed,
                              rank=self.rank), batch_size=self.batch_size,
            sampler=self._item_sampler, num_workers=num_workers, pin_memory=pin, drop_last=drop_last,
            persistent_workers=num_workers > 0)
        if drop_last and len(self._dataloader) == 0 and self._layout.speaks:
            warnings.warn(f"drop_last=True with batch_size={batch_size} larger than the {len(sampler)} samples the "
                          f"sampler yields: every epoch is empty; lower batch_size or set drop_last=False",
                          RuntimeWarning, stacklevel=2)

        fractal_images = None
        if self.recipe.uses_fractals:
            from onlineaug.fractals import FractalBank

            if fractals is None:
                bank = FractalBank.procedural(count=num_fractals, size=self.image_size,
                                              seed=derive_seed(self.seed, "fractals"), device=self.device)
            elif isinstance(fractals, FractalBank):
                bank = fractals.resized(self.image_size).to(self.device)
            else:
                bank = FractalBank.from_folder(fractals, self.image_size, device=self.device)
            fractal_images = bank.images
        self.context = BatchContext(
            num_classes=self.num_classes, image_size=self.image_size,
            mean=torch.tensor(mean, dtype=torch.float32, device=self.device),
            std=torch.tensor(std, dtype=torch.float32, device=self.device),
            label_smoothing=self.label_smoothing, out_dtype=out_dtype, p_aug=self.p_aug,
            fractals=fractal_images, backend=self.backend)
        # with batch_transforms the recipe mixes unnormalised: (x - 0) / 1 in float32 is the mixed batch in [0, 1]
        self._unnormalised_context = dataclasses.replace(
            self.context, mean=torch.zeros(3, device=self.device), std=torch.ones(3, device=self.device),
            out_dtype=torch.float32) if batch_transforms is not None else None
        self._only_misses_logged = False

        self._resources = _Resources()
        self._resources.dataloader = self._dataloader
        self._finalizer = weakref.finalize(self, self._resources.release)
        self._counts = {"batches": 0, "real": 0, "generated": 0, "fresh": 0, "reused": 0, "misses": 0}
        self._monitor = ServeMonitor(self.num_classes, self.miss_window, self.warn_miss_rate)
        self._carried = dict.fromkeys(_POOL_COUNTERS, 0)  # the pool's counters of the run a state was saved in
        self._carried_rejected: dict[str, int] = {}
        self._pass: EpochPass | None = None  # the pass in progress (or the last one): what state_dict() saves
        self._pending: dict | None = None  # a loaded mid-epoch state, for the next pass
        self._warmed = False
        self._store_counts: dict[str, int] = {}  # samples per store shard (shards never change once visible)
        self._last_pool_stats: dict | None = None
        self._store_loaded = 0  # samples the warm start loaded from the sample store
        self._sources_fingerprint: str | None = None
        self._assembler = BatchAssembler(self.recipe, None, device=self.device, image_size=self.image_size,
                                         batch_size=self.batch_size, p_aug=self.p_aug, ring_size=self.prefetch + 2)

    @property
    def _reads_store_only(self) -> bool:
        return self.store_policy == "read" and self.cache_dir is not None

    def _store_location(self) -> tuple[str | None, dict | None]:
        """The sample store's folder for this loader's settings, and its manifest (None, None: no store)."""
        if not self.generative or self.cache_dir is None:
            return None, None
        key, manifest = store_key(recipe=self.recipe, roles=self.roles, specs=self.specs, image_size=self.image_size,
                                  fields=self.recipe.pool_fields(self.image_size), resize=self.item_format.resize,
                                  dataset_fingerprint=fingerprint_bytes(self._dataset_bytes))
        return store_path(self.cache_dir, self.recipe.name, key), manifest

    def _generator_devices(self, spec, allow_shared: bool) -> list[str]:
        """This rank's generator devices from ``generator_devices`` (see :func:`assign_generator_devices`),
        agreed with the other ranks (a collective under ``torch.distributed``: a rank's error is raised on all)."""
        layout = self._layout
        trainer_gpu = self.device.index if self.device.type == "cuda" else None
        num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices, failure = [], None
        try:
            devices = _checked_devices(assign_generator_devices(
                num_gpus, layout.local_rank, layout.local_world_size, spec, trainer_gpu=trainer_gpu,
                allow_shared=allow_shared))
        except (TypeError, ValueError) as error:
            failure = error
        distributed.agree_on_generator_devices(layout, self.device, devices, failure, allow_shared=allow_shared)
        return devices

    def _make_recipe(self, recipe, recipe_options, generation_size, generator, models) -> Recipe:
        if recipe_options is not None and not isinstance(recipe_options, Mapping):
            _CHECK._fail(TypeError, "recipe_options", recipe_options, "a dict of the recipe's options")
        options = dict(recipe_options or {})
        if not isinstance(recipe, str):
            if generation_size is not None:
                raise ValueError("with a Recipe instance, set its generation size on the recipe itself")
            return get_recipe(recipe, **options)
        made = get_recipe(recipe, **options)
        if not made.generative or "generation_size" not in made.option_names():
            return made
        if generation_size is None and "generation_size" not in options and _is_tiny(generator, models, made):
            # the tiny generator is for tests and demos: at the recipe's paper size (512 px) on a CPU it would
            # produce nothing for minutes; generate at the training size instead
            generation_size = -(-self.image_size // 8) * 8
        if generation_size is not None:
            options["generation_size"] = generation_size  # validated by the recipe
            return get_recipe(recipe, **options)
        return made

    # ------------------------------------------------------------------------------------- lifecycle
    def start(self) -> "OnlineGenAugLoader":
        """Create the pool and start the producers (done by ``with`` or the first iteration)."""
        if not self._finalizer.alive:
            raise RuntimeError("this loader is closed; create a new one")
        if not self.generative or self._resources.pool is not None:
            return self
        if os.environ.get(PRODUCER_ENV) == "1":
            raise RuntimeError(
                "an OnlineGenAugLoader was started inside a producer process: the producer imports your script "
                "(it defines a class the producers need) and the script starts training when imported. Put the "
                "training code under `if __name__ == \"__main__\":`, or define the dataset in a module.")
        resources = self._resources
        try:
            recipe = self.recipe
            resources.pool = SamplePool.create(
                recipe.pool_fields(self.image_size), num_slots=self.pool_size,
                num_producers=1 if self._reads_store_only or self.producer_kind == "ray" else len(
                    self.generator_devices), max_reuse=self.max_reuse,
                counter_names=counter_names(recipe), backpressure=recipe.serve_match is None)
            resources.sources = SharedSources.create(len(self.dataset))
            sources = self._publish_sources()
            if self.store_dir is not None:
                store = SampleStore.open(self.store_dir, self._store_manifest, create=self.store_policy != "read")
                if self._reads_store_only:  # offline training: the store is the only producer
                    resources.feeder = StoreFeeder(store, resources.pool, lambda: self._assembler.allowed,
                                                   max_reuse=self.max_reuse, seed=derive_seed(self.seed, "store",
                                                                                              self.rank))
                    resources.feeder.fill()  # before the first batch: a full pool from the start
                    resources.feeder.start()
                    self._assembler.pool = resources.pool
                    return self
                if self.store_policy == "readwrite":
                    self._store_loaded += _warm_start(resources.pool, store, self._assembler.allowed,
                                                      derive_seed(self.seed, "store", self.rank))
            resources.report_dir = make_report_dir()
            settings = self._producer_settings(sources, resources.report_dir)
            if self.producer_kind == "ray":
                self._start_ray(settings, sources)
                self._assembler.pool = resources.pool
                return self
            threads = producer_threads(_cpu_count(), self._layout.local_world_size,
                                       sum(1 for d in self.generator_devices if d == "cpu"))
            shared = Shared(resources.pool.spec, resources.sources.name, len(self.dataset), resources.report_dir)
            resources.producers = ProducerGroup(
                settings, self.generator_devices, shared,
                num_threads=[threads if d == "cpu" else None for d in self.generator_devices],
                max_restarts=self.max_restarts, restart_window_s=self.restart_window_s,
                heartbeat_timeout_s=self.heartbeat_timeout_s, startup_timeout_s=self.startup_timeout_s)
            resources.producers.attach_pool(resources.pool)
            resources.producers.start()
        except BaseException:
            resources.release()  # no half-started loader: the next start() begins afresh
            resources.dataloader = self._dataloader
            raise
        self._assembler.pool = resources.pool
        return self

    def _start_ray(self, settings: ProducerSettings, sources: SourceSet) -> None:
        """producers="ray": attach to the group's actors and start the feeder that fills the local pool."""
        from onlineaug.ray_pool import RayProducers
        from onlineaug.store import ShardWriter

        writer = None
        if settings.store_dir is not None:  # the store is written on the trainer's node, by the feeder
            writer = ShardWriter(settings.store_dir, settings.pool_fields, settings.store_shard_size)
            settings = dataclasses.replace(settings, store_dir=None)
        resources = self._resources
        resources.ray = RayProducers(settings, resources.pool, dataset_fingerprint=fingerprint_bytes(
            self._dataset_bytes), count=self.ray_actors, actor_options=self.ray_actor_options, group=self.ray_group,
            address=self.ray_address, max_restarts=self.max_restarts, store_writer=writer)
        resources.ray.publish_sources(sources.indices, sources.probabilities)
        resources.ray.start()

    def _producer_settings(self, sources: SourceSet, report_dir: str) -> ProducerSettings:
        settings = ProducerSettings(
            recipe=self.recipe, dataset=self.dataset, num_classes=self.num_classes, class_names=self.class_names,
            image_size=self.image_size, batch_size=self.generator_batch_size, seed=self.seed,
            trainer_rank=self.rank, roles=self.roles, specs=self.specs, policy=self.policy,
            pool_fields=self.recipe.pool_fields(self.image_size), labels=self._labels, item_format=self.item_format)
        if self.store_dir is not None and self.store_policy in ("write", "readwrite"):
            settings.store_dir, settings.store_shard_size = self.store_dir, self.store_shard_size
            settings.store_run = len(SampleStore(self.store_dir, {}).shards())
        key = prepare_cache_key(settings, fingerprint_bytes(self._dataset_bytes), sources)
        if key is not None:
            settings.prepared_path = os.path.join(report_dir, "prepared.pt")
            if self.cache_dir is not None:
                settings.prepare_cache_path = os.path.join(self.cache_dir, "prepared", f"{self.recipe.name}-{key}.pt")
        index_key = index_cache_key(settings, fingerprint_bytes(self._dataset_bytes)) if self.cache_dir else None
        if index_key is not None:  # the recipe's per-index results (De-DA's segmentation), next to its preparation
            settings.index_cache_dir = os.path.join(self.cache_dir, "prepared", f"{self.recipe.name}-index-{index_key}")
        return settings

    def _publish_sources(self) -> SourceSet:
        """Tell the producers (and the batch assembler) which indices the sampler yields this epoch."""
        indices, weights = sampler_sources(self.sampler, len(self.dataset))
        labels = self._labels[indices] if self._labels is not None else None
        sources = SourceSet(indices, weights, labels)
        fingerprint = sources.fingerprint()
        if fingerprint != self._sources_fingerprint:
            self._resources.sources.publish(sources.indices, sources.probabilities)
            if self._resources.ray is not None:  # the source set travels with the Ray jobs
                self._resources.ray.publish_sources(sources.indices, sources.probabilities)
            self._assembler.allowed = sources.allowed_mask(len(self.dataset))
            self._sources_fingerprint = fingerprint
        return sources

    def close(self) -> None:
        """Stop the producers and DataLoader workers and free every shared-memory segment. Idempotent."""
        if self._finalizer.alive and self._resources.pool is not None:
            self._last_pool_stats = self._pool_stats()
        self._finalizer()

    def __enter__(self) -> "OnlineGenAugLoader":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pool(self) -> SamplePool | None:
        return self._resources.pool

    @property
    def producers(self) -> ProducerGroup | None:
        return self._resources.producers

    @property
    def ray_producers(self):
        """producers="ray": this loader's :class:`~onlineaug.ray_pool.RayProducers` once started (else None)."""
        return self._resources.ray

    def wait_for_pool(self, count: int, timeout: float | None = None) -> None:
        """Block until the pool holds ``count`` ready generated samples (raising producer failures)."""
        if not self.generative or count <= 0:
            return
        self.start()
        timeout = self.warmup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=count, desc=f"warmup: generating with {self.generator}", unit="img", leave=False)
        try:
            while (ready := self.pool.ready_count(self._assembler.allowed)) < count:
                self._check_running()
                if bar is not None and ready != bar.n:
                    bar.n = ready
                    bar.refresh()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the pool holds {ready} of the {count} generated samples asked for after "
                                       f"{timeout:.0f} s; producers made {int(self.pool.produced.sum())} so far. "
                                       f"Lower warmup, add generator_devices, or raise warmup_timeout")
                time.sleep(0.05)
        finally:
            if bar is not None:
                bar.close()

    # ------------------------------------------------------------------------------------- iteration
    def __len__(self) -> int:
        return len(self._dataloader)

    def set_epoch(self, epoch: int) -> None:
        """Reseed this epoch's shuffling and mixing (and forward to a sampler that has ``set_epoch``).

        After :meth:`load_state_dict` of a mid-epoch state, ``set_epoch`` of the saved epoch keeps the saved position
        (the next pass continues it); another epoch drops it, with a warning."""
        epoch = _CHECK.integer("epoch", epoch, low=0)
        if self._pending is not None and epoch != self._pending["epoch"]:
            logger.warning("onlineaug: set_epoch(%d) after load_state_dict of a state saved at batch %d of epoch %d: "
                           "epoch %d starts from its first batch and the saved position is dropped; call "
                           "set_epoch(%d), or none, to continue the saved epoch", epoch,
                           self._pending["batches_in_epoch"], self._pending["epoch"], epoch, self._pending["epoch"])
            self._pending = None
        if self._pass is not None and not self._pass.finished:
            self._pass = None  # a pass left midway is over: the next one starts its epoch from the first batch
        self.epoch = epoch
        self._epoch_chosen = True
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)

    def __iter__(self):
        self.start()
        if self.warmup and not self._warmed:
            self.wait_for_pool(self.warmup)
        self._warmed = True
        resume, self._pending = self._pending, None
        if not self._epoch_chosen:  # a new pass without set_epoch: the next epoch, reshuffled as by a DataLoader
            self.set_epoch(self.epoch + 1)
        self._epoch_chosen = False
        if self.generative and epoch_dependent(self.sampler):
            self._publish_sources()
        self._sampler_generator.manual_seed(derive_seed(self.seed, "sampler", self.rank, self.epoch))
        self._item_sampler.epoch = self.epoch  # seeds this epoch's random crops
        coins = numpy_generator(self.seed, "replace", self.rank, self.epoch)
        params_generator = torch_generator(self.seed, "params", self.rank, self.epoch, device=self.device)
        sampler_generator = getattr(self.sampler, "generator", None)
        if not isinstance(sampler_generator, torch.Generator):
            sampler_generator = None
        epoch_pass = self._begin_pass(resume, coins, params_generator, sampler_generator)
        assembler = self._assembler

        def assemble(images, labels, indices):
            ready = assembler.assemble(images, labels, indices, coins)
            ready.coins_state = coins.bit_generator.state  # the coins after this batch: what a resume continues
            return ready

        batches = prefetch_batches(self._dataloader, assemble, depth=self.prefetch, before_each=self._check_running)
        for ready in batches:
            step = epoch_pass.delivered  # this batch's number in the epoch (a resumed pass starts above 0)
            batch = ready.wait()
            params = self.recipe.sample_params(batch, self.context, params_generator)
            if self.batch_transforms is None:
                images, targets, info = _with_info(self.recipe.apply(batch, params, self.context))
            else:
                images, targets, info = _with_info(self.recipe.apply(batch, params, self._unnormalised_context))
                images = self._transform_and_normalise(images, step)
            epoch_pass.delivered += 1
            epoch_pass.coins_state = ready.coins_state
            snapshots = self._item_sampler.snapshots
            if snapshots:  # a stateful sampler: its state after the batches handed out, not after those drawn ahead
                epoch_pass.sampler_state = snapshots.pop(epoch_pass.delivered, epoch_pass.sampler_state)
                for drawn in [n for n in snapshots if n < epoch_pass.delivered]:
                    del snapshots[drawn]
            self._served(ready)
            if self.return_info:
                yield images, targets, {"generated": batch.generated, "index": batch.fields["index"],
                                        "label": batch.fields["label"], **info}
            else:
                yield images, targets
            # The consumer owns the batch now: holding it here until the next one is mixed would keep a
            # second batch of images alive meanwhile (on the CPU: new pages, ~770 page faults per 3 MiB batch
            # at B=64, 64 px, one thread, once glibc trims the freed memory; on a GPU: peak memory).
            del ready, batch, params, images, targets, info
        epoch_pass.complete = True

    def _begin_pass(self, resume: dict | None, coins, params_generator: torch.Generator,
                    sampler_generator: torch.Generator | None) -> EpochPass:
        """This pass's :class:`EpochPass`; with ``resume`` (a loaded mid-epoch state), the saved states set first."""
        start, sampler_state = 0, None
        if resume is not None:
            start, sampler = resume["batches_in_epoch"], resume["sampler"]
            coins.bit_generator.state = resume["rng"]["coins"]
            params_generator.set_state(resume["rng"]["params"])
            if sampler["kind"] == "generator":
                sampler_generator.set_state(sampler["generator"])
            sampler_state = sampler.get("state")
            self._item_sampler.resume_at(start * self.batch_size, sampler_state)
        self._pass = EpochPass(
            self.epoch, start, len(self._dataloader), params_generator, numpy_state(coins.bit_generator.state),
            sampler_generator=sampler_generator.get_state() if sampler_generator is not None else None,
            sampler_state=sampler_state)
        return self._pass

    def _served(self, ready) -> None:
        """Count one batch handed out; the warnings and the ``log_every`` hook."""
        self._counts["batches"] += 1
        for key, value in ready.counts.items():
            self._counts[key] += value
        self._monitor.record(ready.counts, ready.generated_labels)
        if self.generative and not self._only_misses_logged:
            self._log_only_misses()
        if self.generative and self._monitor.should_warn() and self._layout.speaks:
            self._log_miss_rate()
        if self.log_every and self._counts["batches"] % self.log_every == 0:
            stats = self.stats()
            if self.log_fn is not None:
                self.log_fn(stats, self._counts["batches"])
            elif self._layout.speaks:
                logger.info("onlineaug: batch %d: generated %.1f%% (%d), misses %d (%.0f%% over the last %d batches), "
                            "%d produced, pool %d/%d ready", stats["batches"], stats["generated_share"] * 100,
                            stats["generated"], stats["misses"], stats["miss_rate"] * 100, self.miss_window,
                            stats["produced"], stats["pool_ready"], stats["pool_size"])

    def _log_miss_rate(self) -> None:
        """Once: the miss rate stayed above ``warn_miss_rate`` for a whole window; what to change, with numbers."""
        monitor = self._monitor
        produced_per_s = self._pool_stats()["gen_images_per_s"] if self.pool is not None else 0.0
        producers = max(1, len(self.generator_devices))
        logger.warning("onlineaug: %s. stats() reports miss_rate as it goes; warn_miss_rate=None silences this.",
                       miss_rate_advice(monitor.miss_rate(), self.miss_window, p_aug=self.p_aug,
                                        max_reuse=self.max_reuse, generators=producers,
                                        trainer_images_per_s=monitor.samples_per_s(),
                                        producer_images_per_s=produced_per_s / producers if produced_per_s else None))

    # ------------------------------------------------------------------------------------------ resume
    def _resume_settings(self) -> dict:
        """What decides the remaining batches of an epoch: a state loads only into a loader where these agree."""
        try:
            sampler_length = len(self.sampler)
        except TypeError:
            sampler_length = None
        return {"batch_size": self.batch_size, "seed": self.seed, "rank": self.rank, "dataset_length": len(self.dataset),
                "sampler": type(self.sampler).__name__, "sampler_length": sampler_length,
                "drop_last": self._dataloader.drop_last, "recipe": self.recipe.name, "num_classes": self.num_classes,
                "image_size": self.image_size}

    def state_dict(self) -> dict:
        """Where this loader stands, as a plain dict (for ``torch.save`` beside the model's checkpoint).

        Taken mid-epoch (between two batches, or after leaving the loop), it holds the epoch, the batches handed out
        in it, the coins' and the batch-time parameters' generator states after the last of them (not after the
        batches assembled ahead), what the sampler needs to yield the same order, and the counters of
        :meth:`stats`. :meth:`load_state_dict` on a new loader with the same settings continues from the next batch.
        Raises ``TypeError`` for a sampler whose order cannot be saved (:func:`onlineaug.resume.sampler_kind` says
        what to change).
        """
        kind = sampler_kind(self.sampler, self._item_sampler.iterator)
        position, current = None, self._pass
        if current is not None and not current.finished:
            position = {"epoch": current.epoch, "batches_in_epoch": current.delivered,
                        "rng": {"coins": current.coins_state, "params": current.params.get_state()},
                        "sampler": {"kind": kind,
                                    "generator": current.sampler_generator if kind == "generator" else None,
                                    "state": current.sampler_state if kind == "stateful" else None}}
        elif self._pending is not None:  # loaded and not resumed yet: the same position again
            position = self._pending
        stats = self._local_stats()
        return {"version": STATE_VERSION, "settings": self._resume_settings(), "epoch": self.epoch,
                "epoch_chosen": self._epoch_chosen, "position": position, "counts": dict(self._counts),
                "pool_counters": {key: stats[key] for key in _POOL_COUNTERS}, "rejected": dict(stats["rejected"]),
                "monitor": self._monitor.state_dict(), "only_misses_logged": self._only_misses_logged}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Continue from :meth:`state_dict` of a loader with the same settings: the next pass resumes the saved
        epoch from the batch after the last one handed out (later passes proceed as usual), and :meth:`stats`
        continues from the saved counters. Call it before iterating."""
        if not isinstance(state_dict, Mapping) or "version" not in state_dict or "settings" not in state_dict:
            raise TypeError(f"load_state_dict takes what OnlineGenAugLoader.state_dict() returned, got "
                            f"{type(state_dict).__name__}")
        if state_dict["version"] != STATE_VERSION:
            raise ValueError(f"this state has format version {state_dict['version']}; this onlineaug reads "
                             f"version {STATE_VERSION}")
        check_settings(state_dict["settings"], self._resume_settings())
        position = state_dict["position"]
        if position is not None and position["sampler"]["kind"] == "generator" and \
                not isinstance(getattr(self.sampler, "generator", None), torch.Generator):
            raise ValueError(f"this state saved the generator of the sampler; this loader's "
                             f"{type(self.sampler).__name__} has none")
        self._monitor.load_state_dict(state_dict["monitor"])  # first: it checks the number of classes
        self._counts = {key: int(state_dict["counts"][key]) for key in self._counts}
        # stats() = this run's pool counters + carried: carried makes them the saved ones now
        live = self._pool_stats() if self.pool is not None else {"rejected": {}, **dict.fromkeys(_POOL_COUNTERS, 0)}
        self._carried = {key: int(state_dict["pool_counters"][key]) - live[key] for key in _POOL_COUNTERS}
        self._carried_rejected = {reason: int(count) - live["rejected"].get(reason, 0)
                                  for reason, count in state_dict["rejected"].items()}
        self._only_misses_logged = bool(state_dict["only_misses_logged"])
        self._pass, self._pending = None, None
        if position is not None:
            self.set_epoch(position["epoch"])
            self._pending = dict(position)
        else:
            self.set_epoch(state_dict["epoch"])
            self._epoch_chosen = bool(state_dict["epoch_chosen"])

    def _transform_and_normalise(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """``batch_transforms`` on the mixed [0, 1] batch (global RNG seeded per batch), then normalisation."""
        seed = derive_seed(self.seed, f"batch_transforms/{step}", self.rank, self.epoch)
        with _seeded_global_rng(self.device, seed):
            transformed = self.batch_transforms(images)
        if not isinstance(transformed, torch.Tensor) or transformed.shape != images.shape:
            got = tuple(transformed.shape) if isinstance(transformed, torch.Tensor) else type(transformed).__name__
            raise TypeError(f"batch_transforms must return the batch as one tensor of the shape it was given, "
                            f"{tuple(images.shape)}; got {got}. Keep the size (e.g. RandomResizedCrop to "
                            f"({self.image_size}, {self.image_size})) and return only the images")
        if transformed.device != images.device:
            raise ValueError(f"batch_transforms returned the batch on {transformed.device}, not on the trainer's "
                             f"device {images.device}")
        mean, std = self.context.mean.view(1, -1, 1, 1), self.context.std.view(1, -1, 1, 1)
        return transformed.float().sub(mean).div_(std).to(self.context.out_dtype)

    def _log_only_misses(self) -> None:
        """Once: warn when the first batches served nothing generated although samples were wanted."""
        counts = self._counts
        if counts["generated"] > 0:
            self._only_misses_logged = True  # it generates: nothing to say, ever
            return
        if counts["batches"] < ONLY_MISSES_BATCHES or counts["misses"] == 0:
            return
        self._only_misses_logged = True
        if not self._layout.speaks:  # under torchrun, warnings come from local rank 0 only
            return
        produced = int(self.pool.produced.sum()) if self.pool is not None else 0
        steps = getattr(self.recipe, "num_inference_steps", None)
        settings = (f"recipe {self.recipe.name!r}, {self.generator!r} at {self.recipe.generation_size} px"
                    + (f", {steps} denoising steps" if steps is not None else "")
                    + f", {self.generator_batch_size} per call on {', '.join(self.generator_devices)}")
        if produced == 0:
            why = (f"no producer has finished a generation yet ({settings}); a producer loads its models before "
                   f"its first batch")
        else:
            why = (f"the producers made {produced} samples ({settings}) but none could be served: each was "
                   f"served max_reuse={self.max_reuse} times already, or none matched what the sampler yields")
        logger.warning(
            "onlineaug: the first %d batches served only misses (%d real samples stood in for generated ones): %s. "
            "Fill the pool before training with warmup=N (or loader.wait_for_pool(N)), generate faster (a lower "
            "generation_size or recipe_options={'num_inference_steps': ...}), or add generator_devices; "
            "stats() counts misses as they happen.", counts["batches"], counts["misses"], why)

    def _check_running(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("this loader was closed while iterating over it")
        if self.producers is not None:
            self.producers.poll(min_interval_s=0.2)
        if self._resources.ray is not None:
            self._resources.ray.poll()
        feeder = self._resources.feeder
        if feeder is not None and feeder.error is not None:
            raise RuntimeError(f"reading the sample store {self.store_dir} failed: {feeder.error}") from feeder.error

    # ----------------------------------------------------------------------------------------- stats
    def _pool_stats(self) -> dict:
        pool, producers = self.pool, self.producers
        produced = int(pool.produced.sum())
        started = pool.started_ns[pool.started_ns > 0]
        elapsed = (time.monotonic_ns() - int(started.min())) / 1e9 if started.size else 0.0
        rejected = {reason: int(pool.counters[f"rejected:{reason}"].sum()) for reason in reject_reasons(self.recipe)}
        return {"pool_ready": pool.ready_count(self._assembler.allowed), "pool_size": self.pool_size,
                "produced": produced, "torn_reads": pool.torn, "rejected": rejected,
                "producer_restarts": producers.restarts if producers else (
                    self._resources.ray.restarts if self._resources.ray else 0),
                "producer_hangs": producers.hangs if producers else 0,
                "from_store": self._store_loaded + (self._resources.feeder.loaded if self._resources.feeder else 0),
                "gen_images_per_s": produced / elapsed if elapsed > 0 else 0.0}

    def stats(self, reduce: bool = False) -> dict:
        """Counters since construction: samples served, pool state, producer throughput (kept after close).

        ``reduce=True``: the sums over all trainer ranks (``generated_share`` recomputed from them,
        ``gen_images_per_s`` the total rate); a collective under ``torch.distributed``: every rank must call it.
        """
        counts = self._local_stats()
        return _summed_over_ranks(counts) if _CHECK.boolean("reduce", reduce) else counts

    def _local_stats(self) -> dict:
        counts = dict(self._counts)
        served = counts["real"] + counts["generated"]
        counts["generated_share"] = counts["generated"] / served if served else 0.0
        counts["generated_per_class"] = self._monitor.generated_per_class.tolist()  # by the served sample's label
        counts["miss_rate"] = self._monitor.miss_rate()  # over the last miss_window batches
        counts["mean_serves"] = counts["generated"] / counts["fresh"] if counts["fresh"] else 0.0
        if self.pool is not None:
            counts.update(self._pool_stats())
        elif self._last_pool_stats is not None:
            counts.update(self._last_pool_stats, pool_ready=0)
        else:
            counts.update(pool_ready=0, pool_size=self.pool_size if self.generative else 0, produced=0,
                          torn_reads=0, rejected={}, producer_restarts=0, producer_hangs=0, gen_images_per_s=0.0,
                          from_store=0)
        for key in _POOL_COUNTERS:  # a resumed loader continues from the saved run's counters
            counts[key] += self._carried[key]
        if self._carried_rejected:
            counts["rejected"] = {reason: counts["rejected"].get(reason, 0) + self._carried_rejected.get(reason, 0)
                                  for reason in {*counts["rejected"], *self._carried_rejected}}
        counts["store_samples"], counts["store_bytes"] = self._store_size()
        return counts

    def _store_size(self) -> tuple[int, int]:
        """Samples and bytes in the sample store's complete shards (0, 0 without one); each shard is read once."""
        if self.store_dir is None:
            return 0, 0
        shards = SampleStore(self.store_dir, {}).shards()
        samples = size = 0
        for shard in shards:
            try:
                if shard not in self._store_counts:
                    self._store_counts[shard] = shard_samples(shard)
                size += os.path.getsize(shard)
            except FileNotFoundError:  # removed by hand meanwhile
                continue
            samples += self._store_counts[shard]
        return samples, size


def _summed_over_ranks(counts: dict) -> dict:
    """``counts`` (numbers, and the ``rejected`` dict of numbers) summed over the ranks; the same keys on every
    rank, as every rank runs the same recipe."""
    rejected = counts.get("rejected", {})
    keys = sorted(k for k, v in counts.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and k not in ("generated_share", "mean_serves", "miss_rate", "store_samples", "store_bytes"))
    reasons = sorted(rejected)
    per_class = counts["generated_per_class"]
    sums = distributed.sum_over_ranks([counts[k] for k in keys] + [rejected[r] for r in reasons] + per_class
                                      + [counts["miss_rate"], 1])
    out = dict(counts)  # anything not a number stays this rank's (the store is shared: its size is not summed)
    out.update({k: (int(round(v)) if isinstance(counts[k], int) else v) for k, v in zip(keys, sums)})
    out["rejected"] = {r: int(round(v)) for r, v in zip(reasons, sums[len(keys):])}
    out["generated_per_class"] = [int(round(v)) for v in sums[len(keys) + len(reasons):-2]]
    out["miss_rate"] = sums[-2] / sums[-1]  # the mean over ranks
    served = out["real"] + out["generated"]
    out["generated_share"] = out["generated"] / served if served else 0.0
    out["mean_serves"] = out["generated"] / out["fresh"] if out["fresh"] else 0.0
    return out


def _warm_start(pool: SamplePool, store: SampleStore, allowed, seed: int) -> int:
    """Fill the pool's slots from the store (before any producer runs: the trainer may write every slot) with
    samples whose source the sampler allows; returns how many."""
    import numpy as np

    rows = store.load(pool.spec.num_slots, allowed, np.random.default_rng(seed))
    count = len(rows["index"])
    for slot in range(count):
        pool.write(slot, {name: values[slot] for name, values in rows.items()})
    return count


def _cpu_count() -> int:
    """The cores this process may run on (its affinity, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _with_info(result) -> tuple[torch.Tensor, torch.Tensor, dict]:
    if len(result) == 2:
        return result[0], result[1], {}
    return result


@contextlib.contextmanager
def _seeded_global_rng(device: torch.device, seed: int):
    """Seed torch's global CPU generator and ``device``'s (where kornia draws its parameters) for one block, and
    restore both afterwards."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _is_tiny(generator, models, recipe: Recipe) -> bool:
    main = (models or {}).get(recipe.main_role, generator)
    source = main.get("source") if isinstance(main, Mapping) else main
    return isinstance(source, str) and source.startswith("tiny")


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "OnlineGenAugLoader"]
