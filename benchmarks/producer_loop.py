"""How fast does a real producer fill the pool? The producer loop, stage by stage, against the papers' diffusers call.

For one generating recipe (default ``genmix``: InstructPix2Pix, 512 px) in one run:

* **baseline**: the plain diffusers call as the papers' code makes it (DiffuseMix:
  ``pipe(prompt, image=img, guidance_scale=4).images``): per image, decode the JPEG with PIL, resize it to the
  generation size, one pipeline call with one PIL image and a prompt string, PIL out; eager, fp16 on CUDA, no
  channels-last, no ``cudnn.benchmark`` (``LoadPolicy(compile=False, channels_last=False,
  cudnn_benchmark=False)``), same model, scheduler, size, steps and guidance as ours.
* **ours: producer loop**: :class:`onlineaug.producer.Producer` exactly as a producer process runs it
  (``Producer.step``: plan the jobs, decode each source item, resize it to the generation and the training size,
  copy to the device, ``recipe.produce``: the pipeline call and the uint8 conversion, copy back and check the
  rows) plus the pool write of every kept row (``producer_processes._write_rows`` into a
  :class:`~onlineaug.pool.SamplePool`), at each batch size, under the producers' :class:`~onlineaug.models.LoadPolicy`
  (``--dtype``, ``--compile-mode``, ``--fuse-qkv``, ``--compile-vae``) passed to :func:`onlineaug.models.load_model`.
* **ours: pipeline call only**: the same timed batches, counting only the seconds inside the pipeline call.

Per row: images/s (rows generated per second: for the loop, every stage and the pool write included; with random
weights a non-finite row is generated but not written, see ``written``), speedup over the baseline, and UNet MFU:
the UNet FLOPs per latent are counted ONCE (``FlopCounterMode`` around the first UNet forward of one eager call,
which is then stopped: :func:`benchmarks.profiling.unet_flops_per_latent`) and multiplied by the latents the
UNet was actually fed in the timed window (classifier-free guidance copies, strength buckets and their padding,
the schedule actually run), over the dense fp16/bf16 peak. Per batch size the loop's seconds are split into
stages (plan, decode + resize, H2D, pipeline: text encoder / VAE encoder / UNet / VAE decoder / rest,
post-processing + D2H, checks, pool write).

Weights: ``full-random`` on CUDA (the released SD 1.5 architectures with random weights: same FLOPs, honest
speed, noise images), ``tiny`` on CPU (a smoke test), or a local folder / cached hub id.

    python benchmarks/producer_loop.py --quick                                   # CPU smoke (tiny, 32 px)
    python benchmarks/producer_loop.py --device cuda --steps 20 --batch-sizes 8 16            # GenMix, 512 px
    python benchmarks/producer_loop.py --device cuda --recipe diffmix --recipe-options '{"strengths": [0.7]}'
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks import common
from benchmarks.profiling import ModuleClock, Stages, eager_module, mfu, pipeline_modules, unet_flops_per_latent
from onlineaug.tables import text_table

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TARGET_SPEEDUP = 2.5
TARGET_MFU = 0.40
BASELINE_PROVIDER = "baseline (diffusers, 1 image/call, eager)"
PIPELINE_PROVIDER = "ours: pipeline call only"
LOOP_PROVIDER = "ours: producer loop (step + pool write)"
STAGES = ("plan", "decode + resize", "h2d", "pipeline", "post + d2h", "check", "pool write")
MODULE_STAGES = ("text_encoder", "vae_encoder", "unet", "vae_decoder")

# --quick: the CPU smoke settings (tiny generator), well under a minute on 2 cores.
QUICK = {"generator": "tiny", "size": 32, "image_size": 32, "steps": 2, "batch_sizes": [1, 2], "warmup": 1,
         "repeats": 2, "baseline_images": 2, "source_size": 48, "dataset_size": 16}


# --------------------------------------------------------------------------------------------------- data
class EncodedImages(torch.utils.data.Dataset):
    """``length`` JPEG-encoded :class:`~onlineaug.datasets.SyntheticShapes` images, decoded by PIL per item.

    What an ``ImageFolder`` costs a producer per source: a JPEG decode at the file's size (``size``, ImageNet's
    are about 400 x 350), then the producer's two resizes. Images are rendered and encoded once, at construction.
    Labels are stated (``targets``) so that recipes drawing by class read them without loading items.
    """

    def __init__(self, *, num_classes: int, size: int, length: int, seed: int = 0, quality: int = 90):
        from PIL import Image

        from onlineaug.datasets import SyntheticShapes

        shapes = SyntheticShapes(num_classes=num_classes, size=size, length=length, seed=seed)
        self.classes = list(shapes.classes)
        self.targets = [i % num_classes for i in range(length)]
        self._encoded = []
        for i in range(length):
            buffer = io.BytesIO()
            Image.fromarray(shapes[i][0].permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
            self._encoded.append(buffer.getvalue())

    def __len__(self) -> int:
        return len(self._encoded)

    def __getitem__(self, index: int):
        from PIL import Image

        return Image.open(io.BytesIO(self._encoded[index])).convert("RGB"), self.targets[index]


# ----------------------------------------------------------------------------------------------- settings
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="genmix", help="a generating recipe of the registry (default genmix)")
    parser.add_argument("--recipe-options", default=None, type=json.loads,
                        help='extra recipe options as JSON, e.g. \'{"strengths": [0.7]}\'')
    parser.add_argument("--generator", default=None,
                        help='"tiny" (default on CPU), "full-random" (default on CUDA), a local diffusers folder or '
                             'a cached hub id')
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--size", type=int, default=None, help="generation size (default: the recipe's; 32 quick)")
    parser.add_argument("--image-size", type=int, default=None, help="training size of the pool (default 224)")
    parser.add_argument("--source-size", type=int, default=None, help="side of the JPEG sources (default 384)")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the recipe's)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 8 16 (1 2 quick)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="ours (LoadPolicy.dtype; default fp16 on CUDA, fp32 on CPU); the baseline is fp16 on "
                             "CUDA, fp32 on CPU")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="torch.compile the UNet in ours (default on CUDA)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="LoadPolicy.compile when compiling; reduce-overhead = CUDA graphs")
    parser.add_argument("--fuse-qkv", action="store_true", help="LoadPolicy.fuse_qkv: fused attention projections")
    parser.add_argument("--compile-vae", action="store_true", help="LoadPolicy.compile_vae: compile the VAE decoder")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed batches per batch size, default 1 (the first one compiles)")
    parser.add_argument("--repeats", type=int, default=None, help="timed batches per batch size (default 3; 2 CPU)")
    parser.add_argument("--baseline-images", type=int, default=None,
                        help="timed one-image calls of the baseline (default 4; 2 quick); 0 skips the baseline")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time budget of the whole run: batch sizes not started by then are skipped, timing "
                             "stops early (at least one timed batch per started batch size)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense fp16/bf16 peak of the GPU, for MFU on GPUs not in the table")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on CPU (default 1 with --quick, torch's default otherwise)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="CPU smoke settings (tiny generator, few steps)")
    parser.add_argument("--out", default=str(common.RESULTS_DIR), help="folder for the JSON and the PNG")
    parser.add_argument("--results-md", default=str(common.RESULTS_MD),
                        help='RESULTS.md to append to ("" to skip)')
    return parser


def make_recipe(name: str, options: dict | None, *, steps: int | None, size: int | None):
    """The recipe ``name`` with ``options``, and ``num_inference_steps``/``generation_size`` where it has them."""
    from onlineaug.recipes import get_recipe

    options = dict(options or {})
    valid = get_recipe(name).option_names() if isinstance(name, str) else []
    if steps is not None and "num_inference_steps" in valid:
        options.setdefault("num_inference_steps", steps)
    if size is not None and "generation_size" in valid:
        options.setdefault("generation_size", size)
    recipe = get_recipe(name, **options)
    if not recipe.generative:
        raise ValueError(f"recipe {name!r} generates nothing (no model roles): the producer loop benchmark needs "
                         f"a generating recipe, e.g. genmix, diffusemix, diffmix, dafusion, diffgen")
    return recipe


def resolve_settings(args: argparse.Namespace) -> dict:
    """Fill the device-dependent defaults (and --quick's), validate, return the settings of the run."""
    device = common.resolve_device(args.device)
    cuda = device.type == "cuda"
    quick = QUICK if args.quick else {}
    generator = args.generator or quick.get("generator") or ("full-random" if cuda else "tiny")
    tiny = generator.startswith("tiny")
    recipe = make_recipe(args.recipe, args.recipe_options, steps=args.steps or quick.get("steps"),
                         size=args.size or quick.get("size") or (32 if tiny else None))
    settings = {
        "recipe": recipe.name,
        "recipe_options": dict(args.recipe_options or {}),
        "generator": generator,
        "device": str(device),
        "size": recipe.generation_size,
        "image_size": args.image_size or quick.get("image_size") or (32 if tiny else 224),
        "source_size": args.source_size or quick.get("source_size") or 384,
        "steps": getattr(recipe, "num_inference_steps", None),
        "batch_sizes": list(args.batch_sizes or quick.get("batch_sizes") or [8, 16]),
        "dtype": args.dtype or ("fp16" if cuda else "fp32"),
        "baseline_dtype": "fp16" if cuda else "fp32",
        "compile": cuda if args.compile is None else bool(args.compile),
        "compile_mode": args.compile_mode,
        "fuse_qkv": bool(args.fuse_qkv),
        "compile_vae": bool(args.compile_vae),
        "warmup": args.warmup if args.warmup is not None else quick.get("warmup", 1),
        "repeats": args.repeats or quick.get("repeats") or (3 if cuda else 2),
        "baseline_images": (args.baseline_images if args.baseline_images is not None
                            else quick.get("baseline_images", 4)),
        "dataset_size": quick.get("dataset_size", 64),
        "budget_s": args.budget_s,
        "peak_tflops": args.peak_tflops,
        "threads": None if cuda else (args.threads or (1 if args.quick else torch.get_num_threads())),
        "seed": args.seed,
        "quick": bool(args.quick),
    }
    if any(b < 1 for b in settings["batch_sizes"]):
        raise ValueError(f"--batch-sizes must be positive, got {settings['batch_sizes']}")
    if settings["repeats"] < 1:
        raise ValueError(f"--repeats must be >= 1, got {settings['repeats']}")
    for name in ("warmup", "baseline_images"):
        if settings[name] < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {settings[name]}")
    if settings["budget_s"] is not None and settings["budget_s"] <= 0:
        raise ValueError(f"--budget-s must be positive, got {settings['budget_s']}")
    if settings["compile"] and not cuda and not args.quick:
        warnings.warn("torch.compile on CPU needs a C++ compiler and takes minutes; pass --no-compile if it fails",
                      stacklevel=2)
    return settings


def load_policy(settings: dict, *, baseline: bool):
    """The :class:`~onlineaug.models.LoadPolicy` of ours (from the flags) or of the papers' baseline."""
    from onlineaug.models import LoadPolicy

    if baseline:
        return LoadPolicy(dtype=settings["baseline_dtype"], compile=False, compile_vae=False, fuse_qkv=False,
                          channels_last=False, cudnn_benchmark=False)
    compile_ = (True if settings["compile_mode"] == "default" else settings["compile_mode"]) if settings["compile"] \
        else False
    return LoadPolicy(dtype=settings["dtype"], compile=compile_, compile_vae=settings["compile_vae"],
                      fuse_qkv=settings["fuse_qkv"])


def applied_policy(pipe) -> dict:
    """What the loaded pipeline really runs with, read off the modules (the loader may not apply every field)."""
    dynamo = sys.modules.get("torch._dynamo")
    compiled = (lambda m: dynamo is not None and isinstance(m, dynamo.eval_frame.OptimizedModule))
    unet = eager_module(pipe.unet)
    weight = next((p for p in unet.parameters() if p.dim() == 4), None)
    processors = ({type(p).__name__ for p in unet.attn_processors.values()} if hasattr(unet, "attn_processors")
                  else set())
    vae = getattr(pipe, "vae", None)
    return {
        "dtype": str(unet.dtype).replace("torch.", ""),
        "unet_compiled": compiled(pipe.unet),
        "vae_decoder_compiled": vae is not None and compiled(getattr(vae, "decoder", None)),
        "channels_last": bool(weight is not None and weight.is_contiguous(memory_format=torch.channels_last)
                              and not weight.is_contiguous()),
        "fused_qkv": any("Fused" in name for name in processors),
        "attention_processors": sorted(processors),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }


# --------------------------------------------------------------------------------------------- producers
def producer_settings(recipe, dataset, *, num_classes: int, image_size: int, batch_size: int, generator,
                      policy, seed: int = 0, models=None, workdir: str | None = None):
    """The :class:`~onlineaug.producer.ProducerSettings` a loader would send its producers, built without one."""
    import os

    from onlineaug.models import resolve_models
    from onlineaug.producer import ProducerSettings
    from onlineaug.sources import dataset_labels

    roles = recipe.model_roles()
    settings = ProducerSettings(
        recipe=recipe, dataset=dataset, num_classes=num_classes, class_names=list(getattr(dataset, "classes", [])) or
        None, image_size=image_size, batch_size=batch_size, seed=seed, trainer_rank=0, roles=roles,
        specs=resolve_models(roles, recipe.main_role, generator, models), policy=policy,
        pool_fields=recipe.pool_fields(image_size),
        labels=dataset_labels(dataset, num_classes, progress=False) if recipe.needs_labels else None)
    if recipe.prepare_key() is not None:
        if workdir is None:
            raise ValueError(f"recipe {recipe.name!r} prepares state once per loader: pass workdir= for it")
        settings.prepared_path = os.path.join(workdir, "prepared.pt")
    return settings


def make_producer(settings, *, device):
    """A :class:`~onlineaug.producer.Producer` over every dataset index (what a producer process builds)."""
    from onlineaug.producer import Producer
    from onlineaug.sources import SourceSet

    indices = np.arange(len(settings.dataset))
    return Producer(settings, rank=0, device=str(device), sources=SourceSet(
        indices, None, settings.labels[indices] if settings.labels is not None else None))


_TIMED_CLASSES: dict[type, type] = {}


def _timed_class(cls: type) -> type:
    """A subclass of the pipeline's class whose ``__call__`` adds its seconds to the "pipeline" stage.

    The pipeline object keeps its identity, attributes and class hierarchy (``isinstance``, the prompt cache,
    ``is_compiled`` see the same pipeline); only its ``__class__`` is swapped while the probe is attached.
    """
    if cls not in _TIMED_CLASSES:
        def __call__(self, *args, **kwargs):
            with self._onlineaug_stages("pipeline"):
                return super(timed, self).__call__(*args, **kwargs)

        timed = type(f"Timed{cls.__name__}", (cls,), {"__call__": __call__})
        _TIMED_CLASSES[cls] = timed
    return _TIMED_CLASSES[cls]


class LoopProbe:
    """Times the stages of :meth:`Producer.step` from outside, without changing what the step runs.

    It wraps the producer's instance methods: ``_next_jobs`` (plan), ``_load_sources`` (run with the producer's
    device set to the CPU, so the decode and both resizes are timed apart from the host-to-device copy of the
    generation-size images that follows), ``recipe.produce`` (minus the pipeline call: uint8 conversion, the resize
    to the training size, the copy to the host) and ``_check`` (rows validated, remaining copies to the host); the
    pipeline call itself is timed by :func:`_timed_class`. :meth:`close` restores everything.
    """

    def __init__(self, producer, stages: Stages):
        self.producer, self.stages = producer, stages
        self._saved = {name: producer.__dict__.get(name) for name in ("_next_jobs", "_load_sources", "_check")}
        self._recipe_produce = producer.recipe.__dict__.get("produce")
        device = producer.device
        original = {name: getattr(producer, name) for name in self._saved}
        produce = producer.recipe.produce

        def plan(*args, **kwargs):
            with stages("plan"):
                return original["_next_jobs"](*args, **kwargs)

        def load_sources(*args, **kwargs):
            with stages("decode + resize"):
                producer.device = torch.device("cpu")
                try:
                    batch = original["_load_sources"](*args, **kwargs)
                finally:
                    producer.device = device
            with stages("h2d"):
                return dataclasses.replace(batch, images=batch.images.to(device))

        def produce_timed(models, batch, ctx):
            before = stages.seconds["pipeline"]
            start = time.perf_counter()
            try:
                return produce(models, batch, ctx)
            finally:
                common.synchronize(device)
                stages.seconds["post + d2h"] += time.perf_counter() - start - (stages.seconds["pipeline"] - before)

        def check(*args, **kwargs):
            with stages("check"):
                return original["_check"](*args, **kwargs)

        producer._next_jobs, producer._load_sources, producer._check = plan, load_sources, check
        producer.recipe.produce = produce_timed
        from onlineaug.models import DIFFUSION_KINDS

        self._timed = []
        for role, info in producer.settings.roles.items():
            if info.kind in DIFFUSION_KINDS:
                pipe = producer.models[role]
                self._timed.append((pipe, type(pipe)))
                pipe._onlineaug_stages = stages
                pipe.__class__ = _timed_class(type(pipe))

    def close(self) -> None:
        for name, value in self._saved.items():
            if value is None:
                self.producer.__dict__.pop(name, None)
            else:
                setattr(self.producer, name, value)
        for pipe, cls in self._timed:
            pipe.__class__ = cls
            del pipe._onlineaug_stages
        if self._recipe_produce is None:
            self.producer.recipe.__dict__.pop("produce", None)
        else:
            self.producer.recipe.produce = self._recipe_produce


def make_pool(recipe, image_size: int, slots: int):
    """A pool with ``slots`` slots for ``recipe``'s payload, one producer, no backpressure (nothing consumes)."""
    from onlineaug.pool import SamplePool
    from onlineaug.producer import counter_names

    return SamplePool.create(recipe.pool_fields(image_size), num_slots=slots, num_producers=1, max_reuse=1,
                             counter_names=counter_names(recipe), backpressure=False)


def write_to_pool(pool, rows: dict) -> int:
    """What a producer process does with a step's rows: write each into one of its slots."""
    from onlineaug.producer_processes import _write_rows

    return _write_rows(pool, 0, rows, lambda: None)


# ----------------------------------------------------------------------------------------------- baseline
def diffusion_kind(recipe) -> str:
    return recipe.model_roles()[recipe.main_role].kind


def baseline_call(recipe, pipe, dataset, index: int, settings: dict):
    """One image per call as the papers' scripts do: PIL decode, resize, ``pipe(prompt, image=img, ...)``, PIL out.

    Prompt, guidance, steps and (img2img) the strength follow the recipe; the strength cycles over its set.
    """
    from PIL import Image

    kind, size = diffusion_kind(recipe), recipe.generation_size
    generator = torch.Generator(settings["device"]).manual_seed(settings["seed"] + index)
    kwargs = {"num_inference_steps": recipe.num_inference_steps, "guidance_scale": recipe.guidance_scale,
              "generator": generator}
    image, label = dataset[index % len(dataset)]
    if kind == "text2img":
        prompt = f"a photo of a {dataset.classes[label]}"
        return pipe(prompt, height=size, width=size, **kwargs).images
    image = image.resize((size, size), Image.BILINEAR)
    if kind == "instruct-pix2pix":
        prompt = recipe.prompt_text(index % len(recipe.prompts))
        return pipe(prompt, image=image, image_guidance_scale=recipe.image_guidance_scale, **kwargs).images
    strengths = getattr(recipe, "strengths", (0.8,))
    return pipe(f"a photo of a {dataset.classes[label]}", image=image, strength=strengths[index % len(strengths)],
                **kwargs).images


# ------------------------------------------------------------------------------------------------ measure
def benchmark(args: argparse.Namespace, *, progress: bool = True) -> dict:
    """Run the baseline and the producer loop; return the result (nothing written)."""
    settings = resolve_settings(args)
    with common.torch_threads(settings["threads"]):
        return _benchmark(settings, progress)


class _Deadline:
    def __init__(self, budget_s: float | None):
        self.end = None if budget_s is None else time.monotonic() + budget_s

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end


def _peak(settings: dict, device: torch.device) -> tuple[float | None, str]:
    if settings["peak_tflops"]:
        return settings["peak_tflops"] * 1e12, "--peak-tflops"
    return common.peak_flops(device, DTYPES[settings["dtype"]])


def _memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _row(provider: str, batch_size: int, images: int, seconds: float, *, flops: float | None, peak: float | None,
         baseline_rate: float | None) -> dict:
    rate = images / seconds if seconds > 0 else None
    return {"provider": provider, "batch_size": batch_size, "images": images, "seconds": seconds,
            "images_per_s": rate, "images_per_gpu_hour": rate * 3600 if rate else None,
            "speedup_vs_baseline": rate / baseline_rate if (rate and baseline_rate) else None,
            "unet_flops": flops, "unet_tflops_per_s": flops / seconds / 1e12 if (flops and seconds > 0) else None,
            "mfu": mfu(flops, seconds, peak)}


def _benchmark(settings: dict, progress: bool) -> dict:
    from onlineaug.generators import describe
    from onlineaug.models import load_model, resolve_models

    device = torch.device(settings["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    env = common.environment(device)
    log = print if progress else (lambda *a, **k: None)
    deadline = _Deadline(settings["budget_s"])
    peak, peak_source = _peak(settings, device)
    recipe = make_recipe(settings["recipe"], settings["recipe_options"], steps=settings["steps"],
                         size=settings["size"])
    kind = diffusion_kind(recipe)
    dataset = EncodedImages(num_classes=10, size=settings["source_size"], length=settings["dataset_size"],
                            seed=settings["seed"])
    role = recipe.model_roles()[recipe.main_role]
    spec = resolve_models({recipe.main_role: role}, recipe.main_role, settings["generator"], None)[recipe.main_role]
    log(f"producer loop benchmark: {recipe.name} ({kind}), {settings['size']} px, {settings['steps']} steps, "
        f"{describe(spec.random_weights[0] if spec.is_random else spec.source, kind)} on {env['device']}")
    notes, flops_source = [], None

    # ---- baseline: the papers' loop, one PIL image per call
    baseline = None
    flops = None
    if settings["baseline_images"]:
        policy = load_policy(settings, baseline=True)
        pipe = load_model(role, spec, device=device, policy=policy, seed=settings["seed"])
        flops = unet_flops_per_latent(pipe, lambda: baseline_call(recipe, pipe, dataset, 0, settings))
        flops_source = "baseline pipeline (eager), first UNet forward of one call"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="invalid value encountered in cast")  # random-weight NaNs
            for i in range(settings["warmup"]):
                baseline_call(recipe, pipe, dataset, i, settings)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with ModuleClock(pipeline_modules(pipe), device) as clock, common.Timer(device) as timer:
                for i in range(settings["baseline_images"]):
                    baseline_call(recipe, pipe, dataset, i, settings)
            modules = clock.seconds()
            latents = clock.latents["unet"]
        baseline = _row(BASELINE_PROVIDER, 1, settings["baseline_images"], timer.seconds,
                        flops=flops["unet_flops_per_latent"] * latents, peak=peak, baseline_rate=None)
        baseline.update(unet_latents=latents, unet_forwards=clock.calls["unet"], module_seconds=modules,
                        policy_requested=dataclasses.asdict(policy), policy_applied=applied_policy(pipe),
                        peak_memory_gib=_memory(device), first_call_seconds=None)
        log(f"  baseline: {baseline['images_per_s']:.3g} images/s")
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- ours: the producer loop under the producers' load policy
    policy = load_policy(settings, baseline=False)
    if settings["compile"]:
        _allow_recompiles(2 * len(settings["batch_sizes"]) + 4)
    import tempfile

    workdir = tempfile.mkdtemp(prefix="onlineaug-producer-loop-")
    producer_config = producer_settings(recipe, dataset, num_classes=10, image_size=settings["image_size"],
                                        batch_size=settings["batch_sizes"][0], generator=settings["generator"],
                                        policy=policy, seed=settings["seed"], workdir=workdir)
    start = time.perf_counter()
    producer = make_producer(producer_config, device=device)
    load_seconds = time.perf_counter() - start
    pipe = producer.models[recipe.main_role]
    applied = applied_policy(pipe)
    if flops is None:
        flops = unet_flops_per_latent(pipe, lambda: baseline_call(recipe, pipe, dataset, 0, settings))
        flops_source = "ours (eager UNet under the wrapper), first UNet forward of one call"
    requested = dataclasses.asdict(policy)
    for name, want, have in (("compile", bool(policy.compile), applied["unet_compiled"]),
                             ("compile_vae", policy.compile_vae, applied["vae_decoder_compiled"]),
                             ("fuse_qkv", policy.fuse_qkv, applied["fused_qkv"])):
        if want and not have:
            notes.append(f"LoadPolicy.{name}=True was asked for but load_model did not apply it on this version")
    pool = make_pool(recipe, settings["image_size"], 2 * max(settings["batch_sizes"]))
    stages = Stages(device)
    probe = LoopProbe(producer, stages)
    clock = ModuleClock(pipeline_modules(pipe), device)
    pipeline_rows, loop_rows = [], []
    try:
        for batch_size in settings["batch_sizes"]:
            if deadline.passed() and any("error" not in r for r in loop_rows):  # the first one always runs
                loop_rows.append({"provider": LOOP_PROVIDER, "batch_size": batch_size,
                                  "error": "skipped: time budget spent"})
                log(f"  batch {batch_size}: skipped (time budget spent)")
                continue
            producer.settings = dataclasses.replace(producer_config, batch_size=batch_size)
            try:
                measured = _measure_batch_size(producer, pool, stages, clock, settings, deadline, device)
            except torch.cuda.OutOfMemoryError as error:
                torch.cuda.empty_cache()
                loop_rows.append({"provider": LOOP_PROVIDER, "batch_size": batch_size,
                                  "error": f"out of memory: {error}"[:300]})
                log(f"  batch {batch_size}: out of memory")
                continue
            rate = baseline["images_per_s"] if baseline else None
            per_latent = flops["unet_flops_per_latent"]
            loop = _row(LOOP_PROVIDER, batch_size, measured["jobs"], measured["seconds"],
                        flops=per_latent * measured["unet_latents"], peak=peak, baseline_rate=rate)
            loop.update({k: measured[k] for k in ("jobs", "written", "rejected", "batches", "first_call_seconds",
                                                  "stage_seconds", "module_seconds", "unet_latents",
                                                  "unet_forwards")},
                        peak_memory_gib=_memory(device))
            pipeline = _row(PIPELINE_PROVIDER, batch_size, measured["jobs"], measured["stage_seconds"]["pipeline"],
                            flops=per_latent * measured["unet_latents"], peak=peak, baseline_rate=rate)
            unet_seconds = measured["module_seconds"].get("unet")
            loop["unet_kernel_mfu"] = mfu(per_latent * measured["unet_latents"], unet_seconds or 0, peak)
            loop_rows.append(loop)
            pipeline_rows.append(pipeline)
            mfu_text = f", UNet MFU {loop['mfu'] * 100:.1f}%" if loop["mfu"] is not None else ""
            speed = f" ({loop['speedup_vs_baseline']:.2f}x baseline)" if loop["speedup_vs_baseline"] else ""
            log(f"  batch {batch_size}: loop {loop['images_per_s']:.3g} images/s{speed}{mfu_text}; pipeline only "
                f"{pipeline['images_per_s']:.3g} images/s")
    finally:
        probe.close()
        clock.close()
        pool.close()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)

    measured_rows = [r for r in loop_rows if "error" not in r]
    if not measured_rows:
        raise RuntimeError(f"no batch size was measured: {[r.get('error') for r in loop_rows]}")
    best = max(measured_rows, key=lambda r: r["images_per_s"] or 0)
    random_weights = spec.is_random
    if settings["threads"]:
        notes.append(f"CPU run with {settings['threads']} torch thread(s)")
    if peak is None:
        notes.append(f"MFU not reported: {peak_source}")
    if any(r["rejected"] for r in measured_rows):
        notes.append("some generated rows were non-finite (random weights) and not written to the pool: images/s "
                     "counts every generated row (the work done); 'written' in the JSON counts the rows written")
    applies = device.type == "cuda" and not settings["generator"].startswith("tiny") and peak is not None
    targets = {"speedup_min": TARGET_SPEEDUP, "mfu_min": TARGET_MFU, "applies": applies,
               "speedup_met": (best["speedup_vs_baseline"] or 0) >= TARGET_SPEEDUP if applies and baseline else None,
               "mfu_met": (best["mfu"] or 0) >= TARGET_MFU if applies else None}
    return {
        "benchmark": "producer_loop", **env, "settings": settings,
        "recipe": recipe.describe(), "pipeline_kind": kind,
        "weights": {"spec": settings["generator"], "random": random_weights,
                    "label": weights_label(settings["generator"])},
        "policy_requested": requested, "policy_applied": applied, "load_seconds": load_seconds,
        "flops": {**flops, "source": flops_source},
        "peak_flops": peak, "peak_source": peak_source,
        "baseline": baseline, "pipeline": pipeline_rows, "loop": loop_rows, "best": best,
        "images_per_s": best["images_per_s"], "speedup_vs_baseline": best["speedup_vs_baseline"], "mfu": best["mfu"],
        "targets": targets, "notes": notes,
    }


def _measure_batch_size(producer, pool, stages: Stages, clock: ModuleClock, settings: dict, deadline: _Deadline,
                        device: torch.device) -> dict:
    """Warm-up batches (the first compiles this shape), then timed ``Producer.step`` + pool writes."""
    first = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="invalid value encountered in cast")
        for _ in range(settings["warmup"]):
            start = time.perf_counter()
            write_to_pool(pool, producer.step())
            common.synchronize(device)
            first = time.perf_counter() - start if first is None else first
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stages.reset()
        clock.reset()
        counts_before = dict(producer.counts)
        jobs = written = batches = 0
        with common.Timer(device) as timer:
            while batches < settings["repeats"] and (batches == 0 or not deadline.passed()):
                rows = producer.step()
                with stages("pool write"):
                    written += write_to_pool(pool, rows)
                jobs += producer.settings.batch_size
                batches += 1
    rejected = sum(v - counts_before.get(k, 0) for k, v in producer.counts.items())
    stage_seconds = {name: float(stages.seconds.get(name, 0.0)) for name in STAGES}
    stage_seconds["other"] = max(0.0, timer.seconds - sum(stage_seconds.values()))
    modules = clock.seconds()
    module_seconds = {name: modules[name] for name in MODULE_STAGES if name in modules}
    module_seconds["pipeline rest"] = max(0.0, stage_seconds["pipeline"] - sum(module_seconds.values()))
    return {"seconds": timer.seconds, "jobs": jobs, "written": written, "rejected": rejected, "batches": batches,
            "first_call_seconds": first, "stage_seconds": stage_seconds, "module_seconds": module_seconds,
            "unet_latents": clock.latents["unet"], "unet_forwards": clock.calls["unet"]}


