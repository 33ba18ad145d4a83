"""What does online augmentation cost the trainer? Vanilla, onlineaug recipes, torchvision and timm, one loop.

Trains a real model for a fixed number of steps (ResNet-50 at 224 px with AMP on a GPU; a small CNN on CPU)
with each batch provider in turn, on the same training loop, model initialisation and data:

* ``vanilla``: a plain ``DataLoader`` of uint8 images, copied to the device and normalised there;
* ``onlineaug <recipe>``: :class:`~onlineaug.OnlineGenAugLoader` for each recipe (GenMix, DiffuseMix, and the
  batch-time CutMix/Mixup recipes); generative recipes run their producer on ``--generator-device``, another
  device than the trainer's, and the pool is filled (``--warmup`` samples) before the timed steps while the
  producer keeps running, so the figure is what the *trainer* pays: pool bookkeeping, copies, collate, mixing;
* ``torchvision CutMix`` / ``MixUp`` (``torchvision.transforms.v2``) and ``timm Mixup`` (cutmix and mixup
  modes, batch mode) applied on the trainer's device to the normalised batch, as their docs show;
Runs are interleaved (A B A B): ``--rounds`` rounds (default 2), each running vanilla and then every other
provider, so slow drift of the machine (clocks, other load) falls on all of them alike. The spread of the
vanilla runs against each other, ``noise floor = (max - min) / mean`` of their seconds, is the A_O that vanilla
shows against itself: an A_O inside it is reported "within noise" (the run cannot tell it from 0), and so is
one whose own runs overlap the vanilla runs' range; the plot draws the band, each provider's min-max over the
rounds, and the 2% target line. One round (``--rounds 1``) has no noise floor.

Reported per provider: seconds for the timed steps (after ``--warmup-steps`` untimed ones; the mean over the
rounds, each run's seconds beside it), steps/s, images/s, A_O = (T_aug - T_van) / T_van (GuidedMixup's
definition, used by DiffuseMix and DiffCoRe-Mix; T_van is the mean of the vanilla runs), whether it is within
noise, host seconds spent waiting for batches, and for onlineaug loaders the generated share, fresh/reused
serves, pool misses and producer output over the timed windows.

    python benchmarks/overhead.py --quick                      # CPU smoke test (small CNN, tiny generator)
    python benchmarks/overhead.py --device cuda:0 --generator-device cuda:1     # ResNet-50, batch 256, AMP
    python benchmarks/overhead.py --host-only        # the loader's host work per batch vs a plain DataLoader (CPU)
    python benchmarks/overhead.py --quick --recipes genmix --producers local ray   # + Ray actors (a local cluster)

``--producers ray`` adds, per generative recipe, a run whose producers are Ray actors (``producers="ray"``, one
per ``--generator-device``, on a local Ray cluster this script starts unless one is running): the trainer then
also runs the feeder thread that fetches their payloads and writes them into its pool. Its row reports that
thread's time per training step (``feeder ms/step``) beside the local producers' run, which has no such thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.data import Dataset

from benchmarks import common
from onlineaug.tables import text_table

ONLINE_RECIPES = ("genmix", "diffusemix", "cutmix", "mixup", "none")
DEFAULT_RECIPES = ["genmix", "diffusemix", "cutmix", "mixup"]
BASELINES = ("tv-cutmix", "tv-mixup", "timm-cutmix", "timm-mixup")
BASELINE_NAMES = {"tv-cutmix": "torchvision CutMix", "tv-mixup": "torchvision MixUp",
                  "timm-cutmix": "timm Mixup (cutmix)", "timm-mixup": "timm Mixup (mixup)"}
MODELS = ("resnet50", "resnet18", "small-cnn")
TARGET_A_O = 0.02  # online GenMix, ResNet-50, batch 256, 224 px, AMP, producer off the trainer GPU
WINDOW_COUNTERS = ("real", "generated", "misses", "fresh", "reused", "produced", "torn_reads")
PRODUCER_KINDS = ("local", "ray")

# --quick: the CPU smoke settings, about a minute on 2 cores.
QUICK = {"model": "small-cnn", "steps": 20, "warmup_steps": 3, "batch_size": 32, "image_size": 32, "pool_size": 64,
         "warmup": 16, "num_inference_steps": 2, "num_workers": 0, "cache_images": 128, "num_classes": 10}


# ------------------------------------------------------------------------------------------------- data
class CachedImages(Dataset):
    """``length`` items cycling over ``cache`` pre-rendered :class:`~onlineaug.datasets.SyntheticShapes` images.

    Rendering costs ~6 ms per 224 px image, which would make the vanilla loader, not the trainer, the bottleneck;
    cached, an item costs what a decoded-JPEG dataset costs after decoding (a view and a collate copy). Labels
    are ``index % num_classes`` (any number of classes, e.g. ImageNet's 1000). The cache is not pickled: each
    process (DataLoader worker, producer) renders its own copy on first use.
    """

    def __init__(self, *, num_classes: int, size: int, length: int, cache: int, seed: int = 0):
        self.num_classes, self.size, self.length, self.cache, self.seed = num_classes, size, length, cache, seed
        self._images = None

    def __len__(self) -> int:
        return self.length

    def _render(self) -> torch.Tensor:
        from onlineaug.datasets import MAX_CLASSES, SyntheticShapes

        shapes = SyntheticShapes(num_classes=min(self.num_classes, MAX_CLASSES), size=self.size, length=self.cache,
                                 seed=self.seed)
        return torch.stack([shapes[i][0] for i in range(self.cache)])

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        if self._images is None:
            self._images = self._render()
        return self._images[index % self.cache], index % self.num_classes

    def __getstate__(self):
        return {**self.__dict__, "_images": None}


# --------------------------------------------------------------------------------------------- settings
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="the trainer's device (default: cuda if available, else cpu)")
    parser.add_argument("--generator-device", nargs="+", default=None,
                        help="producer device(s) (default: cpu with a CPU trainer; cuda:1 on a multi-GPU machine; "
                             "the trainer's GPU on a one-GPU machine, which then includes contention)")
    parser.add_argument("--generator", default="tiny",
                        help='"tiny" (default: keeps the pool full, the worst case for the trainer), "full-random", '
                             "a local folder or a cached hub id")
    parser.add_argument("--model", choices=MODELS, default=None,
                        help="default resnet50 on CUDA, small-cnn on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per provider (default 200)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="untimed steps before timing (default: max(10, 2 x workers + 2))")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 (32 with --quick)")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (32 with --quick)")
    parser.add_argument("--num-classes", type=int, default=None, help="default 1000 (10 with --quick)")
    parser.add_argument("--amp", dest="amp", action="store_true", default=None, help="autocast (default on CUDA)")
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    parser.add_argument("--amp-dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--recipes", nargs="*", default=list(DEFAULT_RECIPES),
                        choices=ONLINE_RECIPES, help="onlineaug recipes to run")
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES,
                        help="torchvision / timm baselines to run")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (A B A B): each runs vanilla, then every other provider; the "
                             "vanilla runs' spread is the noise floor (default 2)")
    parser.add_argument("--no-repeat-vanilla", dest="rounds", action="store_const", const=1,
                        help="one round: every provider once, no noise floor (same as --rounds 1)")
    parser.add_argument("--p-aug", type=float, default=0.5, help="share of samples replaced by generated ones")
    parser.add_argument("--mix-p", type=float, default=1.0,
                        help="per-sample mixing probability of the onlineaug cutmix/mixup recipes (torchvision and "
                             "timm mix every sample)")
    parser.add_argument("--max-reuse", type=int, default=8)
    parser.add_argument("--pool-size", type=int, default=None, help="default 256 (64 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="generated samples in the pool before timing (default: pool size / 4)")
    parser.add_argument("--generation-size", type=int, default=None,
                        help="default: the image size with the tiny generator, the recipe's otherwise")
    parser.add_argument("--num-inference-steps", type=int, default=None,
                        help="default: 2 with the tiny generator, the recipe's otherwise")
    parser.add_argument("--generator-batch-size", type=int, default=4)
    parser.add_argument("--producers", nargs="+", choices=PRODUCER_KINDS, default=["local"],
                        help="where generative recipes' producers run: local processes and/or Ray actors (one run "
                             "each; default local)")
    parser.add_argument("--compile-unet", action="store_true", help="torch.compile the producers' UNet")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers (default: min(8, CPUs - 4) on CUDA, 0 with --quick)")
    parser.add_argument("--cache-images", type=int, default=None, help="distinct images in the dataset (default 512)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on a CPU trainer (default: 1 with --quick, torch's otherwise)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="CPU smoke settings (small CNN, tiny generator)")
    parser.add_argument("--host-only", action="store_true",
                        help="time the loader's host work per batch on the CPU device (no training) against a plain "
                             "DataLoader, interleaved (benchmarks/host_overhead.py; default recipes none cutmix "
                             "mixup genmix, baselines tv-cutmix tv-mixup, batch 64, 64 px, one thread)")
    parser.add_argument("--runs", type=int, default=None, help="--host-only: interleaved runs (default 10)")
    parser.add_argument("--batches", type=int, default=None, help="--host-only: timed batches per run (default 10)")
    parser.add_argument("--resize", choices=("squash", "center_crop", "random_resized_crop"), default=None,
                        help="--host-only: the item crop of every loader (default squash: a no-op on the cached "
                             "images at --image-size, so only the loaders' own host work is timed)")
    parser.add_argument("--out", default=str(common.RESULTS_DIR), help="folder for the JSON and the PNG")
    parser.add_argument("--results-md", default=str(common.RESULTS_MD),
                        help='RESULTS.md to append to ("" to skip)')
    return parser


def _default_generator_devices(trainer: torch.device) -> tuple[list[str], str | None]:
    if trainer.type == "cpu":
        return ["cpu"], None
    count = torch.cuda.device_count()
    others = [i for i in range(count) if i != trainer.index]
    if others:
        return [f"cuda:{others[0]}"], None
    return [str(trainer)], (f"only one GPU: the producer runs on the trainer's GPU ({trainer}), so the figure "
                            f"includes the contention between generating and training, not only what the trainer "
                            f"pays; use a machine with 2 GPUs (--generator-device cuda:1)")


def resolve_settings(args: argparse.Namespace) -> dict:
    """Fill the device-dependent defaults (and --quick's), validate, return the settings of the run."""
    device = common.resolve_device(args.device)
    cuda = device.type == "cuda"
    quick = QUICK if args.quick else {}
    notes = []
    if args.generator_device:
        generator_devices = [str(common.resolve_device(d)) for d in args.generator_device]
        if str(device) in generator_devices and cuda:
            notes.append(f"a producer runs on the trainer's GPU ({device}): the figure includes contention")
    else:
        generator_devices, note = _default_generator_devices(device)
        if note:
            notes.append(note)
    if device.type == "cpu":
        notes.append("CPU trainer: the producer shares the CPU cores, so A_O includes that contention (smoke test)")
    num_workers = args.num_workers if args.num_workers is not None else quick.get(
        "num_workers", min(8, max(1, (os.cpu_count() or 2) - 4)) if cuda else 1)
    tiny = args.generator == "tiny"
    image_size = args.image_size or quick.get("image_size", 224)
    pool_size = args.pool_size or quick.get("pool_size", 256)
    settings = {
        "device": str(device),
        "generator_devices": generator_devices,
        "generator": args.generator,
        "model": args.model or quick.get("model") or ("resnet50" if cuda else "small-cnn"),
        "steps": args.steps or quick.get("steps", 200),
        "warmup_steps": args.warmup_steps if args.warmup_steps is not None else quick.get(
            "warmup_steps", max(10, 2 * num_workers + 2)),
        "batch_size": args.batch_size or quick.get("batch_size", 256),
        "image_size": image_size,
        "num_classes": args.num_classes or quick.get("num_classes", 1000),
        "amp": (cuda if args.amp is None else bool(args.amp)),
        "amp_dtype": args.amp_dtype,
        "recipes": list(args.recipes),
        "baselines": list(args.baselines),
        "rounds": 2 if args.rounds is None else args.rounds,
        "p_aug": args.p_aug,
        "mix_p": args.mix_p,
        "max_reuse": args.max_reuse,
        "pool_size": pool_size,
        "warmup": args.warmup if args.warmup is not None else quick.get("warmup", max(1, pool_size // 4)),
        "generation_size": args.generation_size or (image_size if tiny else None),
        "num_inference_steps": args.num_inference_steps or (quick.get("num_inference_steps", 2) if tiny else None),
        "generator_batch_size": args.generator_batch_size,
        "producers": list(dict.fromkeys(args.producers)),
        "compile_unet": bool(args.compile_unet),
        "num_workers": num_workers,
        "cache_images": args.cache_images or quick.get("cache_images", 512),
        "threads": None if cuda else (args.threads or (1 if args.quick else torch.get_num_threads())),
        "seed": args.seed,
        "quick": bool(args.quick),
    }
    for name in ("steps", "batch_size", "num_classes", "max_reuse", "pool_size", "cache_images",
                 "generator_batch_size", "rounds"):
        if settings[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {settings[name]}")
    for name in ("warmup_steps", "num_workers", "warmup"):
        if settings[name] < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {settings[name]}")
    if settings["warmup"] > pool_size:
        raise ValueError(f"--warmup {settings['warmup']} exceeds --pool-size {pool_size}")
    if not 0 <= settings["p_aug"] <= 1 or not 0 <= settings["mix_p"] <= 1:
        raise ValueError(f"--p-aug and --mix-p must be in [0, 1], got {settings['p_aug']} and {settings['mix_p']}")
    if tiny and image_size % 16:
        raise ValueError(f"--image-size must be a multiple of 16 with the tiny generator, got {image_size}")
    if any(b.startswith("timm") for b in settings["baselines"]) and settings["batch_size"] % 2:
        raise ValueError(f"timm's Mixup needs an even batch size, got --batch-size {settings['batch_size']}")
    if settings["amp"] and not cuda:
        notes.append("AMP on a CPU trainer: autocast to bfloat16 on CPU")
    settings["notes"] = notes
    return settings


# ------------------------------------------------------------------------------------------------ models
def build_model(name: str, num_classes: int) -> torch.nn.Module:
    if name == "small-cnn":
        from onlineaug.demo import small_cnn

        return small_cnn(num_classes)
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)


# --------------------------------------------------------------------------------------------- providers
def _cycle(loader):
    """Batches forever, epoch after epoch (calling ``set_epoch`` where the loader has it)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


class Provider:
    """A name, an endless iterator of ``(images, soft targets)`` on the trainer's device, stats and close."""

    def __init__(self, name: str, kind: str, batches, *, stats=None, close=None, loader=None):
        self.name, self.kind, self.batches = name, kind, batches
        self.stats = stats or (lambda: None)
        self.close = close or (lambda: None)
        self.loader = loader


def _plain_loader(dataset, settings: dict, device: torch.device):
    """The reference DataLoader: the loader's own item reader (same crop, ``settings["resize"]`` or the loader's
    default), so that both sides read and crop items alike."""
    from onlineaug.images import DEFAULT_RESIZE, ItemFormat, UInt8ImageDataset

    workers = settings["num_workers"]
    fmt = ItemFormat(resize=settings.get("resize") or DEFAULT_RESIZE)
    return torch.utils.data.DataLoader(
        UInt8ImageDataset(dataset, settings["image_size"], settings["num_classes"], fmt, seed=settings["seed"]),
        batch_size=settings["batch_size"], shuffle=True, drop_last=True, num_workers=workers,
        persistent_workers=workers > 0, multiprocessing_context="spawn" if workers > 0 else None,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(settings["seed"]))


def vanilla_provider(dataset, settings: dict, device: torch.device, *, name: str = "vanilla",
                     mixer=None, kind: str = "vanilla") -> Provider:
    """A plain DataLoader, uint8 -> device -> normalise; ``mixer(images, labels)`` (torchvision/timm) after it."""
    from onlineaug import ops
    from onlineaug.loader import IMAGENET_MEAN, IMAGENET_STD

    loader = _plain_loader(dataset, settings, device)
    mean = torch.tensor(IMAGENET_MEAN, device=device)
    std = torch.tensor(IMAGENET_STD, device=device)
    num_classes = settings["num_classes"]

    def batches():
        for images, labels, _ in _cycle(loader):
            images = ops.normalize(images.to(device, non_blocking=True), mean, std)
            labels = labels.to(device, non_blocking=True)
            if mixer is None:
                yield images, ops.one_hot_targets(labels, num_classes)
            else:
                yield mixer(images, labels)

    iterator = batches()
    return Provider(name, kind, iterator, close=iterator.close)


def baseline_mixer(name: str, num_classes: int):
    """The torchvision v2 / timm batch mixers, configured as their docs show (alpha 1, no label smoothing)."""
    if name.startswith("tv-"):
        from torchvision.transforms import v2

        transform = (v2.CutMix if name == "tv-cutmix" else v2.MixUp)(alpha=1.0, num_classes=num_classes)
        return lambda images, labels: transform(images, labels)
    from timm.data import Mixup

    if name == "timm-cutmix":
        mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, mode="batch", label_smoothing=0.0,
                      num_classes=num_classes)
    else:
        mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, prob=1.0, mode="batch", label_smoothing=0.0,
                      num_classes=num_classes)
    return lambda images, labels: mixup(images, labels)


def ray_arguments(settings: dict) -> dict:
    """The loader arguments of a ``--producers ray`` run: one actor per generator device, started on a local Ray
    cluster (this machine's cores and GPUs) unless ``ray.init`` ran already."""
    import ray

    gpus = [d for d in settings["generator_devices"] if d.startswith("cuda")]
    if not ray.is_initialized():
        root = str(Path(__file__).resolve().parents[1])  # the actors import onlineaug and benchmarks from here
        ray.init(num_cpus=max(1, len(settings["generator_devices"]) - len(gpus)), num_gpus=len(gpus),
                 include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
                                           "OMP_NUM_THREADS": str(settings["threads"] or 1)}})
    options = {"num_gpus": 1} if gpus else {"num_gpus": 0, "num_cpus": 1}
    return {"producers": "ray", "ray_actors": len(settings["generator_devices"]), "ray_actor_options": options}


