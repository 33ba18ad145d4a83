"""``OnlineGenAugLoader``: a drop-in training loader that mixes freshly generated samples into every batch.

Data path of one batch (see ``docs/architecture.md``):

1. real samples come through a standard ``torch.utils.data.DataLoader`` (workers, pinned memory) as uint8;
2. each sample is replaced, with probability ``p_aug``, by a generated sample from the shared-memory pool
   (copied from its slot into the batch's host buffers); with nothing ready the real sample is kept and a
   miss is counted: the trainer never waits for the generator;
3. the batch is copied to the trainer's device, and the recipe draws per-sample parameters with an explicit
   ``torch.Generator`` and mixes (fused kernels from :mod:`kernels`): normalised images and soft targets.
"""

from __future__ import annotations

import os
import pickle
import time
import weakref
from typing import Mapping, Sequence

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from onlineaug.batching import BatchAssembler, prefetch_batches
from onlineaug.devices import parse_device
from onlineaug.images import UInt8ImageDataset
from onlineaug.pool import SamplePool, check_shm_capacity
from onlineaug.producer import PRODUCER_ENV, ProducerConfig, ProducerGroup
from onlineaug.recipes import BatchContext, Recipe, get_recipe
from onlineaug.seeding import derive_seed, numpy_generator, torch_generator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Resources:
    """What must be released when the loader is closed or garbage-collected."""

    def __init__(self):
        self.pool: SamplePool | None = None
        self.producers: ProducerGroup | None = None

    def release(self) -> None:
        if self.producers is not None:
            self.producers.stop()
            self.producers = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None