def _allow_recompiles(count: int) -> None:
    """One compiled graph per UNet batch shape (dynamic=False): let dynamo keep them all instead of falling back
    to eager after its default limit of 8 (``recompile_limit``, formerly ``cache_size_limit``)."""
    import torch._dynamo.config as config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < count:
            setattr(config, name, count)


def weights_label(spec: str) -> str:
    if spec.startswith("full-random"):
        return "full-size random weights: same FLOPs, honest speed (images are noise)"
    if spec.startswith("tiny"):
        return "tiny random weights: smoke test only, not representative of any real generator"
    return "real weights"


# ------------------------------------------------------------------------------------------------- report
TABLE_COLUMNS = ("provider", "batch", "images/s", "speedup", "UNet TFLOP/s", "UNet MFU", "first call s", "peak GiB")
STAGE_COLUMNS = ("batch", *STAGES, "other", "of which UNet", "VAE decoder", "text encoder")


def table_rows(result: dict) -> list[list]:
    rows = []
    if result["baseline"]:
        b = result["baseline"]
        rows.append([b["provider"], 1, b["images_per_s"], "1.00x", b["unet_tflops_per_s"],
                     common.format_percent(b["mfu"]), None, b["peak_memory_gib"]])
    pipelines = {r["batch_size"]: r for r in result["pipeline"]}
    for loop in result["loop"]:
        if "error" in loop:
            rows.append([loop["provider"], loop["batch_size"], loop["error"][:40], "", "", "", "", ""])
            continue
        for row in (pipelines[loop["batch_size"]], loop):
            speedup = f"{row['speedup_vs_baseline']:.2f}x" if row["speedup_vs_baseline"] else "n/a"
            rows.append([row["provider"], row["batch_size"], row["images_per_s"], speedup, row["unet_tflops_per_s"],
                         common.format_percent(row["mfu"]), loop["first_call_seconds"] if row is loop else None,
                         loop["peak_memory_gib"] if row is loop else None])
    return rows