def online_provider(recipe: str, dataset, settings: dict, device: torch.device, producers: str = "local") -> Provider:
    """``OnlineGenAugLoader`` for ``recipe``; for generative recipes the pool is filled before returning."""
    from onlineaug import OnlineGenAugLoader
    from onlineaug.recipes import get_recipe

    generative = get_recipe(recipe).generative
    where = {"generator_devices": settings["generator_devices"] if generative else ()}
    if producers == "ray":
        where = ray_arguments(settings)
    options = {}
    if generative and settings["num_inference_steps"]:
        options["num_inference_steps"] = settings["num_inference_steps"]
    loader = OnlineGenAugLoader(
        dataset, recipe=recipe, num_classes=settings["num_classes"], batch_size=settings["batch_size"],
        image_size=settings["image_size"], generator=settings["generator"], device=device, **where,
        p_aug=settings["p_aug"] if generative else settings["mix_p"], pool_size=settings["pool_size"],
        max_reuse=settings["max_reuse"], num_workers=settings["num_workers"], seed=settings["seed"], drop_last=True,
        generation_size=settings["generation_size"] if generative else None, recipe_options=options,
        generator_batch_size=settings["generator_batch_size"], compile_unet=settings["compile_unet"],
        progress=False)
    try:
        loader.start()
        start = time.perf_counter()
        if generative:
            loader.wait_for_pool(settings["warmup"])
        warmup_seconds = time.perf_counter() - start
    except BaseException:
        loader.close()
        raise

    def stats():
        ray = loader.ray_producers  # the feeder thread's time: fetching payloads and writing them into the pool
        feeder = {"feeder_ns": ray.feeder.collect_ns, "feeder_jobs": ray.feeder.jobs_done} if ray else {}
        return {**loader.stats(), "pool_warmup_seconds": warmup_seconds, **feeder}

    iterator = _cycle(loader)

    def close():
        iterator.close()
        loader.close()

    name = f"onlineaug {recipe}" + (" (ray)" if producers == "ray" else "")
    return Provider(name, "onlineaug", iterator, stats=stats, close=close, loader=loader)


