"""How fast does a producer generate? The diffusers baseline and the producer's path, side by side.

For one generator task at one size, step count and guidance, in one run:

* **baseline**: the diffusers pipeline called the way the papers' code does it (DiffuseMix:
  ``pipe(prompt, image=img, guidance_scale=4).images``): one PIL image per call in a Python loop, fp16 on
  CUDA, eager (``load_pipeline(..., compile_unet=False)``; it gets SDPA and channels-last from
  ``load_pipeline`` too, so the speedup below is conservative);
* **ours**: the producer's path at each batch size: batched tensor calls under ``inference_mode``, fp16/bf16,
  SDPA, channels-last, ``torch.compile(dynamic=False)`` with one fixed shape per batch size; for
  ``instruct-pix2pix`` literally ``DiffuseMix.produce`` (what a producer process runs), including the uint8
  conversion and the copy back to the host. ``--fuse-qkv`` and ``--compile-mode reduce-overhead`` (CUDA
  graphs) / ``max-autotune`` try more.

Reported per row: images/s, images per GPU-hour, speedup over the baseline, and the UNet's model FLOPs
utilisation: the UNet FLOPs per latent, counted once with ``torch.utils.flop_counter.FlopCounterMode`` on the
first UNet forward of one eager call (:func:`benchmarks.profiling.unet_flops_per_latent`), times the latents the
UNet is fed in each timed window (so classifier-free guidance's 2x/3x UNet batch and img2img's shortened schedule
are included, as run), over the seconds and the device's dense fp16/bf16 peak (``common.PEAK_DENSE_FP16_FLOPS``).
The whole producer loop (decode, resizes, copies, pool write) is ``benchmarks/producer_loop.py``.

Weights: a local folder or hub id if given; otherwise ``full-random`` on CUDA, the released SD 1.5 /
InstructPix2Pix architectures (UNet ~860M, VAE ~84M, CLIP ViT-L/14 text encoder ~123M) with random weights:
same FLOPs, honest speed, labelled as such. On CPU the tiny generator runs as a smoke test.

    python benchmarks/generator.py --quick                   # CPU smoke test (tiny generator)
    python benchmarks/generator.py --device cuda:0           # full-size random weights, 512 px, 100 steps
    python benchmarks/generator.py --generator /models/instruct-pix2pix --size 256 --steps 50
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import common
from onlineaug.models import LoadPolicy
from onlineaug.tables import text_table

PROMPT = "autumn"  # DiffuseMix's first prompt; the instruction text does not change the cost
TEXT_PROMPT = "a photo of a golden retriever"
NEGATIVE_PROMPT = "blurry, low quality, distorted, cartoon, text, watermark"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TASKS = ("instruct-pix2pix", "img2img", "text2img")  # the generator tasks this benchmark calls (SD 1.5 sizes)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Targets of the issue, on one H100 at the best batch size.
TARGET_SPEEDUP = 2.5
TARGET_MFU = 0.40

# --quick: the CPU smoke settings (tiny generator), about half a minute on 2 cores.
QUICK = {"generator": "tiny", "size": 64, "steps": 4, "batch_sizes": [1, 2, 4, 8], "warmup": 1, "repeats": 2,
         "baseline_images": 4}


# ----------------------------------------------------------------------------------------------- settings
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default=None,
                        help='"tiny" (default on CPU), "full-random" (default on CUDA), a local diffusers folder or '
                             'a cached hub id')
    parser.add_argument("--task", default="instruct-pix2pix", choices=TASKS)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (default 512; 64 with tiny)")
    parser.add_argument("--steps", type=int, default=None,
                        help="num_inference_steps (default 100 for instruct-pix2pix as in DiffuseMix/GenMix, 50 "
                             "otherwise; 4 with tiny)")
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--image-guidance-scale", type=float, default=1.5, help="instruct-pix2pix only")
    parser.add_argument("--strength", type=float, default=0.8, help="img2img (SDEdit) only: share of the schedule run")
    parser.add_argument("--negative-prompt", default=NEGATIVE_PROMPT, help="text2img only")
    parser.add_argument("--scheduler", default=None,
                        help="euler_a | euler | ddim | dpm++ | pndm | edm_euler for both sides (default: the task's)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 4 8 16 32")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="ours (default fp16 on CUDA, fp32 on CPU); the baseline is always fp16 on CUDA")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="torch.compile the UNet in ours (default on CUDA)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="torch.compile mode of ours; reduce-overhead = CUDA graphs")
    parser.add_argument("--fuse-qkv", action="store_true", help="ours: fuse the attention QKV projections")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls per batch size, default 1 (the first call compiles and autotunes)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per batch size (ours)")
    parser.add_argument("--baseline-images", type=int, default=None, help="timed one-image calls of the baseline")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense fp16/bf16 peak of the GPU, for MFU on GPUs not in the table")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on CPU (default: 1 with --quick, which keeps a shared CI "
                             "machine's figures stable; torch's default otherwise)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="CPU smoke settings (tiny generator, few steps)")
    parser.add_argument("--out", default=str(common.RESULTS_DIR), help="folder for the JSON and the PNG")
    parser.add_argument("--results-md", default=str(common.RESULTS_MD),
                        help='RESULTS.md to append to ("" to skip)')
    return parser


def resolve_settings(args: argparse.Namespace) -> dict:
    """Fill the device-dependent defaults (and --quick's), validate, return the settings of the run."""
    device = common.resolve_device(args.device)
    cuda = device.type == "cuda"
    quick = QUICK if args.quick else {}
    generator = args.generator or quick.get("generator") or ("full-random" if cuda else "tiny")
    tiny = generator == "tiny"
    size = args.size or quick.get("size") or (64 if tiny else 512)
    steps = args.steps or quick.get("steps") or (4 if tiny else 100 if args.task == "instruct-pix2pix" else 50)
    settings = {
        "generator": generator,
        "task": args.task,
        "device": str(device),
        "size": size,
        "steps": steps,
        "guidance_scale": args.guidance_scale,
        "image_guidance_scale": args.image_guidance_scale if args.task == "instruct-pix2pix" else None,
        "strength": args.strength if args.task == "img2img" else None,
        "negative_prompt": args.negative_prompt if args.task == "text2img" else None,
        "scheduler": args.scheduler,
        "batch_sizes": list(args.batch_sizes or quick.get("batch_sizes") or [1, 4, 8, 16, 32]),
        "dtype": args.dtype or ("fp16" if cuda else "fp32"),
        "baseline_dtype": "fp16" if cuda else "fp32",
        "compile": cuda if args.compile is None else bool(args.compile),
        "compile_mode": args.compile_mode,
        "fuse_qkv": bool(args.fuse_qkv),
        "warmup": args.warmup if args.warmup is not None else quick.get("warmup", 1),
        "repeats": args.repeats or quick.get("repeats") or (3 if cuda else 2),
        "baseline_images": args.baseline_images or quick.get("baseline_images") or (8 if cuda else 4),
        "peak_tflops": args.peak_tflops,
        "threads": None if cuda else (args.threads or (1 if args.quick else torch.get_num_threads())),
        "seed": args.seed,
        "quick": bool(args.quick),
    }
    multiple = 16 if tiny else 8
    if size < multiple or size % multiple:
        raise ValueError(f"--size must be a positive multiple of {multiple} for generator {generator!r} (the VAE "
                         f"downsamples by 8{' and the tiny UNet once more' if tiny else ''}), got {size}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if args.task == "img2img" and (not 0 < args.strength <= 1 or int(steps * args.strength) < 1):
        raise ValueError(f"--strength must be in (0, 1] with int(steps x strength) >= 1 UNet step; got strength "
                         f"{args.strength} with {steps} steps")
    if any(b < 1 for b in settings["batch_sizes"]):
        raise ValueError(f"--batch-sizes must be positive, got {settings['batch_sizes']}")
    for name in ("repeats", "baseline_images"):
        if settings[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {settings[name]}")
    if settings["warmup"] < 0:
        raise ValueError(f"--warmup must be >= 0, got {settings['warmup']}")
    if settings["compile"] and not cuda and not args.quick:
        warnings.warn("torch.compile on CPU needs a C++ compiler and is not what producers do on GPUs; "
                      "pass --no-compile if it fails", stacklevel=2)
    return settings


def weights_label(spec: str) -> str:
    if spec == "full-random":
        return "full-size random weights: same FLOPs, honest speed (images are noise)"
    if spec == "tiny":
        return "tiny random weights: smoke test only, not representative of any real generator"
    return "real weights"


# --------------------------------------------------------------------------------------------- pipelines
def _load(settings: dict, *, dtype: torch.dtype, ours: bool):
    """The pipeline under the producers' load policy (LoadPolicy); the baseline is eager."""
    from onlineaug.generators import load_pipeline

    compile_ = ours and settings["compile"]
    policy = LoadPolicy(dtype={v: k for k, v in DTYPES.items()}[dtype],
                        compile=settings["compile_mode"] if compile_ else False,
                        fuse_qkv=ours and settings["fuse_qkv"])
    pipe = load_pipeline(settings["generator"], settings["task"], device=settings["device"], seed=settings["seed"],
                         scheduler=settings["scheduler"], policy=policy)
    if compile_:
        _allow_recompiles(len(settings["batch_sizes"]) + 2)
    return pipe


def _allow_recompiles(count: int) -> None:
    """One compiled graph per batch size (dynamic=False): let dynamo keep them all instead of falling back to
    eager after its default limit of 8 (``recompile_limit``, formerly ``cache_size_limit``)."""
    import torch._dynamo.config as config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < count:
            setattr(config, name, count)


def source_images(size: int, count: int, seed: int) -> torch.Tensor:
    """``count`` uint8 (3, size, size) source images (SyntheticShapes; content does not change the cost)."""
    from onlineaug.datasets import SyntheticShapes

    dataset = SyntheticShapes(num_classes=10, size=max(size, 16), length=max(count, 1), seed=seed)
    from onlineaug.images import resize_uint8

    return resize_uint8(torch.stack([dataset[i][0] for i in range(count)]), size)


def baseline_call(pipe, settings: dict, image, index: int):
    """One image per call, PIL in and PIL out, as the papers' scripts do."""
    device = torch.device(settings["device"])
    generator = torch.Generator(device).manual_seed(settings["seed"] + index)
    common_kwargs = {"num_inference_steps": settings["steps"], "guidance_scale": settings["guidance_scale"],
                     "generator": generator}
    task = settings["task"]
    if task == "instruct-pix2pix":
        return pipe(PROMPT, image=image, image_guidance_scale=settings["image_guidance_scale"], **common_kwargs).images
    if task == "img2img":
        return pipe(TEXT_PROMPT, image=image, strength=settings["strength"], **common_kwargs).images
    return pipe(TEXT_PROMPT, negative_prompt=settings["negative_prompt"], height=settings["size"],
                width=settings["size"], **common_kwargs).images


def ours_call(pipe, settings: dict, images: torch.Tensor, generator: torch.Generator) -> dict:
    """One batched call on the producer's path; returns the payload on the host (as the producer copies it)."""
    task, count, device = settings["task"], images.shape[0], images.device
    with torch.inference_mode():
        if task == "instruct-pix2pix":
            # Exactly what a DiffuseMix/GenMix producer runs (recipe.produce), at this size and step count.
            from onlineaug.producer import standalone_context
            from onlineaug.recipes.base import SourceBatch
            from onlineaug.recipes.diffusemix import DiffuseMix

            recipe = DiffuseMix(num_inference_steps=settings["steps"], guidance_scale=settings["guidance_scale"],
                                image_guidance_scale=settings["image_guidance_scale"],
                                generation_size=settings["size"])
            sources = SourceBatch(images=images, originals=images.cpu(), labels=torch.zeros(count, dtype=torch.int64),
                                  indices=torch.arange(count))
            context = standalone_context(num_classes=1, image_size=settings["size"], device=device)
            context.generator = generator
            payload = recipe.produce({"edit": pipe}, sources, context).payload
        else:
            # img2img / text2img recipes (Diff-Mix, DiffCoRe-Mix) are not in yet: the same batched call shape.
            seeds = torch.randint(2**62, (count,), generator=generator, device=device).tolist()
            per_sample = [torch.Generator(device=device).manual_seed(s) for s in seeds]
            kwargs = {"num_inference_steps": settings["steps"], "guidance_scale": settings["guidance_scale"],
                      "generator": per_sample, "output_type": "pt"}
            if task == "img2img":
                out = pipe(prompt=[TEXT_PROMPT] * count, image=images.float().div(255), strength=settings["strength"],
                           **kwargs).images
            else:
                out = pipe(prompt=[TEXT_PROMPT] * count, negative_prompt=[settings["negative_prompt"]] * count,
                           height=settings["size"], width=settings["size"], **kwargs).images
            payload = {"generated": out.float().clamp(0, 1).mul(255).round().to(torch.uint8)}
        return {name: value.cpu() for name, value in payload.items()}


def unet_work(clock, calls: int, images: int, flops_per_latent: float) -> dict:
    """What the UNet ran over ``calls`` pipeline calls of ``images`` images in all, from the module clock: forwards
    per call, latent copies per image per forward (classifier-free guidance) and FLOPs per image."""
    forwards, latents = clock.calls["unet"], clock.latents["unet"]
    return {"unet_forwards_per_call": forwards / calls, "unet_batch": latents // forwards if forwards else None,
            "unet_batch_per_image": latents * calls / (forwards * images) if forwards else None,
            "unet_flops_per_image": flops_per_latent * latents / images}


# ------------------------------------------------------------------------------------------------- measure
def _row(provider: str, batch_size: int, images: int, timer: common.Timer, flops_per_image: float | None,
         peak: float | None, baseline_rate: float | None) -> dict:
    rate = images / timer.seconds
    tflops = flops_per_image * rate / 1e12 if flops_per_image else None
    return {
        "provider": provider, "batch_size": batch_size, "images": images, "seconds": timer.seconds,
        "gpu_seconds": timer.gpu_seconds, "images_per_s": rate, "images_per_gpu_hour": rate * 3600,
        "speedup_vs_baseline": rate / baseline_rate if baseline_rate else 1.0,
        "unet_flops_per_image": flops_per_image, "unet_tflops_per_s": tflops,
        "mfu": tflops * 1e12 / peak if (peak and tflops) else None,
    }


def _memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def benchmark(args: argparse.Namespace, *, progress: bool = True) -> dict:
    """Run the baseline and ours; return the result (nothing written). ``args`` from :func:`build_parser`."""
    settings = resolve_settings(args)
    with common.torch_threads(settings["threads"]):
        return _benchmark(settings, progress)


def _benchmark(settings: dict, progress: bool) -> dict:
    from benchmarks.profiling import ModuleClock, unet_flops_per_latent
    from onlineaug.generators import describe

    device = torch.device(settings["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)  # cudnn.benchmark: as the producers' load policy sets it, not here
    env = common.environment(device)
    dtype = DTYPES[settings["dtype"]]
    if settings["peak_tflops"]:
        peak, peak_source = settings["peak_tflops"] * 1e12, "--peak-tflops"
    else:
        peak, peak_source = common.peak_flops(device, dtype)
    log = print if progress else (lambda *a, **k: None)
    notes = []
    largest = max(settings["batch_sizes"])
    images = source_images(settings["size"], largest, settings["seed"]).to(device)
    description = describe(settings["generator"], settings["task"])
    log(f"generator benchmark: {description} on {env['device']}; {settings['task']}, {settings['size']} px, "
        f"{settings['steps']} steps")

    # ---- baseline: one PIL image per call, eager (the papers' loop)
    from PIL import Image

    baseline_pipe = _load(settings, dtype=DTYPES[settings["baseline_dtype"]], ours=False)
    pil = [Image.fromarray(img.permute(1, 2, 0).cpu().numpy()) for img in images[:settings["baseline_images"]]]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="invalid value encountered in cast")  # random-weight NaNs -> PIL
        for i in range(settings["warmup"]):
            baseline_call(baseline_pipe, settings, pil[i % len(pil)], i)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # UNet FLOPs per latent, counted once on the first UNet forward of one eager call, then scaled by the
        # latents the UNet is fed in each timed window (guidance copies and the schedule run included)
        per_latent = unet_flops_per_latent(
            baseline_pipe, lambda: baseline_call(baseline_pipe, settings, pil[0], 0))["unet_flops_per_latent"]
        with ModuleClock({"unet": baseline_pipe.unet}, device) as clock, common.Timer(device) as timer:
            for i in range(settings["baseline_images"]):
                baseline_call(baseline_pipe, settings, pil[i % len(pil)], i)
    work = unet_work(clock, settings["baseline_images"], settings["baseline_images"], per_latent)
    baseline = {**_row("baseline", 1, settings["baseline_images"], timer, work["unet_flops_per_image"], peak,
                       None), **work, "peak_memory_gib": _memory(device), "first_call_seconds": None}
    log(f"  baseline (1 image/call, eager {settings['baseline_dtype']}): {baseline['images_per_s']:.3g} images/s")
    del baseline_pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---- ours: the producer's path, batched, one compiled shape per batch size
    pipe = _load(settings, dtype=dtype, ours=True)
    ours = []
    for batch_size in settings["batch_sizes"]:
        batch = images[:batch_size].contiguous()
        generator = torch.Generator(device).manual_seed(settings["seed"] + batch_size)
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            first = None
            for i in range(settings["warmup"]):
                with common.Timer(device) as warm:
                    ours_call(pipe, settings, batch, generator)
                first = warm.seconds if first is None else first
            with ModuleClock({"unet": pipe.unet}, device) as clock, common.Timer(device) as timer:
                for _ in range(settings["repeats"]):
                    ours_call(pipe, settings, batch, generator)
        except torch.cuda.OutOfMemoryError as error:
            torch.cuda.empty_cache()
            ours.append({"provider": "ours", "batch_size": batch_size, "error": f"out of memory: {error}"[:300]})
            log(f"  ours batch {batch_size}: out of memory")
            continue
        work = unet_work(clock, settings["repeats"], batch_size * settings["repeats"], per_latent)
        row = _row("ours", batch_size, batch_size * settings["repeats"], timer, work["unet_flops_per_image"], peak,
                   baseline["images_per_s"])
        row.update(work, peak_memory_gib=_memory(device), first_call_seconds=first)
        ours.append(row)
        mfu = f", UNet MFU {row['mfu'] * 100:.1f}%" if row["mfu"] is not None else ""
        log(f"  ours batch {batch_size}: {row['images_per_s']:.3g} images/s "
            f"({row['speedup_vs_baseline']:.2f}x baseline{mfu})")

    measured = [r for r in ours if "error" not in r]
    if not measured:
        raise RuntimeError(f"every batch size of ours failed: {[r.get('error') for r in ours]}")
    best = max(measured, key=lambda r: r["images_per_s"])
    random_weights = settings["generator"] in ("tiny", "full-random")
    if settings["threads"]:
        notes.append(f"CPU run with {settings['threads']} torch thread(s)")
    if peak is None:
        notes.append(f"MFU not reported: {peak_source}")
    applies = device.type == "cuda" and settings["generator"] != "tiny" and peak is not None
    targets = {
        "speedup_min": TARGET_SPEEDUP, "mfu_min": TARGET_MFU, "applies": applies,
        "speedup_met": best["speedup_vs_baseline"] >= TARGET_SPEEDUP if applies else None,
        "mfu_met": (best["mfu"] or 0) >= TARGET_MFU if applies else None,
    }
    return {
        "benchmark": "generator",
        **env,
        "settings": settings,
        "weights": {"spec": settings["generator"], "description": description, "random": random_weights,
                    "label": weights_label(settings["generator"])},
        "peak_flops": peak, "peak_source": peak_source,
        "baseline": baseline,
        "ours": ours,
        "best": best,
        "images_per_s": best["images_per_s"],
        "images_per_gpu_hour": best["images_per_gpu_hour"],
        "speedup_vs_baseline": best["speedup_vs_baseline"],
        "mfu": best["mfu"],
        "baseline_images_per_s": baseline["images_per_s"],
        "targets": targets,
        "notes": notes,
    }


# -------------------------------------------------------------------------------------------------- report
TABLE_COLUMNS = ("provider", "batch", "images/s", "images/GPU-h", "speedup", "UNet TFLOP/s", "UNet MFU",
                 "first call s", "peak GiB")


def table_rows(result: dict) -> list[list]:
    rows = []
    for row in [result["baseline"], *result["ours"]]:
        if "error" in row:
            rows.append([row["provider"], row["batch_size"], "error", row["error"][:40], "", "", "", "", ""])
            continue
        label = "baseline (diffusers, 1/call, eager)" if row["provider"] == "baseline" else "ours (producer path)"
        rows.append([label, row["batch_size"], row["images_per_s"], row["images_per_gpu_hour"],
                     f"{row['speedup_vs_baseline']:.2f}x", row["unet_tflops_per_s"],
                     common.format_percent(row["mfu"]), row["first_call_seconds"], row["peak_memory_gib"]])
    return rows


def plot(result: dict, path: Path) -> Path:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = [r for r in result["ours"] if "error" not in r]
    xs = [r["batch_size"] for r in rows]
    s = result["settings"]
    how = "batched, compiled" if s["compile"] else "batched, eager"
    ax.plot(xs, [r["images_per_s"] for r in rows], "o-", label=f"ours: producer path ({how}, {s['dtype']})")
    ax.axhline(result["baseline"]["images_per_s"], color="gray", ls="--",
               label=f"baseline: diffusers, 1 image/call, eager ({s['baseline_dtype']})")
    for r in rows:
        if r["mfu"] is not None:
            ax.annotate(f"MFU {r['mfu'] * 100:.0f}%", (r["batch_size"], r["images_per_s"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("batch size (images per pipeline call)")
    ax.set_ylabel("images/s")
    ax.set_title(f"{s['task']}, {s['size']} px, {s['steps']} steps on {result['device']}\n"
                 f"{result['weights']['label']}", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(result: dict, out_dir: str | Path | None, results_md: str | Path | None) -> dict:
    """Write ``generator_<task>.json`` and ``.png`` into ``out_dir`` and append a block to ``results_md``."""
    paths = {}
    stem = f"generator_{result['settings']['task']}"
    if out_dir:
        out_dir = Path(out_dir)
        paths["json"] = common.write_json(out_dir / f"{stem}.json", result)
        paths["png"] = plot(result, out_dir / f"{stem}.png")
    if results_md:
        s = result["settings"]
        title = f"generator: {s['task']}, {s['size']} px, {s['steps']} steps, {result['weights']['spec']}"
        paths["results_md"] = common.append_results_md(
            results_md, title, TABLE_COLUMNS, table_rows(result), env=result, settings=s,
            notes=list(dict.fromkeys([result["weights"]["label"], *result["notes"]])))
    return paths


def print_summary(result: dict) -> None:
    s = result["settings"]
    print()
    print(f"generator benchmark: {s['task']}, {s['size']} px, {s['steps']} steps, guidance {s['guidance_scale']}, "
          f"on {result['device']}")
    print(f"weights: {result['weights']['description']}: {result['weights']['label']}")
    print(text_table(TABLE_COLUMNS, table_rows(result)))
    best = result["best"]
    mfu = common.format_percent(best["mfu"])
    print(f"best: batch {best['batch_size']}, {best['images_per_s']:.3g} images/s "
          f"({best['images_per_gpu_hour']:,.0f} per GPU-hour), {best['speedup_vs_baseline']:.2f}x the baseline, "
          f"UNet MFU {mfu} (peak: {result['peak_source']})")
    t = result["targets"]
    if t["applies"]:
        print(f"targets: speedup >= {t['speedup_min']}x {'met' if t['speedup_met'] else 'NOT met'}; "
              f"UNet MFU >= {t['mfu_min'] * 100:.0f}% {'met' if t['mfu_met'] else 'NOT met'}")
    for note in result["notes"]:
        print(f"note: {note}")


def main(argv=None) -> dict:
    return common.run_cli(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
