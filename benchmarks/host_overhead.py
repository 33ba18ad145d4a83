"""A CPU proxy for the trainer's cost: the loader's host work per batch, against a plain DataLoader, on any machine.

``python benchmarks/overhead.py --host-only`` (this module) times, per batch, what the trainer's process does to
get a batch with everything on the CPU device and no training step: for ``OnlineGenAugLoader`` the DataLoader
fetch and collate, the replacement coins, the pool look-ups and copies, the bookkeeping and the recipe's mixing
(``none``, ``cutmix``, ``mixup``, ``genmix`` from a pre-filled pool); for the reference, a plain ``DataLoader`` of
the same data plus normalisation and one-hot targets (``plain``), and that batch through torchvision v2
``CutMix`` / ``MixUp``. The pool is filled by a real producer process (tiny generator) which is then stopped, so
no generation shares the cores while timing, and ``max_reuse`` is large enough that no generated serve misses.

Like with like: every provider reads the same cached uint8 images through the loader's own item reader with the
same crop (``--resize``, default ``squash``: a no-op on images already at ``--image-size``, so what is timed is
the loaders' own host work, not the item crop a real trainer runs in its DataLoader workers), the same batch
size and one thread. Every provider returns float32 (B, 3, S, S) images normalised as ``(x / 255 - mean) / std``
with ImageNet's mean and std (``onlineaug.ops.normalize``, the call the recipes make) and float32 (B, K) soft
targets: ``plain`` normalises and builds one-hot targets; torchvision's ``CutMix``/``MixUp`` get the normalised
float32 batch (as their docs show) and build their own soft targets; onlineaug's ``cutmix`` pastes its boxes in
uint8 and then normalises, ``mixup`` normalises and then mixes. torchvision draws one lambda per batch and pairs
each sample with its neighbour (``roll``); onlineaug draws a lambda, a box and a partner per sample.

Timing: providers are interleaved (run 1 of every provider, then run 2, ...) so that a noisy machine slows them
alike; each run times ``--batches`` consecutive batches one by one after untimed warm-up batches. Reported per
provider: the median and the minimum over every timed batch, the fastest batch of each run, and the ratios of the
median and of the minimum to ``plain``'s. Targets: ``none`` within 1.2x of ``plain``; ``cutmix``/``mixup`` faster
than torchvision's.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks import common
from onlineaug.tables import text_table

RECIPES = ("none", "cutmix", "mixup", "genmix")
BASELINES = ("tv-cutmix", "tv-mixup")
TARGET_NONE_RATIO = 1.2
DEFAULTS = {"batch_size": 64, "image_size": 64, "num_classes": 10, "pool_size": 64, "cache_images": 128,
            "runs": 10, "batches": 10, "warmup_batches": 2, "threads": 1,
            "resize": "squash"}


def resolve_settings(args) -> dict:
    """The host-only settings from ``overhead.py``'s arguments (its own defaults where they were not given)."""
    if args.device not in (None, "cpu"):
        raise ValueError(f"--host-only times the loader's host work on the CPU device; drop --device {args.device}")
    from benchmarks.overhead import BASELINES as ALL_BASELINES
    from benchmarks.overhead import DEFAULT_RECIPES

    recipes = list(RECIPES) if args.recipes == DEFAULT_RECIPES else list(args.recipes)
    baselines = list(BASELINES) if list(args.baselines) == list(ALL_BASELINES) else list(args.baselines)
    timm = [b for b in baselines if b.startswith("timm")]
    if timm and (args.batch_size or DEFAULTS["batch_size"]) % 2:
        raise ValueError(f"timm's Mixup needs an even batch size, got --batch-size {args.batch_size}")
    settings = {
        "device": "cpu",
        "batch_size": args.batch_size or DEFAULTS["batch_size"],
        "image_size": args.image_size or DEFAULTS["image_size"],
        "num_classes": args.num_classes or DEFAULTS["num_classes"],
        "recipes": recipes, "baselines": baselines,
        "p_aug": args.p_aug, "mix_p": args.mix_p,
        "pool_size": args.pool_size or DEFAULTS["pool_size"],
        "cache_images": args.cache_images or DEFAULTS["cache_images"],
        "runs": args.runs or DEFAULTS["runs"], "batches": args.batches or DEFAULTS["batches"],
        "warmup_batches": DEFAULTS["warmup_batches"] if args.warmup_steps is None else args.warmup_steps,
        "threads": args.threads or DEFAULTS["threads"],
        "num_workers": 0, "seed": args.seed,
        "resize": getattr(args, "resize", None) or DEFAULTS["resize"],
    }
    for name in ("batch_size", "runs", "batches", "pool_size"):
        if settings[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {settings[name]}")
    if settings["image_size"] % 16:
        raise ValueError(f"--image-size must be a multiple of 16 (the tiny generator), got {settings['image_size']}")
    return settings


# --------------------------------------------------------------------------------------------- providers
class HostProvider:
    def __init__(self, name: str, kind: str, batches, close=lambda: None, stats=lambda: None):
        self.name, self.kind, self.batches, self.close, self.stats = name, kind, batches, close, stats


def _plain(dataset, settings: dict, *, name: str = "plain", mixer=None, kind: str = "plain") -> HostProvider:
    from benchmarks.overhead import vanilla_provider

    provider = vanilla_provider(dataset, {**settings, "steps": 0}, torch.device("cpu"), name=name, mixer=mixer,
                                kind=kind)
    return HostProvider(name, kind, provider.batches, provider.close)


def _online(recipe: str, dataset, settings: dict) -> HostProvider:
    from benchmarks.overhead import _cycle
    from onlineaug import OnlineGenAugLoader
    from onlineaug.recipes import get_recipe

    generative = get_recipe(recipe).generative
    batches_served = settings["batch_size"] * (settings["batches"] * settings["runs"] + settings["warmup_batches"] + 1)
    loader = OnlineGenAugLoader(
        dataset, recipe=recipe, num_classes=settings["num_classes"], batch_size=settings["batch_size"],
        image_size=settings["image_size"], generator="tiny", device="cpu",
        generator_devices=["cpu"] if generative else (), p_aug=settings["p_aug"] if generative else settings["mix_p"],
        pool_size=settings["pool_size"], max_reuse=max(8, batches_served), num_workers=0, seed=settings["seed"],
        drop_last=True, recipe_options={"num_inference_steps": 1} if generative else None,
        resize=settings["resize"], generator_batch_size=min(4, settings["pool_size"]), progress=False, prefetch=1,
        heartbeat_timeout_s=3600.0)
    try:
        if generative:  # fill the pool, then stop the producer: nothing generates while the loader is timed
            loader.wait_for_pool(settings["pool_size"])
            loader.producers.stop()
    except BaseException:
        loader.close()
        raise
    iterator = _cycle(loader)

    def close():
        iterator.close()
        loader.close()

    return HostProvider(f"onlineaug {recipe}", "onlineaug", iterator, close, loader.stats)


def make_providers(dataset, settings: dict) -> list[HostProvider]:
    from benchmarks.overhead import BASELINE_NAMES, baseline_mixer

    providers = [_plain(dataset, settings)]
    try:
        for recipe in settings["recipes"]:
            providers.append(_online(recipe, dataset, settings))
        for name in settings["baselines"]:
            providers.append(_plain(dataset, settings, name=BASELINE_NAMES[name], kind="torchvision",
                                    mixer=baseline_mixer(name, settings["num_classes"])))
    except BaseException:
        for provider in providers:
            provider.close()
        raise
    return providers


# ------------------------------------------------------------------------------------------------ measure
def _time_batches(provider: HostProvider, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        next(provider.batches)
        times.append(time.perf_counter() - start)
    return times


def benchmark(args, *, progress: bool = True) -> dict:
    settings = resolve_settings(args)
    with common.torch_threads(settings["threads"]):
        return _benchmark(settings, progress)


def _benchmark(settings: dict, progress: bool) -> dict:
    from benchmarks.overhead import CachedImages

    log = print if progress else (lambda *a, **k: None)
    env = common.environment("cpu")
    length = settings["batch_size"] * (settings["runs"] * settings["batches"] + settings["warmup_batches"] + 4)
    dataset = CachedImages(num_classes=settings["num_classes"], size=settings["image_size"],
                           length=max(length, settings["cache_images"]), cache=settings["cache_images"],
                           seed=settings["seed"])
    log(f"host-only overhead: batch {settings['batch_size']}, {settings['image_size']} px, {settings['threads']} "
        f"thread(s), resize {settings['resize']}, {settings['runs']} interleaved runs of {settings['batches']} batches "
        f"on {env['device']}")
    providers = make_providers(dataset, settings)
    times = {p.name: [] for p in providers}
    runs = {p.name: [] for p in providers}
    before = {}
    try:
        for provider in providers:
            _time_batches(provider, settings["warmup_batches"])
            before[provider.name] = provider.stats()
        for _ in range(settings["runs"]):
            for provider in providers:
                run = _time_batches(provider, settings["batches"])
                times[provider.name] += run
                runs[provider.name].append(min(run))
        after = {p.name: p.stats() for p in providers}
    finally:
        for provider in providers:
            provider.close()
    plain_median = statistics.median(times["plain"])
    plain_min = min(times["plain"])
    rows = []
    for provider in providers:
        t = times[provider.name]
        row = {"provider": provider.name, "kind": provider.kind, "median_ms": statistics.median(t) * 1e3,
               "min_ms": min(t) * 1e3, "fastest_per_run_ms": [r * 1e3 for r in runs[provider.name]],
               "median_vs_plain": statistics.median(t) / plain_median, "min_vs_plain": min(t) / plain_min,
               "batches_timed": len(t), "generated": None, "misses": None, "produced_while_timed": None}
        if after.get(provider.name) is not None and before.get(provider.name) is not None:
            row["generated"] = after[provider.name]["generated"] - before[provider.name]["generated"]
            row["misses"] = after[provider.name]["misses"] - before[provider.name]["misses"]
            row["produced_while_timed"] = after[provider.name]["produced"] - before[provider.name]["produced"]
        rows.append(row)
        log(f"  {provider.name}: median {row['median_ms']:.3g} ms, min {row['min_ms']:.3g} ms per batch "
            f"({row['median_vs_plain']:.2f}x plain)")
    by_name = {r["provider"]: r for r in rows}
    targets = {}
    if "onlineaug none" in by_name:
        ratio = by_name["onlineaug none"]["median_vs_plain"]
        targets["none_vs_plain"] = {"max": TARGET_NONE_RATIO, "value": ratio, "met": ratio <= TARGET_NONE_RATIO}
    for ours, theirs in (("onlineaug cutmix", "torchvision CutMix"), ("onlineaug mixup", "torchvision MixUp")):
        if ours in by_name and theirs in by_name:
            targets[f"{ours} < {theirs}"] = {"ours_ms": by_name[ours]["median_ms"],
                                             "theirs_ms": by_name[theirs]["median_ms"],
                                             "met": by_name[ours]["median_ms"] < by_name[theirs]["median_ms"]}
    notes = ["interleaved runs; per-batch wall time of next(batches) on the CPU device, no training step",
             f"like with like: the same uint8 items, crop resize={settings['resize']}"
             + (" (a no-op at this size: the loaders' own host work)" if settings["resize"] == "squash" else "")
             + ", batch and thread count for every provider; every provider returns float32 (B, 3, S, S) "
               "images normalised (x / 255 - mean) / std once and float32 (B, K) soft targets; torchvision "
               "mixes the normalised float32 batch (one lambda per batch), onlineaug per sample",
             "genmix: pool filled by a tiny-generator producer process, which is stopped before timing"]
    return {"benchmark": "host_overhead", **env, "settings": settings, "providers": rows, "targets": targets,
            "notes": notes}


# ------------------------------------------------------------------------------------------------- report
TABLE_COLUMNS = ("provider", "median ms/batch", "min ms/batch", "fastest per run ms", "median / plain",
                 "min / plain", "generated", "misses")


def table_rows(result: dict) -> list[list]:
    return [[r["provider"], r["median_ms"], r["min_ms"], " ".join(f"{v:.3g}" for v in r["fastest_per_run_ms"]),
             f"{r['median_vs_plain']:.2f}x", f"{r['min_vs_plain']:.2f}x", r["generated"], r["misses"]]
            for r in result["providers"]]


def plot(result: dict, path: Path) -> Path:
    plt = common.pyplot()
    rows = result["providers"]
    fig, ax = plt.subplots(figsize=(7.2, 3.8))
    xs = range(len(rows))
    ax.bar(xs, [r["median_ms"] for r in rows], color="tab:blue", label="median")
    ax.scatter(xs, [r["min_ms"] for r in rows], color="black", zorder=3, s=14, label="minimum")
    ax.set_xticks(list(xs), [r["provider"].replace("onlineaug ", "oa ") for r in rows], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylabel("host ms per batch")
    s = result["settings"]
    ax.set_title(f"loader host work per batch: batch {s['batch_size']}, {s['image_size']} px, {s['threads']} "
                 f"thread(s) on {result['device']}", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(result: dict, out_dir, results_md) -> dict:
    paths = {}
    if out_dir:
        out_dir = Path(out_dir)
        paths["json"] = common.write_json(out_dir / "host_overhead.json", result)
        paths["png"] = plot(result, out_dir / "host_overhead.png")
    if results_md:
        s = result["settings"]
        notes = list(result["notes"]) + [
            f"target {name}: {'met' if t['met'] else 'NOT met'}" for name, t in result["targets"].items()]
        paths["results_md"] = common.append_results_md(
            results_md, f"host-only overhead: batch {s['batch_size']}, {s['image_size']} px, {s['threads']} thread(s)",
            TABLE_COLUMNS, table_rows(result), env=result, settings=s, notes=notes)
    return paths


def print_summary(result: dict) -> None:
    s = result["settings"]
    print()
    print(f"host-only overhead: batch {s['batch_size']}, {s['image_size']} px, {s['threads']} thread(s), "
          f"{s['runs']} x {s['batches']} batches per provider on {result['device']}")
    versions = result["versions"]
    print("versions: " + ", ".join(f"{name} {versions.get(name)}" for name in ("torch", "torchvision", "timm")))
    print(text_table(TABLE_COLUMNS, table_rows(result)))
    for note in result["notes"]:
        print(f"note: {note}")
    for name, target in result["targets"].items():
        if name == "none_vs_plain":
            print(f"target: onlineaug none <= {target['max']}x plain: {'met' if target['met'] else 'NOT met'} "
                  f"({target['value']:.2f}x)")
        else:
            print(f"target: {name}: {'met' if target['met'] else 'NOT met'} ({target['ours_ms']:.3g} vs "
                  f"{target['theirs_ms']:.3g} ms)")