# ------------------------------------------------------------------------------------------------- train
def train(provider: Provider, settings: dict, device: torch.device) -> dict:
    """``warmup_steps`` untimed steps then ``steps`` timed ones of a fresh model; the same loop for every provider."""
    from onlineaug.demo import soft_cross_entropy

    torch.manual_seed(settings["seed"])
    cuda = device.type == "cuda"
    model = build_model(settings["model"], settings["num_classes"]).to(device)
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-5)
    amp_dtype = torch.bfloat16 if settings["amp_dtype"] == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and settings["amp"] and amp_dtype == torch.float16)

    def step(images, targets):
        images = images.contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=settings["amp"]):
            logits = model(images)
        loss = soft_cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    batches = provider.batches
    for _ in range(settings["warmup_steps"]):
        step(*next(batches))
    common.synchronize(device)
    before = provider.stats()
    losses, wait = [], 0.0
    with common.Timer(device) as timer:
        for _ in range(settings["steps"]):
            start = time.perf_counter()
            images, targets = next(batches)
            wait += time.perf_counter() - start
            losses.append(step(images, targets))
    after = provider.stats()
    seconds = timer.seconds
    steps = settings["steps"]
    row = {
        "provider": provider.name, "kind": provider.kind, "seconds": seconds, "gpu_seconds": timer.gpu_seconds,
        "steps": steps, "steps_per_s": steps / seconds, "images_per_s": steps * settings["batch_size"] / seconds,
        "loader_wait_ms_per_step": wait / steps * 1e3,
        "final_loss": float(torch.stack(losses[-10:]).float().mean()),
        "generated_share": None, "generated": None, "real": None, "fresh": None, "reused": None, "misses": None,
        "produced": None, "producer_images_per_s": None, "pool_ready_at_start": None, "pool_ready_at_end": None,
    }
    if before is not None and after is not None:
        window = {key: int(after.get(key, 0)) - int(before.get(key, 0)) for key in WINDOW_COUNTERS}
        served = window["real"] + window["generated"]
        row.update(window, generated_share=window["generated"] / served if served else 0.0,
                   producer_images_per_s=window["produced"] / seconds, pool_ready_at_start=before.get("pool_ready"),
                   pool_ready_at_end=after.get("pool_ready"), pool_warmup_seconds=after.get("pool_warmup_seconds"),
                   producer_restarts=after.get("producer_restarts"))
        if "feeder_ns" in after:  # producers="ray": the feeder thread's work over the timed window
            row.update(feeder_ms_per_step=(after["feeder_ns"] - before["feeder_ns"]) / 1e6 / steps,
                       feeder_jobs=after["feeder_jobs"] - before["feeder_jobs"])
    return row


