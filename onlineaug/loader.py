"""``OnlineGenAugLoader``: a drop-in training loader that mixes freshly generated samples into every batch.

Data path of one batch (see ``docs/architecture.md``):

1. real samples come through a standard ``torch.utils.data.DataLoader`` (workers, pinned memory) as uint8;
2. each sample is replaced, with probability ``p_aug``, by a generated sample from the shared-memory pool
   (copied from its slot into the batch's host buffers); with nothing ready the real sample is kept and a
   miss is counted: the trainer never waits for the generator;
3. the batch is copied to the trainer's device, and the recipe draws per-sample parameters with an explicit
   ``torch.Generator`` and mixes (fused kernels from :mod:`onlineaug.kernels`): normalised images and soft
   targets.

Producers start only from indices the sampler can yield (:mod:`onlineaug.sources`), and the trainer serves only
samples made from them.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import time
import warnings
import weakref
from typing import Mapping, Sequence

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from onlineaug.batching import BatchAssembler, prefetch_batches
from onlineaug.checks import Checks
from onlineaug.devices import parse_device
from onlineaug.images import UInt8ImageDataset
from onlineaug.models import LoadPolicy, ensure_available, resolve_models
from onlineaug.pool import PoolSpec, SamplePool, check_shm_capacity
from onlineaug.producer import ProducerSettings, counter_names, fingerprint_bytes, prepare_cache_key, reject_reasons
from onlineaug.producer_processes import PRODUCER_ENV, ProducerGroup, Shared, make_report_dir
from onlineaug.recipes import BatchContext, Recipe, get_recipe
from onlineaug.seeding import derive_seed, numpy_generator, torch_generator
from onlineaug.sources import SharedSources, SourceSet, dataset_labels, epoch_dependent, sampler_sources

logger = logging.getLogger("onlineaug")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CHECK = Checks("OnlineGenAugLoader", "argument")
_BACKENDS = ("auto", "triton", "torch")
# Loader arguments that only matter to recipes that generate, with their defaults (for the "ignored" log line).
_GENERATION_ARGUMENTS = {"generator": "tiny", "models": None, "generation_size": None, "warmup": 0,
                         "generator_batch_size": 4, "compile_unet": False, "load_policy": None,
                         "generator_devices": ("cpu",)}


class _Resources:
    """What must be released when the loader is closed or garbage-collected."""

    def __init__(self):
        self.pool: SamplePool | None = None
        self.sources: SharedSources | None = None
        self.producers: ProducerGroup | None = None
        self.report_dir: str | None = None
        self.dataloader: DataLoader | None = None

    def release(self) -> None:
        if self.producers is not None:
            self.producers.stop()
            self.producers = None
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
        dataset: a map-style dataset of ``(image, label)`` items: PIL images, uint8 (3,H,W) tensors, float
            (3,H,W) tensors in [0,1] or uint8 (H,W,3) arrays. It must be picklable (it is sent to the
            producer processes, like to DataLoader workers under spawn).
        recipe: a registered recipe name (``onlineaug.recipes.available_recipes()``) or a ``Recipe``.
        num_classes: number of classes; targets are (B, num_classes) soft labels whose rows sum to 1.
        batch_size, shuffle, drop_last, num_workers, sampler, pin_memory: as for ``DataLoader`` (``shuffle``
            defaults to True without a sampler). Producers start only from indices the sampler can yield.
        image_size: training size; every image is resized to ``image_size`` x ``image_size``.
        generator: the recipe's main model (``recipe.main_role``): ``"tiny"`` (random weights built in
            process), ``"full-random"`` (full size, random weights: benchmarks), a hub id or a local folder.
        models: ``{role: source}`` for any of the recipe's model roles (``recipe.model_roles()``): a source
            string, or a dict with ``source``, ``lora``, ``lora_scale``, ``textual_inversion``. Roles not named
            follow ``generator`` when it is a random-weight source, else load their default.
        device: the trainer's device, where batches are mixed and returned.
        generator_devices: one producer process per entry (e.g. ``["cuda:1", "cuda:2"]``).
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
            thresholds), keyed by dataset, models and settings.
        progress: show progress bars (waiting for ``warmup``, reading labels, preparing).
    """

    def __init__(self, dataset, recipe: str | Recipe = "genmix", *, num_classes: int, batch_size: int = 64,
                 image_size: int = 224, generator="tiny", models: Mapping | None = None, device="cpu",
                 generator_devices: Sequence = ("cpu",), p_aug: float = 0.5, pool_size: int = 256,
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
                 cache_dir: str | os.PathLike | None = None):
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
        self.progress = check.boolean("progress", progress)
        self.return_info = check.boolean("return_info", return_info)
        drop_last = check.boolean("drop_last", drop_last)
        self.rank = _checked_rank(rank)
        self.cache_dir = None if cache_dir is None else os.path.abspath(os.fspath(cache_dir))
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

        self.recipe = self._make_recipe(recipe, recipe_options, generation_size, generator, models)
        self.generative = self.recipe.generative
        self.device = parse_device(device, "device")
        given = {"generator": generator, "models": models, "generation_size": generation_size, "warmup": warmup,
                 "generator_batch_size": generator_batch_size, "compile_unet": compile_unet,
                 "load_policy": load_policy,
                 "generator_devices": tuple(generator_devices) if isinstance(generator_devices, (list, tuple))
                 else generator_devices}
        if self.generative:
            self.generator_devices = _checked_devices(generator_devices)
            if not self.generator_devices:
                raise ValueError(f"recipe {self.recipe.name!r} needs at least one generator device")
            self.policy = _checked_policy(compile_unet, load_policy)
            self.roles = self.recipe.model_roles()
            self.specs = resolve_models(self.roles, self.recipe.main_role, generator, models)
            per_producer = self.pool_size // len(self.generator_devices)
            if self.generator_batch_size > per_producer:
                raise ValueError(
                    f"generator_batch_size={generator_batch_size} is larger than the {per_producer} pool slots each "
                    f"producer owns (pool_size={pool_size} over {len(self.generator_devices)} producers): part of "
                    f"every generated batch would be thrown away; raise pool_size or lower generator_batch_size")
        else:
            ignored = [f"{k}={v!r}" for k, v in given.items() if v != _GENERATION_ARGUMENTS[k]]
            if ignored:
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
            sampler = RandomSampler(dataset, generator=self._sampler_generator) if shuffle else SequentialSampler(dataset)
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
                ensure_available(role, self.roles[role], spec, dataset=dataset)
            try:
                self._dataset_bytes = pickle.dumps(dataset)
            except Exception as error:  # noqa: BLE001 - any pickling failure means the same thing
                raise TypeError(f"the dataset must be picklable to reach the producer processes (as for "
                                f"DataLoader workers under spawn): {error}") from error
            if self.recipe.needs_labels:
                self._labels = dataset_labels(dataset, self.num_classes, progress=self.progress)

        pin = self.device.type == "cuda" if pin_memory is None else check.boolean("pin_memory", pin_memory)
        self._dataloader = DataLoader(
            UInt8ImageDataset(dataset, self.image_size, self.num_classes), batch_size=self.batch_size,
            sampler=sampler, num_workers=num_workers, pin_memory=pin, drop_last=drop_last,
            persistent_workers=num_workers > 0)
        if drop_last and len(self._dataloader) == 0:
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

        self._resources = _Resources()
        self._resources.dataloader = self._dataloader
        self._finalizer = weakref.finalize(self, self._resources.release)
        self._counts = {"batches": 0, "real": 0, "generated": 0, "fresh": 0, "reused": 0, "misses": 0}
        self._last_pool_stats: dict | None = None
        self._sources_fingerprint: str | None = None
        self._assembler = BatchAssembler(self.recipe, None, device=self.device, image_size=self.image_size,
                                         batch_size=self.batch_size, p_aug=self.p_aug, ring_size=self.prefetch + 2)

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
                num_producers=len(self.generator_devices), max_reuse=self.max_reuse,
                counter_names=counter_names(recipe), backpressure=recipe.serve_match is None)
            resources.sources = SharedSources.create(len(self.dataset))
            sources = self._publish_sources()
            resources.report_dir = make_report_dir()
            settings = self._producer_settings(sources, resources.report_dir)
            cpu_producers = sum(1 for d in self.generator_devices if d == "cpu")
            threads = max(1, (os.cpu_count() or 1) // (cpu_producers + 1)) if cpu_producers else None
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

    def _producer_settings(self, sources: SourceSet, report_dir: str) -> ProducerSettings:
        settings = ProducerSettings(
            recipe=self.recipe, dataset=self.dataset, num_classes=self.num_classes, class_names=self.class_names,
            image_size=self.image_size, batch_size=self.generator_batch_size, seed=self.seed,
            trainer_rank=self.rank, roles=self.roles, specs=self.specs, policy=self.policy,
            pool_fields=self.recipe.pool_fields(self.image_size), labels=self._labels)
        key = prepare_cache_key(settings, fingerprint_bytes(self._dataset_bytes), sources)
        if key is not None:
            settings.prepared_path = os.path.join(report_dir, "prepared.pt")
            if self.cache_dir is not None:
                settings.prepare_cache_path = os.path.join(self.cache_dir, "prepared", f"{self.recipe.name}-{key}.pt")
        return settings

    def _publish_sources(self) -> SourceSet:
        """Tell the producers (and the batch assembler) which indices the sampler yields this epoch."""
        indices, weights = sampler_sources(self.sampler, len(self.dataset))
        labels = self._labels[indices] if self._labels is not None else None
        sources = SourceSet(indices, weights, labels)
        fingerprint = sources.fingerprint()
        if fingerprint != self._sources_fingerprint:
            self._resources.sources.publish(sources.indices, sources.probabilities)
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
                self.producers.poll()
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
        """Reseed this epoch's shuffling and mixing (and forward to a sampler that has ``set_epoch``)."""
        self.epoch = _CHECK.integer("epoch", epoch, low=0)
        self._epoch_chosen = True
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)

    def __iter__(self):
        self.start()
        if self.warmup and self._counts["batches"] == 0:
            self.wait_for_pool(self.warmup)
        if not self._epoch_chosen:  # a new pass without set_epoch: the next epoch, reshuffled as by a DataLoader
            self.set_epoch(self.epoch + 1)
        self._epoch_chosen = False
        if self.generative and epoch_dependent(self.sampler):
            self._publish_sources()
        self._sampler_generator.manual_seed(derive_seed(self.seed, "sampler", self.rank, self.epoch))
        coins = numpy_generator(self.seed, "replace", self.rank, self.epoch)
        params_generator = torch_generator(self.seed, "params", self.rank, self.epoch, device=self.device)
        assembler = self._assembler
        batches = prefetch_batches(self._dataloader, lambda images, labels, indices: assembler.assemble(
            images, labels, indices, coins), depth=self.prefetch, before_each=self._check_running)
        for ready in batches:
            batch = ready.wait()
            params = self.recipe.sample_params(batch, self.context, params_generator)
            images, targets, info = _with_info(self.recipe.apply(batch, params, self.context))
            self._counts["batches"] += 1
            for key, value in ready.counts.items():
                self._counts[key] += value
            if self.return_info:
                yield images, targets, {"generated": batch.generated, "index": batch.fields["index"],
                                        "label": batch.fields["label"], **info}
            else:
                yield images, targets

    def _check_running(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("this loader was closed while iterating over it")
        if self.producers is not None:
            self.producers.poll(min_interval_s=0.2)

    # ----------------------------------------------------------------------------------------- stats
    def _pool_stats(self) -> dict:
        pool, producers = self.pool, self.producers
        produced = int(pool.produced.sum())
        started = pool.started_ns[pool.started_ns > 0]
        elapsed = (time.monotonic_ns() - int(started.min())) / 1e9 if started.size else 0.0
        rejected = {reason: int(pool.counters[f"rejected:{reason}"].sum()) for reason in reject_reasons(self.recipe)}
        return {"pool_ready": pool.ready_count(self._assembler.allowed), "pool_size": self.pool_size,
                "produced": produced, "torn_reads": pool.torn, "rejected": rejected,
                "producer_restarts": producers.restarts if producers else 0,
                "producer_hangs": producers.hangs if producers else 0,
                "gen_images_per_s": produced / elapsed if elapsed > 0 else 0.0}

    def stats(self) -> dict:
        """Counters since construction: samples served, pool state, producer throughput (kept after close)."""
        counts = dict(self._counts)
        served = counts["real"] + counts["generated"]
        counts["generated_share"] = counts["generated"] / served if served else 0.0
        if self.pool is not None:
            counts.update(self._pool_stats())
        elif self._last_pool_stats is not None:
            counts.update(self._last_pool_stats, pool_ready=0)
        else:
            counts.update(pool_ready=0, pool_size=self.pool_size if self.generative else 0, produced=0,
                          torn_reads=0, rejected={}, producer_restarts=0, producer_hangs=0, gen_images_per_s=0.0)
        return counts


def _with_info(result) -> tuple[torch.Tensor, torch.Tensor, dict]:
    if len(result) == 2:
        return result[0], result[1], {}
    return result


def _is_tiny(generator, models, recipe: Recipe) -> bool:
    main = (models or {}).get(recipe.main_role, generator)
    source = main.get("source") if isinstance(main, Mapping) else main
    return isinstance(source, str) and source.startswith("tiny")


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "OnlineGenAugLoader"]
