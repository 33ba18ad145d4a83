#!/usr/bin/env python
"""Benchmark the batch-time mixing ops side by side: ours vs torch eager, torch.compile, kornia,
torchvision v2 and timm.

    python benchmarks/kernels.py [--device cpu|cuda] [--batch-sizes 32 64 128 256 512] [--size 224]
                                 [--quick] [--reps N] [--no-compile] [--out benchmarks/results/kernels.json]

Ops and providers (one table per run, every provider on the same inputs):

* ``concat_blend`` (DiffuseMix hybrid + fractal + normalize, uint8 in, fp32 out): ours, the torch
  reference, ``torch.compile`` of the reference.
* ``cutmix`` (Yun et al. 2019; DiffCoRe-Mix patch-wise): "ours: kernel" (``box_mix`` on pre-sampled
  parameters) and, for every provider, the whole step "sample parameters + mix images + mixed
  targets": ours, torch eager, ``torch.compile``, ``torchvision.transforms.v2.CutMix``,
  ``timm.data.Mixup`` (per batch and ``mode="elem"``), ``kornia.augmentation.RandomCutMixV2``.
* ``mixup`` (Zhang et al. 2018; DiffCoRe-Mix pixel-wise): as cutmix with ``pixel_mix``, ``v2.MixUp``,
  ``timm.data.Mixup``, ``kornia.augmentation.RandomMixUpV2``. Images are float32 for these two.
* ``composite`` (De-DA cut-and-paste, two RGBA layers, fp32 normalized out): ours, the torch
  reference (grid_sample), ``torch.compile`` of it.

Timing: median over ``--reps`` runs after warm-up; CUDA events around each run, with the L2 cache
flushed before each one; ``time.perf_counter`` on CPU. GB/s counts the bytes the op must read and
write (see ``bytes_*`` below), and on a GPU the script reports it as a % of the device's peak HBM
bandwidth from a small table (``unknown`` for devices not listed). On CPU "ours" is not timed:
Triton runs on CPU only in its interpreter, which is not a speed measure; the torch reference is
then what the library runs.

Results: a printed table, a JSON file with the device, versions, settings and date, and a block
appended to ``benchmarks/RESULTS.md`` (created with a header line when missing). Figures in
RESULTS.md come only from this script.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

from onlineaug.kernels.box_mix import box_mix, box_mix_reference, sample_boxes  # noqa: E402
from onlineaug.kernels.composite import composite, composite_reference  # noqa: E402
from onlineaug.kernels.concat_blend import (  # noqa: E402
    concat_blend_normalize,
    concat_blend_normalize_reference,
    smooth_mask_reference,
)
from onlineaug.kernels.pixel_mix import pixel_mix, pixel_mix_reference  # noqa: E402
from onlineaug.kernels.soft_labels import soft_labels, soft_labels_reference  # noqa: E402

NUM_CLASSES = 1000
NUM_FRACTALS = 16
NUM_FOREGROUNDS = 64
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# Peak HBM/DRAM bandwidth in GB/s by a substring of torch.cuda.get_device_name(); first match wins
# (so "H100 PCIe" before "H100", "A100" before "A10", "L40S" before "L4"). None = unknown.
PEAK_BANDWIDTH_GBPS = [
    ("GH200", None),
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # "NVIDIA H100 80GB HBM3" (SXM)
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100-SXM4-40GB", 1555.0),
    ("A100-PCIE-40GB", 1555.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("L40S", 864.0),
    ("L4", 300.0),
    ("V100", 900.0),
]


class Skipped(Exception):
    """A provider that cannot run here; the message is recorded as the reason."""


def peak_bandwidth(device_name: str) -> Optional[float]:
    for key, gbps in PEAK_BANDWIDTH_GBPS:
        if key in device_name:
            return gbps
    return None


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------

def time_cuda(fn: Callable[[], object], warmup: int, reps: int, flush: torch.Tensor) -> List[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush.zero_()  # evict the inputs from L2: measure HBM traffic, not cache hits
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


def time_cpu(fn: Callable[[], object], warmup: int, reps: int) -> List[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------------------------------
# cases: inputs, bytes, providers
# --------------------------------------------------------------------------------------------------

def mixed_targets(labels, partner, own_weight, num_classes, soft_labels_fn):
    return soft_labels_fn(torch.stack([labels, labels[partner]], dim=1),
                          torch.stack([own_weight, 1 - own_weight], dim=1), num_classes)


class Compiled:
    """torch.compile of a reference, built once per op; failures become a recorded skip reason."""

    def __init__(self, fn, enabled: bool):
        self.enabled = enabled
        self.fn = torch.compile(fn) if enabled else None

    def __call__(self, *args, **kwargs):
        if not self.enabled:
            raise Skipped("disabled with --no-compile")
        return self.fn(*args, **kwargs)


def case_concat_blend(b, size, dev, gen, ctx):
    shape = (b, 3, size, size)
    orig = torch.randint(0, 256, shape, generator=gen, device=dev, dtype=torch.uint8)
    generated = torch.randint(0, 256, shape, generator=gen, device=dev, dtype=torch.uint8)
    fractals = torch.randint(0, 256, (NUM_FRACTALS, 3, size, size), generator=gen, device=dev, dtype=torch.uint8)
    params = dict(
        split=torch.randint(0, 3, (b,), generator=gen, device=dev),
        flip=torch.rand(b, generator=gen, device=dev) < 0.5,
        blend_width=torch.rand(b, generator=gen, device=dev) * size / 4,
        lam=torch.where(torch.rand(b, generator=gen, device=dev) < 0.5, 0.0,
                        torch.rand(b, generator=gen, device=dev) * 0.3),
        fractal_index=torch.randint(0, NUM_FRACTALS, (b,), generator=gen, device=dev),
        mean=torch.tensor(MEAN, device=dev), std=torch.tensor(STD, device=dev),
    )
    # bytes: per pixel and channel, original where m < 1, generated where m > 0, the fractal where
    # lam != 0 (one byte each), and the fp32 output
    m = smooth_mask_reference(size, size, params["split"], params["flip"], params["blend_width"], dev)
    reads = ((m < 1).sum() + (m > 0).sum() + (params["lam"] != 0).sum() * size * size).item() * 3
    nbytes = reads + 4 * orig.numel()

    def ours():
        return concat_blend_normalize(orig, generated, fractals, **params, backend="triton")

    def eager():
        return concat_blend_normalize_reference(orig, generated, fractals, **params)

    def compiled():
        return ctx["concat_blend"](orig, generated, fractals, **params)

    return nbytes, [("ours (triton)", ours), ("torch eager (reference)", eager), ("torch.compile (reference)", compiled)]


def case_cutmix(b, size, dev, gen, ctx):
    images = torch.rand(b, 3, size, size, generator=gen, device=dev)
    labels = torch.randint(0, NUM_CLASSES, (b,), generator=gen, device=dev)
    nbytes = 2 * images.numel() * images.element_size()  # each pixel read once (own or partner), written once
    pre_partner = torch.randperm(b, generator=gen, device=dev)
    pre_boxes = sample_boxes(b, size, size, torch.rand(b, generator=gen, device=dev), generator=gen)

    def step(backend):
        partner = torch.randperm(b, generator=gen, device=dev)
        boxes = sample_boxes(b, size, size, torch.rand(b, generator=gen, device=dev), generator=gen)
        mixed, kept = box_mix(images, partner, boxes, backend=backend)
        return mixed, mixed_targets(labels, partner, kept, NUM_CLASSES, soft_labels)

    def compiled():
        partner = torch.randperm(b, generator=gen, device=dev)
        boxes = sample_boxes(b, size, size, torch.rand(b, generator=gen, device=dev), generator=gen)
        return ctx["cutmix"](images, partner, boxes, labels)

    providers = [
        ("ours: kernel only (triton)", lambda: box_mix(images, pre_partner, pre_boxes, backend="triton")),
        ("ours: sample+mix+targets (triton)", lambda: step("triton")),
        ("torch eager: sample+mix+targets", lambda: step("torch")),
        ("torch.compile: sample+mix+targets", compiled),
    ]
    providers += baselines(b, images, labels, kind="cutmix")
    return nbytes, providers


def case_mixup(b, size, dev, gen, ctx):
    images = torch.rand(b, 3, size, size, generator=gen, device=dev)
    labels = torch.randint(0, NUM_CLASSES, (b,), generator=gen, device=dev)
    nbytes = 3 * images.numel() * images.element_size()  # own + partner read, output written
    pre_partner = torch.randperm(b, generator=gen, device=dev)
    pre_lam = torch.rand(b, generator=gen, device=dev)

    def step(backend):
        partner = torch.randperm(b, generator=gen, device=dev)
        lam = torch.rand(b, generator=gen, device=dev)
        mixed = pixel_mix(images, partner, lam, backend=backend)
        return mixed, mixed_targets(labels, partner, lam, NUM_CLASSES, soft_labels)

    def compiled():
        partner = torch.randperm(b, generator=gen, device=dev)
        lam = torch.rand(b, generator=gen, device=dev)
        return ctx["mixup"](images, partner, lam, labels)

    providers = [
        ("ours: kernel only (triton)", lambda: pixel_mix(images, pre_partner, pre_lam, backend="triton")),
        ("ours: sample+mix+targets (triton)", lambda: step("triton")),
        ("torch eager: sample+mix+targets", lambda: step("torch")),
        ("torch.compile: sample+mix+targets", compiled),
    ]
    providers += baselines(b, images, labels, kind="mixup")
    return nbytes, providers


def case_composite(b, size, dev, gen, ctx):
    background = torch.randint(0, 256, (b, 3, size, size), generator=gen, device=dev, dtype=torch.uint8)
    fg_size = size // 2
    foregrounds = torch.randint(0, 256, (NUM_FOREGROUNDS, 4, fg_size, fg_size), generator=gen, device=dev,
                                dtype=torch.uint8)
    fg_index = torch.randint(-1, NUM_FOREGROUNDS, (b, 2), generator=gen, device=dev)
    scale = torch.rand(b, 2, generator=gen, device=dev) * 0.5 + 0.25
    center = torch.rand(b, 2, 2, generator=gen, device=dev) * size
    flip = torch.rand(b, 2, generator=gen, device=dev) < 0.5
    mean, std = torch.tensor(MEAN, device=dev), torch.tensor(STD, device=dev)
    # bytes: background (3 B/pixel) + fp32 output (12 B/pixel) + about 4 B (RGBA) per output pixel
    # covered by an active layer's box, clipped to the image (bilinear taps mostly hit cache)
    half = scale * size / 2
    lo = (center - half[..., None]).clamp(0, size)
    hi = (center + half[..., None]).clamp(0, size)
    box_area = ((hi - lo).prod(dim=-1) * (fg_index >= 0)).sum().item()
    nbytes = 15 * b * size * size + 4 * box_area
    args = (background, foregrounds, fg_index, scale, center, flip)

    return nbytes, [
        ("ours (triton)", lambda: composite(*args, mean=mean, std=std, backend="triton")),
        ("torch eager (reference)", lambda: composite_reference(*args, mean=mean, std=std)),
        ("torch.compile (reference)", lambda: ctx["composite"](*args, mean=mean, std=std)),
    ]


def baselines(b, images, labels, kind):
    """torchvision v2, timm and kornia equivalents (each samples its own parameters, per batch or per sample)."""
    out = []
    try:
        from torchvision.transforms import v2
        tv = v2.CutMix(num_classes=NUM_CLASSES) if kind == "cutmix" else v2.MixUp(num_classes=NUM_CLASSES)
        out.append((f"torchvision v2.{'CutMix' if kind == 'cutmix' else 'MixUp'} (per batch)",
                    lambda: tv(images, labels)))
    except Exception as exc:  # noqa: BLE001 - any import/construct failure is a skip reason
        out.append(("torchvision v2", f"{type(exc).__name__}: {exc}"))
    try:
        from timm.data import Mixup
        alphas = dict(mixup_alpha=0.0, cutmix_alpha=1.0) if kind == "cutmix" else dict(mixup_alpha=1.0, cutmix_alpha=0.0)
        for mode in ("batch", "elem"):
            mix = Mixup(**alphas, mode=mode, label_smoothing=0.0, num_classes=NUM_CLASSES)
            work = images.clone()  # timm mixes in place
            if b % 2:
                out.append((f"timm Mixup mode={mode}", "timm.data.Mixup needs an even batch size"))
            else:
                out.append((f"timm Mixup mode={mode}" + (" (per batch)" if mode == "batch" else " (per sample)"),
                            lambda mix=mix, work=work: mix(work, labels)))
    except Exception as exc:  # noqa: BLE001
        out.append(("timm Mixup", f"{type(exc).__name__}: {exc}"))
    try:
        import kornia.augmentation as KA
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "cutmix":
                aug = KA.RandomCutMixV2(data_keys=["input", "class"], use_correct_lambda=True)
            else:
                aug = KA.RandomMixUpV2(data_keys=["input", "class"])
        out.append((f"kornia {type(aug).__name__} (per sample)", lambda: aug(images, labels)))
    except Exception as exc:  # noqa: BLE001
        out.append(("kornia", f"{type(exc).__name__}: {exc}"))
    return out


def compiled_references(enabled: bool) -> Dict[str, Compiled]:
    def cutmix_ref(images, partner, boxes, labels):
        mixed, kept = box_mix_reference(images, partner, boxes)
        return mixed, mixed_targets(labels, partner, kept, NUM_CLASSES, soft_labels_reference)

    def mixup_ref(images, partner, lam, labels):
        mixed = pixel_mix_reference(images, partner, lam)
        return mixed, mixed_targets(labels, partner, lam, NUM_CLASSES, soft_labels_reference)

    return {
        "concat_blend": Compiled(concat_blend_normalize_reference, enabled),
        "cutmix": Compiled(cutmix_ref, enabled),
        "mixup": Compiled(mixup_ref, enabled),
        "composite": Compiled(composite_reference, enabled),
    }


CASES = {"concat_blend": case_concat_blend, "cutmix": case_cutmix, "mixup": case_mixup, "composite": case_composite}


# --------------------------------------------------------------------------------------------------
# environment, output
# --------------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("op", "batch", "provider", "median ms", "GB/s", "% peak", "note")


def table_rows(rows: List[dict]) -> List[tuple]:
    def pct(value):
        return value if isinstance(value, str) else ("" if value is None else f"{value:.1f}")

    return [(r["op"], str(r["batch"]), r["provider"],
             "" if r["median_s"] is None else f"{r['median_s'] * 1e3:.3f}",
             "" if r["gbps"] is None else f"{r['gbps']:.1f}", pct(r["pct_peak"]), r["note"]) for r in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="default 32 64 128 256 512; 8 32 with --quick")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--quick", action="store_true", help="small batch sizes and few repetitions (CPU check)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 50 on CUDA, 10 on CPU, 3 quick)")
    parser.add_argument("--ops", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "kernels.json")
    parser.add_argument("--results-md", default=str(common.RESULTS_MD), help='"" skips RESULTS.md')
    args = parser.parse_args(argv)

    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda but torch.cuda.is_available() is False")
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            parser.error("TRITON_INTERPRET is set: the Triton kernels would run in the interpreter; unset it to time them")
    batch_sizes = args.batch_sizes or ([8, 32] if args.quick else [32, 64, 128, 256, 512])
    reps = args.reps or (3 if args.quick else (50 if dev.type == "cuda" else 10))
    warmup = 1 if args.quick else 5  # the first call of a torch.compile provider compiles it (not timed)
    env = common.environment(dev)
    device_name = env["device"]
    peak = peak_bandwidth(device_name) if dev.type == "cuda" else None
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=dev) if dev.type == "cuda" else None
    ctx = compiled_references(enabled=not args.no_compile)
    gen = torch.Generator(device=dev).manual_seed(args.seed)

    print(f"device: {device_name} ({dev.type}); peak bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown'}")
    rows: List[dict] = []
    for op in args.ops:
        for b in batch_sizes:
            nbytes, providers = CASES[op](b, args.size, dev, gen, ctx)
            for name, fn in providers:
                row = dict(op=op, batch=b, provider=name, bytes=int(nbytes), median_s=None, gbps=None,
                           pct_peak=None, note="")
                if dev.type != "cuda" and "triton" in name:
                    row["note"] = "skipped: Triton runs on CPU only in its interpreter, not a speed measure"
                elif isinstance(fn, str):
                    row["note"] = f"skipped: {fn}"
                else:
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            times = (time_cuda(fn, warmup, reps, flush) if dev.type == "cuda"
                                     else time_cpu(fn, warmup, reps))
                        med = statistics.median(times)
                        row.update(median_s=med, gbps=nbytes / med / 1e9, times_s=times)
                        if dev.type == "cuda":
                            row["pct_peak"] = 100 * row["gbps"] / peak if peak else "unknown"
                    except Skipped as exc:
                        row["note"] = f"skipped: {exc}"
                    except Exception as exc:  # noqa: BLE001 - e.g. torch.compile failing on this machine
                        msg = " ".join(str(exc).split())[:200]
                        row["note"] = f"skipped: {type(exc).__name__}: {msg}"
                rows.append(row)
                ms = "-" if row["median_s"] is None else f"{row['median_s'] * 1e3:9.3f} ms"
                print(f"{op:>12} B={b:<4} {name:<40} {ms:>13}  {row['note']}", flush=True)

    settings = dict(device=args.device, batch_sizes=batch_sizes, size=args.size, quick=args.quick, reps=reps,
                    warmup=warmup, ops=args.ops, compile=not args.no_compile, seed=args.seed,
                    l2_flush=dev.type == "cuda")
    common.write_json(args.out, dict(environment=env, peak_bandwidth_gbps=peak, settings=settings, results=rows))
    print("\n" + common.markdown_table(TABLE_COLUMNS, table_rows(rows)))
    notes = [f"median of {reps} runs after {warmup} warm-up"
             + (", L2 flushed before each run" if dev.type == "cuda" else ""),
             f"peak bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown'}"]
    if args.results_md:
        common.append_results_md(args.results_md, f"Kernels, {device_name}", TABLE_COLUMNS, table_rows(rows),
                                 env=env, settings=settings, notes=notes)
    print(f"\nwrote {args.out}" + (f" and appended to {args.results_md}" if args.results_md else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