# ------------------------------------------------------------------------------------------------ rounds
def noise_floor(vanilla_seconds: list[float]) -> float | None:
    """``(max - min) / mean`` of the vanilla runs: the largest A_O one vanilla run shows against another (None
    with fewer than two runs: a single run cannot tell noise from overhead)."""
    if len(vanilla_seconds) < 2:
        return None
    return (max(vanilla_seconds) - min(vanilla_seconds)) / (sum(vanilla_seconds) / len(vanilla_seconds))


def within_noise(runs: list[float], vanilla_runs: list[float], a_o: float, noise: float | None) -> bool | None:
    """Whether this run cannot tell ``a_o`` from 0: inside the noise floor, or the provider's own runs overlap
    the vanilla runs' range (its spread is larger than its overhead). None without a noise floor."""
    if noise is None:
        return None
    overlap = min(runs) <= max(vanilla_runs) and max(runs) >= min(vanilla_runs)
    return abs(a_o) <= noise or overlap


def combine_runs(runs: list[dict], settings: dict) -> dict:
    """One provider's rounds as one row: mean seconds (rates from it), counters summed over the timed windows."""
    seconds = [r["seconds"] for r in runs]
    mean = sum(seconds) / len(seconds)
    row = {**runs[0], "seconds": mean, "runs_seconds": seconds, "rounds": len(runs),
           "spread": (max(seconds) - min(seconds)) / mean,
           "steps_per_s": settings["steps"] / mean, "images_per_s": settings["steps"] * settings["batch_size"] / mean,
           "loader_wait_ms_per_step": sum(r["loader_wait_ms_per_step"] for r in runs) / len(runs),
           "final_loss": sum(r["final_loss"] for r in runs) / len(runs)}
    if runs[0]["generated_share"] is not None:
        window = {key: sum(int(r[key]) for r in runs) for key in WINDOW_COUNTERS}
        served = window["real"] + window["generated"]
        row.update(window, generated_share=window["generated"] / served if served else 0.0,
                   producer_images_per_s=window["produced"] / sum(seconds),
                   pool_ready_at_end=runs[-1]["pool_ready_at_end"],
                   producer_restarts=sum(int(r["producer_restarts"] or 0) for r in runs))
    if runs[0].get("feeder_ms_per_step") is not None:
        row.update(feeder_ms_per_step=sum(r["feeder_ms_per_step"] for r in runs) / len(runs),
                   feeder_jobs=sum(r["feeder_jobs"] for r in runs))
    if row["gpu_seconds"] is not None:
        row["gpu_seconds"] = sum(r["gpu_seconds"] for r in runs) / len(runs)
    return row