class OnlineGenAugLoader:
    """Iterate ``(images, targets)`` batches with online generative augmentation.

    Args:
        dataset: a map-style dataset of ``(image, label)`` items: PIL images, uint8 (3,H,W) tensors, float
            (3,H,W) tensors in [0,1] or uint8 (H,W,3) arrays. It must be picklable (it is sent to the
            producer processes, like to DataLoader workers under spawn).
        recipe: a registered recipe name (``onlineaug.recipes.available_recipes()``) or a ``Recipe``.
        num_classes: number of classes; targets are (B, num_classes) soft labels whose rows sum to 1.
        batch_size, shuffle, drop_last, num_workers, sampler, pin_memory: as for ``DataLoader`` (``shuffle``
            defaults to True without a sampler).
        image_size: training size; every image is resized to ``image_size`` x ``image_size``.
        generator: ``"tiny"`` (a random-weight pipeline built in-process), a hub id or a local folder.
        device: the trainer's device, where batches are mixed and returned.
        generator_devices: one producer process per entry (e.g. ``["cuda:1", "cuda:2"]``).
        p_aug: per-sample probability of serving a generated sample (or, for CutMix/Mixup, of mixing).
        pool_size: slots in the shared-memory pool; max_reuse: serves per generated sample.
        seed: seeds every random stream (sampler, replacement coins, batch-time parameters, producers), with
            the epoch: ``set_epoch`` chooses it, otherwise each new iteration starts the next epoch.
        mean, std: normalisation, in [0, 1] pixel units. label_smoothing: applied to the soft targets.
        class_names: optional names of the classes (checked against ``num_classes``).
        generation_size: the size the generator works at (default: the recipe's, e.g. 512 for GenMix).
        warmup: before the first batch, wait until the pool holds this many generated samples.
        recipe_options: keyword arguments for the recipe (prompts, num_inference_steps, lam, ...).
        fractals: a folder of fractal images (PixMix/IPMix sets) or None for the built-in procedural bank.
        generator_batch_size: source images per pipeline call in each producer.
        compile_unet: ``torch.compile`` the UNet in CUDA producers.
        max_restarts: producer restarts allowed (in total) before the loader raises.
        out_dtype: dtype of the returned images (float32, or float16/bfloat16 for AMP training).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` for the batch-time kernels.
        prefetch: batches assembled ahead of the one being trained on; on CUDA their host-to-device copies run
            on a side stream meanwhile (0: assemble each batch when it is asked for).
        rank: this trainer's rank in distributed training, folded into every seed so that ranks draw and
            generate different samples (default: ``torch.distributed.get_rank()`` when initialised, else 0).
        progress: show a progress bar while waiting for ``warmup``.
    """

    def __init__(self, dataset, recipe: str | Recipe = "genmix", *, num_classes: int, batch_size: int = 64,
                 image_size: int = 224, generator: str = "tiny", device="cpu",
                 generator_devices: Sequence = ("cpu",), p_aug: float = 0.5, pool_size: int = 256,
                 max_reuse: int = 8, num_workers: int = 2, seed: int = 0, shuffle: bool | None = None,
                 drop_last: bool = False, sampler=None, pin_memory: bool | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 label_smoothing: float = 0.0, class_names: Sequence[str] | None = None,
                 generation_size: int | None = None, warmup: int = 0, warmup_timeout: float = 600.0,
                 recipe_options: Mapping | None = None, fractals=None, num_fractals: int = 64,
                 generator_batch_size: int = 4, compile_unet: bool = False, max_restarts: int = 3,
                 out_dtype: torch.dtype = torch.float32, backend: str = "auto", prefetch: int = 1,
                 rank: int | None = None, progress: bool = True):
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(f"dataset must be a map-style dataset (with __getitem__ and __len__), got "
                            f"{type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError("dataset is empty")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        known = getattr(dataset, "classes", None)
        if isinstance(known, (list, tuple)) and len(known) != num_classes:
            raise ValueError(f"num_classes={num_classes} but the dataset has {len(known)} classes "
                             f"(dataset.classes); pass num_classes={len(known)}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes={num_classes}")
        for name, value, low in (("batch_size", batch_size, 1), ("image_size", image_size, 8),
                                 ("pool_size", pool_size, 1), ("max_reuse", max_reuse, 1),
                                 ("num_workers", num_workers, 0), ("warmup", warmup, 0),
                                 ("generator_batch_size", generator_batch_size, 1), ("max_restarts", max_restarts, 0),
                                 ("prefetch", prefetch, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if not 0.0 <= p_aug <= 1.0:
            raise ValueError(f"p_aug must be a probability in [0, 1], got {p_aug}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if warmup > pool_size:
            raise ValueError(f"warmup={warmup} can never be reached with pool_size={pool_size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got mean={mean}, std={std}")
        if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"out_dtype must be torch.float32, float16 or bfloat16, got {out_dtype}")

        options = dict(recipe_options or {})
        if generation_size is not None:
            if not isinstance(recipe, str):
                raise ValueError("with a Recipe instance, set its generation size on the recipe itself")
            options["generation_size"] = generation_size  # validated by the recipe
        self.recipe = get_recipe(recipe, **options)
        self.device = parse_device(device, "device")
        self.generative = self.recipe.generator_task is not None
        if isinstance(generator_devices, (str, torch.device)):
            generator_devices = [generator_devices]
        self.generator_devices = [str(parse_device(d, "generator_devices")) for d in generator_devices] \
            if self.generative else []
        if self.generative and not self.generator_devices:
            raise ValueError(f"recipe {self.recipe.name!r} needs at least one generator device")
        if self.generative and generator_batch_size > pool_size // len(self.generator_devices):
            raise ValueError(
                f"generator_batch_size={generator_batch_size} is larger than the {pool_size // len(self.generator_devices)} "
                f"pool slots each producer owns (pool_size={pool_size} over {len(self.generator_devices)} producers): "
                f"part of every generated batch would be thrown away; raise pool_size or lower generator_batch_size")
        if rank is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if distributed else 0
        self.rank = int(rank)

        self.dataset = dataset
        self.num_classes, self.class_names = num_classes, list(class_names) if class_names else None
        self.batch_size, self.image_size, self.p_aug = batch_size, image_size, float(p_aug)
        self.pool_size, self.max_reuse, self.seed = pool_size, max_reuse, seed
        self.generator, self.warmup, self.warmup_timeout = generator, warmup, warmup_timeout
        self.generator_batch_size, self.compile_unet, self.max_restarts = generator_batch_size, compile_unet, max_restarts
        self.backend, self.progress, self.prefetch = backend, progress, prefetch
        self.epoch = 0
        self._epoch_chosen = True  # the first iteration runs epoch 0; later ones advance unless set_epoch is called

        if self.generative:
            from onlineaug.pool import PoolSpec

            fields = self.recipe.pool_fields(image_size)
            probe = PoolSpec("", "", pool_size, len(self.generator_devices), max_reuse, tuple(fields.items()))
            check_shm_capacity(probe.data_bytes + probe.control_bytes, num_slots=pool_size,
                               slot_bytes=probe.slot_bytes)
            from onlineaug.generators import ensure_available

            ensure_available(generator, self.recipe.generator_task)  # fail now, not in a producer, if missing
            try:
                pickle.dumps(dataset)
            except Exception as error:  # noqa: BLE001 - any pickling failure means the same thing
                raise TypeError(f"the dataset must be picklable to reach the producer processes (as for "
                                f"DataLoader workers under spawn): {error}") from error

        self._sampler_generator = torch.Generator()
        if sampler is None:
            shuffle = True if shuffle is None else shuffle
            sampler = RandomSampler(dataset, generator=self._sampler_generator) if shuffle else SequentialSampler(dataset)
        elif shuffle:
            raise ValueError("pass either sampler or shuffle=True, not both (as for DataLoader)")
        self.sampler = sampler
        pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        self._dataloader = DataLoader(
            UInt8ImageDataset(dataset, image_size, num_classes), batch_size=batch_size, sampler=sampler,
            num_workers=num_workers, pin_memory=pin, drop_last=drop_last,
            persistent_workers=num_workers > 0)

        fractal_images = None
        if self.recipe.uses_fractals:
            from onlineaug.fractals import FractalBank

            if fractals is None:
                bank = FractalBank.procedural(count=num_fractals, size=image_size,
                                              seed=derive_seed(seed, "fractals"), device=self.device)
            elif isinstance(fractals, FractalBank):
                bank = fractals.resized(image_size).to(self.device)
            else:
                bank = FractalBank.from_folder(fractals, image_size, device=self.device)
            fractal_images = bank.images
        self.context = BatchContext(
            num_classes=num_classes, image_size=image_size,
            mean=torch.tensor(mean, dtype=torch.float32, device=self.device),
            std=torch.tensor(std, dtype=torch.float32, device=self.device),
            label_smoothing=float(label_smoothing), out_dtype=out_dtype, p_aug=self.p_aug,
            fractals=fractal_images, backend=backend)

        self._resources = _Resources()
        self._finalizer = weakref.finalize(self, self._resources.release)
        self._counts = {"batches": 0, "real": 0, "generated": 0, "fresh": 0, "reused": 0, "misses": 0}
        self._assembler = BatchAssembler(self.recipe, None, device=self.device, image_size=image_size,
                                         batch_size=batch_size, p_aug=self.p_aug, ring_size=prefetch + 2)

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
        pool = SamplePool.create(self.recipe.pool_fields(self.image_size), num_slots=self.pool_size,
                                 num_producers=len(self.generator_devices), max_reuse=self.max_reuse)
        self._resources.pool = pool
        cpu_producers = sum(1 for d in self.generator_devices if d == "cpu")
        threads = max(1, (os.cpu_count() or 1) // (cpu_producers + 1)) if cpu_producers else None
        configs = [ProducerConfig(rank=rank, device=dev, generator=self.generator, recipe=self.recipe,
                                  dataset=self.dataset, num_classes=self.num_classes, image_size=self.image_size,
                                  batch_size=self.generator_batch_size, seed=self.seed, trainer_rank=self.rank,
                                  compile_unet=self.compile_unet, num_threads=threads if dev == "cpu" else None)
                   for rank, dev in enumerate(self.generator_devices)]
        self._resources.producers = ProducerGroup(configs, pool.spec, max_restarts=self.max_restarts)
        try:
            self._resources.producers.start()
        except BaseException:
            self._resources.release()  # no half-started loader: the next start() begins afresh
            raise
        return self

    def close(self) -> None:
        """Stop the producers and free every shared-memory segment. Idempotent."""
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
            while (ready := self.pool.ready_count()) < count:
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
        self.epoch = int(epoch)
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
        self._sampler_generator.manual_seed(derive_seed(self.seed, "sampler", self.rank, self.epoch))
        coins = numpy_generator(self.seed, "replace", self.rank, self.epoch)
        params_generator = torch_generator(self.seed, "params", self.rank, self.epoch, device=self.device)
        assembler = self._assembler
        assembler.pool = self.pool
        batches = prefetch_batches(self._dataloader, lambda images, labels, _: assembler.assemble(images, labels, coins),
                                   depth=self.prefetch, before_each=self._check_running)
        for ready in batches:
            batch = ready.wait()
            params = self.recipe.sample_params(batch, self.context, params_generator)
            mixed = self.recipe.apply(batch, params, self.context)
            self._counts["batches"] += 1
            for key, value in ready.counts.items():
                self._counts[key] += value
            yield mixed

    def _check_running(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("this loader was closed while iterating over it")
        if self.producers is not None:
            self.producers.poll(min_interval_s=0.2)

    # ----------------------------------------------------------------------------------------- stats
    def stats(self) -> dict:
        """Counters since construction: samples served, pool state, producer throughput."""
        counts = dict(self._counts)
        served = counts["real"] + counts["generated"]
        counts["generated_share"] = counts["generated"] / served if served else 0.0
        pool = self.pool
        if pool is None:
            counts.update(pool_ready=0, pool_size=self.pool_size if self.generative else 0, produced=0,
                          torn_reads=0, producer_restarts=0, gen_images_per_s=0.0)
            return counts
        produced = int(pool.produced.sum())
        started = pool.started_ns[pool.started_ns > 0]
        elapsed = (time.monotonic_ns() - int(started.min())) / 1e9 if started.size else 0.0
        counts.update(pool_ready=pool.ready_count(), pool_size=self.pool_size, produced=produced,
                      torn_reads=pool.torn,
                      producer_restarts=self.producers.restarts if self.producers else 0,
                      gen_images_per_s=produced / elapsed if elapsed > 0 else 0.0)
        return counts