def stage_rows(result: dict) -> list[list]:
    """Milliseconds per batch in each stage of the loop."""
    rows = []
    for loop in result["loop"]:
        if "error" in loop:
            continue
        per = 1e3 / loop["batches"]
        stages, modules = loop["stage_seconds"], loop["module_seconds"]
        rows.append([loop["batch_size"], *[stages[name] * per for name in (*STAGES, "other")],
                     modules.get("unet", 0) * per, modules.get("vae_decoder", 0) * per,
                     modules.get("text_encoder", 0) * per])
    return rows


def plot(result: dict, path: Path) -> Path:
    """Stacked stage times per image at each batch size, and the baseline's time per image."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    loops = [r for r in result["loop"] if "error" not in r]
    xs = np.arange(len(loops))
    bottom = np.zeros(len(loops))
    parts = [("unet", "UNet"), ("vae_decoder", "VAE decoder"), ("vae_encoder", "VAE encoder"),
             ("text_encoder", "text encoder"), ("pipeline rest", "pipeline: rest")]
    colors = iter(plt.get_cmap("tab20").colors)
    for key, label in parts:  # inside the pipeline call
        values = np.array([r["module_seconds"].get(key, 0) / max(r["jobs"], 1) * 1e3 for r in loops])
        ax.bar(xs, values, bottom=bottom, label=label, color=next(colors))
        bottom += values
    for name in (*STAGES, "other"):  # the rest of the loop
        if name == "pipeline":
            continue
        values = np.array([r["stage_seconds"].get(name, 0) / max(r["jobs"], 1) * 1e3 for r in loops])
        ax.bar(xs, values, bottom=bottom, label=name, color=next(colors))
        bottom += values
    if result["baseline"]:
        ax.axhline(1e3 / result["baseline"]["images_per_s"], color="gray", ls="--",
                   label="baseline: diffusers, 1 image/call")
    ax.set_xticks(xs, [f"batch {r['batch_size']}" for r in loops])
    ax.set_ylabel("ms per generated image")
    s = result["settings"]
    ax.set_title(f"producer loop: {s['recipe']} ({result['pipeline_kind']}), {s['size']} px, {s['steps']} steps on "
                 f"{result['device']}\n{result['weights']['label']}", fontsize=8)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(result: dict, out_dir: str | Path | None, results_md: str | Path | None) -> dict:
    """Write ``producer_loop_<recipe>.json`` and ``.png`` into ``out_dir``; append two blocks to ``results_md``."""
    paths = {}
    s = result["settings"]
    stem = f"producer_loop_{s['recipe']}"
    if out_dir:
        out_dir = Path(out_dir)
        paths["json"] = common.write_json(out_dir / f"{stem}.json", result)
        paths["png"] = plot(result, out_dir / f"{stem}.png")
    if results_md:
        title = f"producer loop: {s['recipe']} ({result['pipeline_kind']}), {s['size']} px, {s['steps']} steps, " \
                f"{result['weights']['spec']}"
        applied = result["policy_applied"]
        notes = [result["weights"]["label"], f"UNet FLOPs per latent {result['flops']['unet_flops_per_latent']:.4g} "
                 f"(counted once: {result['flops']['source']})",
                 "policy applied (read off the modules): " + ", ".join(
                     f"{k}={v}" for k, v in applied.items() if k != "attention_processors"), *result["notes"]]
        common.append_results_md(results_md, title, TABLE_COLUMNS, table_rows(result), env=result, settings=s,
                                 notes=notes)
        paths["results_md"] = common.append_results_md(
            results_md, f"{title}: ms per batch by stage", STAGE_COLUMNS, stage_rows(result), env=result,
            settings={"recipe": s["recipe"], "batch_sizes": s["batch_sizes"]},
            notes=["stages of Producer.step + the pool write; 'of which' columns are inside 'pipeline'"])
    return paths


def print_summary(result: dict) -> None:
    s = result["settings"]
    print()
    print(f"producer loop benchmark: {s['recipe']} ({result['pipeline_kind']}), {s['size']} px -> {s['image_size']} "
          f"px pool, {s['steps']} steps on {result['device']}")
    print(f"weights: {result['weights']['label']}")
    print(text_table(TABLE_COLUMNS, table_rows(result)))
    print("ms per batch by stage:")
    print(text_table(STAGE_COLUMNS, stage_rows(result)))
    best = result["best"]
    speed = f", {best['speedup_vs_baseline']:.2f}x the baseline" if best["speedup_vs_baseline"] else ""
    print(f"best: batch {best['batch_size']}, {best['images_per_s']:.3g} images/s through the whole loop{speed}, UNet "
          f"MFU {common.format_percent(best['mfu'])} (peak: {result['peak_source']})")
    t = result["targets"]
    if t["applies"]:
        speedup = "n/a" if t["speedup_met"] is None else ("met" if t["speedup_met"] else "NOT met")
        print(f"targets: speedup >= {t['speedup_min']}x {speedup}; UNet MFU >= {t['mfu_min'] * 100:.0f}% "
              f"{'met' if t['mfu_met'] else 'NOT met'}")
    for note in result["notes"]:
        print(f"note: {note}")


def main(argv=None) -> dict:
    return common.run_cli(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