# ----------------------------------------------------------------------------------------------- measure
def benchmark(args: argparse.Namespace, *, progress: bool = True) -> dict:
    """Run every provider on the same loop; return the result (nothing written). ``args`` from :func:`build_parser`."""
    if args.host_only:
        from benchmarks import host_overhead

        return host_overhead.benchmark(args, progress=progress)
    settings = resolve_settings(args)
    with common.torch_threads(settings["threads"]):
        return _benchmark(settings, progress)


def _benchmark(settings: dict, progress: bool) -> dict:
    device = torch.device(settings["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    notes = settings.pop("notes")
    for note in notes:
        if "contention" in note and device.type == "cuda":
            warnings.warn(note, stacklevel=3)
    env = common.environment(device, *settings["generator_devices"])
    log = print if progress else (lambda *a, **k: None)
    length = max(settings["cache_images"],
                 (settings["steps"] + settings["warmup_steps"] + 2) * settings["batch_size"])
    dataset = CachedImages(num_classes=settings["num_classes"], size=settings["image_size"], length=length,
                           cache=settings["cache_images"], seed=settings["seed"])
    log(f"overhead benchmark: {settings['model']} on {env['device']} ({device}), batch {settings['batch_size']}, "
        f"{settings['image_size']} px, {settings['steps']} timed steps; producers on "
        f"{', '.join(settings['generator_devices'])}")

    plan = [("vanilla", lambda: vanilla_provider(dataset, settings, device))]
    from onlineaug.recipes import get_recipe

    for recipe in settings["recipes"]:
        plan.append((f"onlineaug {recipe}", lambda recipe=recipe: online_provider(recipe, dataset, settings, device)))
        if "ray" in settings["producers"] and get_recipe(recipe).generative:
            plan.append((f"onlineaug {recipe} (ray)", lambda recipe=recipe: online_provider(
                recipe, dataset, settings, device, producers="ray")))
        if "local" not in settings["producers"] and get_recipe(recipe).generative:
            plan.pop(-2)  # --producers ray alone
    for name in settings["baselines"]:
        plan.append((BASELINE_NAMES[name], lambda name=name: vanilla_provider(
            dataset, settings, device, name=BASELINE_NAMES[name], kind=name.split("-")[0],
            mixer=baseline_mixer(name, settings["num_classes"]))))

    # One untimed vanilla pass first: process-level first-use costs (allocator, kernels, thread pools) are then
    # paid before the first timed provider, not by it.
    provider = vanilla_provider(dataset, settings, device, name="process warm-up")
    try:
        train(provider, {**settings, "steps": max(2, settings["warmup_steps"])}, device)
    finally:
        provider.close()
        del provider

    runs: dict[str, list[dict]] = {name: [] for name, _ in plan}
    rounds = settings["rounds"]
    for round_index in range(rounds):  # A B A B: each round runs vanilla, then every other provider
        for name, make in plan:
            provider = make()
            try:
                row = train(provider, settings, device)
            finally:
                provider.close()
                del provider
            runs[name].append(row)
            extra = (f", generated {row['generated_share'] * 100:.0f}%, misses {row['misses']}"
                     if row["generated_share"] is not None else "")
            log(f"  round {round_index + 1}/{rounds} {name}: {row['steps_per_s']:.3g} steps/s "
                f"({row['seconds']:.2f} s){extra}")

    rows = [combine_runs(runs[name], settings) for name, _ in plan]
    vanilla_runs = [r["seconds"] for r in runs["vanilla"]]
    t_van = sum(vanilla_runs) / len(vanilla_runs)
    noise = noise_floor(vanilla_runs)
    for row in rows:
        row["A_O"] = (row["seconds"] - t_van) / t_van
        row["runs_A_O"] = [(t - t_van) / t_van for t in row["runs_seconds"]]
        row["within_noise"] = within_noise(row["runs_seconds"], vanilla_runs, row["A_O"], noise)
    headline = next((r for r in rows if r["provider"] in ("onlineaug genmix", "onlineaug diffusemix")), None) \
        or next((r for r in rows if r["kind"] == "onlineaug"), None)
    applies = (device.type == "cuda" and settings["model"] == "resnet50" and settings["batch_size"] == 256
               and settings["image_size"] == 224 and settings["amp"]
               and str(device) not in settings["generator_devices"] and "genmix" in settings["recipes"])
    genmix = next((r for r in rows if r["provider"] == "onlineaug genmix"), None)
    return {
        "benchmark": "overhead",
        **env,
        "settings": settings,
        "providers": rows,
        "vanilla_seconds": t_van,
        "vanilla_runs_seconds": vanilla_runs,
        "noise_floor": noise,
        "vanilla_images_per_s": settings["steps"] * settings["batch_size"] / t_van,
        "A_O": {r["provider"]: r["A_O"] for r in rows},
        "headline": headline,
        "targets": {"A_O_max": TARGET_A_O, "applies": applies,
                    "met": (genmix["A_O"] <= TARGET_A_O) if (applies and genmix) else None,
                    # a noise floor at or above the target: this run cannot tell an A_O under 2% from one over it
                    "resolvable": noise is not None and noise < TARGET_A_O},
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------------ report
TABLE_COLUMNS = ("provider", "steps/s", "images/s", "A_O", "vs noise", "runs (s)", "loader wait ms/step",
                 "generated share", "fresh", "reused", "misses", "produced", "feeder ms/step")


def noise_verdict(row: dict) -> str:
    if row["within_noise"] is None:
        return "n/a (1 round)"
    if row["kind"] == "vanilla":
        return "(the floor)"
    return "within noise" if row["within_noise"] else "above noise" if row["A_O"] > 0 else "below noise"


def table_rows(result: dict) -> list[list]:
    return [[r["provider"], r["steps_per_s"], r["images_per_s"], common.format_percent(r["A_O"], signed=True),
             noise_verdict(r), " ".join(f"{t:.3g}" for t in r["runs_seconds"]), r["loader_wait_ms_per_step"],
             common.format_percent(r["generated_share"]), r["fresh"], r["reused"], r["misses"], r["produced"],
             r.get("feeder_ms_per_step")] for r in result["providers"]]


def noise_line(result: dict) -> str:
    noise = result["noise_floor"]
    if noise is None:
        return "noise floor: n/a (one round: run --rounds 2 or more to tell an A_O from noise)"
    runs = ", ".join(f"{t:.3g}" for t in result["vanilla_runs_seconds"])
    return (f"noise floor: {noise * 100:.1f}% (vanilla against itself over {len(result['vanilla_runs_seconds'])} "
            f"interleaved runs: {runs} s); an A_O within +-{noise * 100:.1f}% is within noise")


def figure(result: dict):
    """Trainer throughput against A_O, one point per provider (as the papers' overhead figures), its min-max over
    the rounds, the noise band and the target line: ``(figure, axes)``."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(10.5, 4.6))
    colors = {"vanilla": "gray", "onlineaug": "tab:blue", "tv": "tab:orange", "timm": "tab:green"}
    markers = "osD^vP*Xhp<>"
    seen: dict[str, int] = {}
    noise = result["noise_floor"]
    if noise is not None:
        ax.axvspan(-noise * 100, noise * 100, color="gray", alpha=0.15, lw=0, zorder=1,
                   label=f"noise floor \u00b1{noise * 100:.1f}% (vanilla vs vanilla)")
    for row in result["providers"]:  # colour = family, marker = member: clustered points stay readable
        index = seen[row["kind"]] = seen.get(row["kind"], -1) + 1
        x = row["A_O"] * 100
        runs = [a * 100 for a in row["runs_A_O"]]
        verdict = ", within noise" if row["within_noise"] and row["kind"] != "vanilla" else ""
        ax.errorbar(x, row["images_per_s"], xerr=[[x - min(runs)], [max(runs) - x]],
                    color=colors.get(row["kind"], "black"), marker=markers[index % len(markers)], ms=6, capsize=3, lw=0.8, ls="none", zorder=3,
                    label=f"{row['provider']}: {x:+.1f}%{verdict}")
    ax.axvline(0, color="gray", lw=0.8)
    target = f"target A_O {TARGET_A_O * 100:.0f}%" + ("" if result["targets"]["applies"] else
                                                      " (set for ResNet-50, 224 px, AMP, producer off the trainer GPU)")
    ax.axvline(TARGET_A_O * 100, color="tab:red", ls=":", lw=1, label=target)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    s = result["settings"]
    ax.set_xlabel("augmentation overhead A_O = (T_aug - T_van) / T_van  [%]")
    ax.set_ylabel("trainer images/s")
    ax.set_title(f"{s['model']}, batch {s['batch_size']}, {s['image_size']} px, {s['steps']} steps on "
                 f"{result['device']}, {s['rounds']} interleaved round(s)\nproducer on "
                 f"{', '.join(s['generator_devices'])} ({s['generator']}), p_aug {s['p_aug']}, max_reuse "
                 f"{s['max_reuse']}; bars: min-max over the rounds", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    return fig, ax


def plot(result: dict, path: Path) -> Path:
    """:func:`figure`, saved as a PNG."""
    plt = common.pyplot()
    fig, _ = figure(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(result: dict, out_dir: str | Path | None, results_md: str | Path | None) -> dict:
    """Write ``overhead.json`` and ``overhead.png`` into ``out_dir`` and append a block to ``results_md``."""
    if result["benchmark"] == "host_overhead":
        from benchmarks import host_overhead

        return host_overhead.report(result, out_dir, results_md)
    paths = {}
    if out_dir:
        out_dir = Path(out_dir)
        paths["json"] = common.write_json(out_dir / "overhead.json", result)
        paths["png"] = plot(result, out_dir / "overhead.png")
    if results_md:
        s = result["settings"]
        title = (f"overhead: {s['model']}, batch {s['batch_size']}, {s['image_size']} px, trainer {s['device']}, "
                 f"producer {' '.join(s['generator_devices'])}")
        notes = [*result["notes"], noise_line(result)]
        paths["results_md"] = common.append_results_md(results_md, title, TABLE_COLUMNS, table_rows(result),
                                                       env=result, settings=s, notes=notes)
    return paths


def print_summary(result: dict) -> None:
    if result["benchmark"] == "host_overhead":
        from benchmarks import host_overhead

        return host_overhead.print_summary(result)
    s = result["settings"]
    print()
    print(f"overhead benchmark: {s['model']}, batch {s['batch_size']}, {s['image_size']} px, {s['steps']} timed steps "
          f"(after {s['warmup_steps']}), AMP {'on (' + s['amp_dtype'] + ')' if s['amp'] else 'off'}, trainer "
          f"{s['device']} ({result['device']}), producer {', '.join(s['generator_devices'])} ({s['generator']})")
    print(text_table(TABLE_COLUMNS, table_rows(result)))
    print(noise_line(result))
    t = result["targets"]
    genmix = result["A_O"].get("onlineaug genmix")
    if t["applies"] and genmix is not None:
        if not t["resolvable"]:
            floor = "n/a" if result["noise_floor"] is None else f"{result['noise_floor'] * 100:.1f}%"
            print(f"target: A_O <= {t['A_O_max'] * 100:.0f}% for online GenMix: cannot tell ({genmix * 100:+.1f}%, "
                  f"noise floor {floor}); run more --steps or --rounds")
        else:
            print(f"target: A_O <= {t['A_O_max'] * 100:.0f}% for online GenMix: {'met' if t['met'] else 'NOT met'} "
                  f"({genmix * 100:+.1f}%)")
    for note in result["notes"]:
        print(f"note: {note}")


def main(argv=None) -> dict:
    return common.run_cli(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
