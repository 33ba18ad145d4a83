"""``python -m onlineaug plan``: how many GPUs should generate for a given trainer.

The model, from two measured rates (``R_train``: images/s of one trainer GPU; ``R_gen``: images/s of one
generator GPU) and a target (``p_aug``: share of generated samples per batch; ``max_reuse``: serves per
generated sample), with ``T`` trainer GPUs and ``G`` generator GPUs:

* demand ``D = p_aug x R_train x T``: generated samples the trainers serve per second;
* needed fresh rate ``N = D / max_reuse``: with fewer fresh samples some would be served more than
  ``max_reuse`` times;
* ``G = ceil(N / R_gen)`` (the exact ratio ``N / R_gen`` is reported too); fresh rate ``F = G x R_gen``;
* GPU-hour overhead ``G / T``: extra generator GPU-hours per trainer GPU-hour;
* with ``G`` fixed by the user (``--generator-gpus``): average reuse ``min(max_reuse, D / F)`` and the generated
  share the pool can sustain, ``min(p_aug, F x max_reuse / (R_train x T))``; the rest are misses (real samples).
* what ``G`` GPUs sustain, from the same equation ``G x R_gen = p_aug x R_train x T / max_reuse`` solved for the
  other two unknowns: keep ``p_aug`` and serve each sample up to ``max_reuse = ceil(D / F)`` times, or keep
  ``max_reuse`` and lower ``p_aug`` to ``F x max_reuse / (R_train x T)``. When the computed ``G / T`` is above
  ``--max-gpu-overhead`` (default 1: more generator than trainer GPU-hours), the plan says so and prints these
  settings for fewer GPUs.

Layout (``--gpus-per-node``, ``--trainer-nodes``): the ``G`` generator GPUs fit on the trainer nodes when their
GPUs that no trainer uses, ``nodes x gpus_per_node - T``, are at least ``G`` and every rank gets its share
(``torchrun`` with ``generator_devices="auto"``); otherwise they need a Ray pool (``producers="ray"``,
``ray_actors=G``) with ``ceil((G - free) / gpus_per_node)`` more nodes, or all ``G`` on other nodes. Either
way each rank's expected fresh rate is ``F / T``.

``--measure`` measures both rates first on the devices at hand (``benchmarks/generator.py`` for ``R_gen``, the
vanilla run of ``benchmarks/overhead.py`` for ``R_train``; a source checkout is needed), ``--quick`` with their
CPU smoke settings.

Outputs go under the current directory: ``runs/plan/plan.json`` (``--out``). ``--results-md PATH`` appends the
measured plan to a ``RESULTS.md`` (the repository's ``make bench`` passes ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import numbers
import platform
import sys
from pathlib import Path

from onlineaug.tables import format_value, text_table

REPO_ROOT = Path(__file__).resolve().parents[1]
IN_CHECKOUT = (REPO_ROOT / "benchmarks").is_dir()
DEFAULT_OUT = "runs/plan/plan.json"  # relative: under the directory the command runs in
DEFAULT_TABLE_P_AUG = (0.25, 0.5, 1.0)
DEFAULT_TABLE_MAX_REUSE = (1, 4, 8, 16)
DEFAULT_MAX_GPU_OVERHEAD = 1.0  # G / T above this: more generator GPU-hours than training ones
ALTERNATIVE_GPUS_PER_TRAINER = (1, 2, 4, 8)  # the fewer-GPU settings printed when the computed G is impractical


# ------------------------------------------------------------------------------------------------ model
def _positive_rate(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of images/s, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of images/s, got {value}; measure it with --measure "
                         f"or the benchmarks in benchmarks/")
    return value


def _int_at_least(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _ceil(value: float) -> int:
    # round() first: 5.000000000001 from float division must not become 6
    return math.ceil(round(value, 9))


def plan(trainer_images_per_s: float, producer_images_per_s: float, *, p_aug: float, max_reuse: int,
         trainer_gpus: int = 1, generator_gpus: int | None = None) -> dict:
    """Generator GPUs for ``trainer_gpus`` trainers: the model in the module docstring.

    Beside the plan for ``(p_aug, max_reuse)``, the result says what its ``G`` GPUs sustain if one of the two
    gives: ``max_reuse_to_keep_p_aug = ceil(D / F)`` (the smallest that suffices; None when ``G = 0``; 1 when ``p_aug = 0``) and
    ``p_aug_at_max_reuse = min(p_aug, F x max_reuse / (R_train x T))`` (the sustained ``generated_share``).

    Args:
        trainer_images_per_s: images/s one trainer GPU consumes (``R_train``).
        producer_images_per_s: images/s one generator GPU produces (``R_gen``).
        p_aug: share of generated samples per batch, in [0, 1].
        max_reuse: serves allowed per generated sample (>= 1).
        trainer_gpus: trainer GPUs (``T``).
        generator_gpus: fix ``G`` instead of computing it; the result then says what that sustains.
    """
    r_train = _positive_rate("trainer_images_per_s", trainer_images_per_s)
    r_gen = _positive_rate("producer_images_per_s", producer_images_per_s)
    if isinstance(p_aug, bool) or not isinstance(p_aug, numbers.Real) or not 0 <= p_aug <= 1:
        raise ValueError(f"p_aug must be a probability in [0, 1], got {p_aug!r}")
    max_reuse = _int_at_least("max_reuse", max_reuse, 1)
    trainers = _int_at_least("trainer_gpus", trainer_gpus, 1)
    consumed = r_train * trainers  # images/s all trainers take in
    demand = p_aug * consumed  # generated samples served per second
    needed = demand / max_reuse  # fresh samples per second
    exact = needed / r_gen
    if generator_gpus is None:
        gpus = _ceil(exact)
        given = False
    else:
        gpus = _int_at_least("generator_gpus", generator_gpus, 0)
        given = True
    fresh = gpus * r_gen
    sustained_share = min(float(p_aug), fresh * max_reuse / consumed)
    if demand == 0:
        reuse = 0.0
    elif fresh == 0:
        reuse = None  # nothing is generated: every wanted sample is a miss
    else:
        reuse = min(float(max_reuse), demand / fresh)
    if demand == 0:
        reuse_to_keep = 1
    elif fresh == 0:
        reuse_to_keep = None  # no serve count makes zero fresh samples enough
    else:
        reuse_to_keep = max(1, _ceil(demand / fresh))
    return {
        "trainer_images_per_s": r_train,
        "producer_images_per_s": r_gen,
        "p_aug": float(p_aug),
        "max_reuse": max_reuse,
        "trainer_gpus": trainers,
        "demand_images_per_s": demand,
        "needed_fresh_images_per_s": needed,
        "generator_gpus_exact": exact,
        "generator_gpus": gpus,
        "generator_gpus_given": given,
        "generator_per_trainer_gpu": gpus / trainers,
        "ratio": f"{gpus}:{trainers}",
        "fresh_images_per_s": fresh,
        "fresh_share_of_needed": fresh / needed if needed else None,
        "average_reuse": reuse,
        "generated_share": sustained_share,
        "miss_share": float(p_aug) - sustained_share,
        "max_reuse_to_keep_p_aug": reuse_to_keep,
        "p_aug_at_max_reuse": sustained_share,
        "gpu_hour_overhead": gpus / trainers,
        "total_gpu_hours_per_trainer_gpu_hour": 1 + gpus / trainers,
        "sufficient": sustained_share >= float(p_aug) - 1e-12,
    }


def alternatives(result: dict, *, max_gpu_overhead: float = DEFAULT_MAX_GPU_OVERHEAD,
                 gpus_per_trainer=ALTERNATIVE_GPUS_PER_TRAINER) -> list[dict]:
    """What fewer generator GPUs sustain, when ``result`` (a computed plan) needs an impractical number.

    Empty when the plan's ``G / T`` is at most ``max_gpu_overhead`` or ``G`` was given. Otherwise one
    :func:`plan` per candidate ``G``: ``k x T`` for each ``k`` in ``gpus_per_trainer`` and
    ``floor(max_gpu_overhead x T)``, each below the computed ``G``; read ``max_reuse_to_keep_p_aug`` and
    ``p_aug_at_max_reuse`` from each.
    """
    if result["generator_gpus_given"] or result["gpu_hour_overhead"] <= max_gpu_overhead:
        return []
    trainers = result["trainer_gpus"]
    candidates = {k * trainers for k in gpus_per_trainer} | {math.floor(max_gpu_overhead * trainers)}
    return [plan(result["trainer_images_per_s"], result["producer_images_per_s"], p_aug=result["p_aug"],
                 max_reuse=result["max_reuse"], trainer_gpus=trainers, generator_gpus=g)
            for g in sorted(candidates) if 1 <= g < result["generator_gpus"]]


def layout(result: dict, *, gpus_per_node: int, trainer_nodes: int = 1) -> dict:
    """Where the plan's ``G`` generator GPUs go: on the trainer nodes (local producers) or in a Ray pool.

    ``T`` trainer GPUs are spread evenly over ``trainer_nodes`` nodes of ``gpus_per_node`` GPUs; the free ones,
    ``trainer_nodes x gpus_per_node - T``, take the generators when there are at least ``G`` of them (then
    ``generator_devices="auto"`` deals them, every local rank at least one). Otherwise the plan needs a Ray pool
    of ``G`` actors: ``extra_nodes = ceil((G - free) / gpus_per_node)`` more nodes when the trainer nodes join the
    Ray cluster with their free GPUs.
    """
    nodes = _int_at_least("trainer_nodes", trainer_nodes, 1)
    per_node = _int_at_least("gpus_per_node", gpus_per_node, 1)
    trainers, gpus = result["trainer_gpus"], result["generator_gpus"]
    if trainers > nodes * per_node:
        raise ValueError(f"{trainers} trainer GPUs do not fit on {nodes} node(s) of {per_node} GPUs; raise "
                         f"--trainer-nodes or --gpus-per-node")
    ranks_per_node = -(-trainers // nodes)
    free = nodes * per_node - trainers
    free_per_rank = (per_node - ranks_per_node) // ranks_per_node  # what "auto" deals each local rank, at least
    local = gpus == 0 or (gpus <= free and free_per_rank >= 1)
    extra = 0 if local else -(-(gpus - free) // per_node)
    return {"trainer_nodes": nodes, "gpus_per_node": per_node, "trainer_ranks_per_node": ranks_per_node,
            "free_gpus_on_trainer_nodes": free, "generator_gpus": gpus,
            "producers": "local" if local else "ray", "extra_nodes": extra,
            "fresh_images_per_s_per_rank": result["fresh_images_per_s"] / trainers}


def format_layout(where: dict) -> str:
    """The recommended layout, with the commands' shape."""
    w = where
    fresh = format_value(w["fresh_images_per_s_per_rank"])
    head = (f"layout: {w['generator_gpus']} generator GPU(s); trainer node(s): {w['trainer_nodes']} x "
            f"{w['gpus_per_node']} GPUs, {w['trainer_ranks_per_node']} trainer rank(s) each, "
            f"{w['free_gpus_on_trainer_nodes']} GPU(s) free")
    if w["generator_gpus"] == 0:
        return f"{head}\n  no generator GPU needed"
    if w["producers"] == "local":
        return "\n".join([head, f"  fits on the trainer node(s): torchrun "
                          + (f"--nnodes={w['trainer_nodes']} " if w["trainer_nodes"] > 1 else "")
                          + f"--nproc_per_node={w['trainer_ranks_per_node']} with generator_devices=\"auto\" (local producers)",
                          f"  expected fresh rate per rank: {fresh} images/s"])
    return "\n".join([head, f"  does not fit on the trainer node(s): a Ray pool of {w['generator_gpus']} actors "
                      f"(producers=\"ray\", ray_actors={w['generator_gpus']}), {w['extra_nodes']} more node(s) of "
                      f"{w['gpus_per_node']} GPUs joined to the Ray cluster with the trainer nodes' free GPUs",
                      f"  expected fresh rate per rank: {fresh} images/s"])


def plan_table(trainer_images_per_s: float, producer_images_per_s: float, *, trainer_gpus: int = 1,
               p_augs=DEFAULT_TABLE_P_AUG, max_reuses=DEFAULT_TABLE_MAX_REUSE) -> list[dict]:
    """:func:`plan` over every (p_aug, max_reuse) pair."""
    return [plan(trainer_images_per_s, producer_images_per_s, p_aug=p, max_reuse=m, trainer_gpus=trainer_gpus)
            for p in p_augs for m in max_reuses]


# ------------------------------------------------------------------------------------------------- text
TABLE_COLUMNS = ("p_aug", "max_reuse", "needed fresh img/s", "exact G", "G", "G:T", "fresh img/s", "avg reuse",
                 "generated share", "GPU-h overhead")


def table_rows(rows: list[dict]) -> list[list]:
    return [[r["p_aug"], r["max_reuse"], r["needed_fresh_images_per_s"], r["generator_gpus_exact"],
             r["generator_gpus"], r["ratio"], r["fresh_images_per_s"], r["average_reuse"],
             f"{r['generated_share'] * 100:.1f}%", f"{r['gpu_hour_overhead'] * 100:.0f}%"] for r in rows]


def format_sustains(result: dict) -> str:
    """What ``G`` generator GPUs sustain if ``p_aug`` or ``max_reuse`` gives (two lines, with the formulas)."""
    r = result
    if r["max_reuse_to_keep_p_aug"] is None:
        return "  no generator GPU: nothing is generated, every sample is real"
    fresh, consumed = format_value(r["fresh_images_per_s"]), format_value(r["trainer_images_per_s"] * r["trainer_gpus"])
    rows = [(f"keep p_aug = {r['p_aug']:g}:", f"max_reuse = {r['max_reuse_to_keep_p_aug']}",
             f"ceil(demand / fresh) = ceil({format_value(r['demand_images_per_s'])} / {fresh})"),
            (f"keep max_reuse = {r['max_reuse']}:", f"p_aug = {r['p_aug_at_max_reuse']:.3g}",
             f"fresh x max_reuse / (R_train x T) = {fresh} x {r['max_reuse']} / {consumed}")]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"  {a:<{widths[0]}} {b:<{widths[1]}}  ({c})" for a, b, c in rows)


ALTERNATIVE_COLUMNS = ("G", "G:T", "fresh img/s", "max_reuse to keep p_aug", "p_aug at max_reuse", "GPU-h overhead")


def alternative_rows(rows: list[dict]) -> list[list]:
    return [[r["generator_gpus"], r["ratio"], r["fresh_images_per_s"], r["max_reuse_to_keep_p_aug"],
             f"{r['p_aug_at_max_reuse']:.3g}", f"{r['gpu_hour_overhead'] * 100:.0f}%"] for r in rows]


def format_advice(result: dict, fewer: list[dict], max_gpu_overhead: float) -> str:
    """What to do when the plan is not sustained (``G`` given) or needs too many GPUs (``G`` computed)."""
    r = result
    if r["generator_gpus_given"]:
        if r["sufficient"]:
            return ""
        return "\n".join([
            f"{r['generator_gpus']} generator GPU(s) ({format_value(r['fresh_images_per_s'])} fresh images/s) do not "
            f"sustain p_aug = {r['p_aug']:g} at max_reuse = {r['max_reuse']}. What they sustain:",
            format_sustains(r),
            "Set either on the loader (p_aug=, max_reuse=), or add generator GPUs."])
    if not fewer:
        return ""
    return "\n".join([
        f"impractical: {r['generator_gpus']} generator GPUs for {r['trainer_gpus']} trainer GPU(s) is a "
        f"{r['gpu_hour_overhead'] * 100:.0f}% GPU-hour overhead (above --max-gpu-overhead "
        f"{max_gpu_overhead * 100:.0f}%).",
        f"What fewer generator GPUs sustain: p_aug = {r['p_aug']:g} with a higher max_reuse, or max_reuse = "
        f"{r['max_reuse']} with a lower p_aug (pass --generator-gpus N for the GPUs at hand):",
        text_table(ALTERNATIVE_COLUMNS, alternative_rows(fewer))])


def format_plan(result: dict) -> str:
    r = result
    lines = [
        f"trainer: {r['trainer_gpus']} GPU(s) at {format_value(r['trainer_images_per_s'])} images/s each; "
        f"producer: {format_value(r['producer_images_per_s'])} images/s per generator GPU",
        f"target: p_aug = {r['p_aug']:g} generated per batch, each generated sample served at most "
        f"{r['max_reuse']} times",
        f"  demand       = p_aug x R_train x T          = {format_value(r['demand_images_per_s'])} generated serves/s",
        f"  needed fresh = demand / max_reuse           = {format_value(r['needed_fresh_images_per_s'])} images/s",
        f"  generator GPUs = needed / R_gen             = {r['generator_gpus_exact']:.3g} -> "
        f"{'G = ' + str(r['generator_gpus']) + (' (given)' if r['generator_gpus_given'] else ' (ceil)')}",
        f"  fresh rate   = G x R_gen                    = {format_value(r['fresh_images_per_s'])} images/s",
        f"  average reuse                               = {format_value(r['average_reuse'])} (max {r['max_reuse']})",
        f"  generated share sustained                   = {r['generated_share'] * 100:.1f}% "
        f"(misses {r['miss_share'] * 100:.1f}% of samples)",
        f"  generator:trainer GPUs = {r['ratio']}; GPU-hour overhead = G / T = {r['gpu_hour_overhead'] * 100:.0f}% "
        f"(total {r['total_gpu_hours_per_trainer_gpu_hour']:.3g} GPU-h per trainer GPU-h)",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``plan`` options (every help names its default: ``onlineaug.__main__`` appends the ones left out)."""
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--trainer-images-per-s", type=float, default=None, metavar="R_TRAIN",
                        help="images/s one trainer GPU consumes (default: measured with --measure; required without)")
    parser.add_argument("--producer-images-per-s", type=float, default=None, metavar="R_GEN",
                        help="images/s one generator GPU produces (default: measured with --measure; required "
                             "without)")
    parser.add_argument("--p-aug", type=float, default=0.5, help="share of generated samples per batch, in [0, 1]")
    parser.add_argument("--max-reuse", type=int, default=8, help="serves allowed per generated sample (>= 1)")
    parser.add_argument("--trainer-gpus", type=int, default=1, metavar="T", help="trainer GPUs")
    parser.add_argument("--generator-gpus", type=int, default=None, metavar="G",
                        help="the generator GPUs at hand: the plan then says what they sustain (the max_reuse that "
                             "keeps --p-aug, the p_aug that --max-reuse allows) (default: computed, "
                             "ceil(needed / R_gen))")
    parser.add_argument("--gpus-per-node", type=int, default=8, metavar="P",
                        help="GPUs per node, for the layout: do the generator GPUs fit on the trainer nodes or need a "
                             "Ray pool")
    parser.add_argument("--trainer-nodes", type=int, default=1, metavar="N",
                        help="nodes the trainer GPUs are spread over (the layout)")
    parser.add_argument("--max-gpu-overhead", type=float, default=DEFAULT_MAX_GPU_OVERHEAD, metavar="G/T",
                        help="a computed G / T above this is called impractical and the plan prints what fewer GPUs "
                             "sustain")
    parser.add_argument("--table-p-aug", type=float, nargs="+", default=list(DEFAULT_TABLE_P_AUG), metavar="P",
                        help="p_aug values of the table over other targets")
    parser.add_argument("--table-max-reuse", type=int, nargs="+", default=list(DEFAULT_TABLE_MAX_REUSE), metavar="M",
                        help="max_reuse values of the table over other targets")
    parser.add_argument("--measure", action="store_true",
                        help="measure both rates first (benchmarks/generator.py and benchmarks/overhead.py; needs a "
                             "source checkout)")
    parser.add_argument("--quick", action="store_true", help="with --measure: the benchmarks' CPU smoke settings")
    parser.add_argument("--device", default=None,
                        help="with --measure: the trainer's device (default: cuda:0 if available, else cpu)")
    parser.add_argument("--generator-device", default=None,
                        help="with --measure: the generator's device (default: cuda:1 with 2+ GPUs, else the "
                             "trainer's)")
    parser.add_argument("--generator", default=None,
                        help="with --measure: the generator benchmark's weights (default: its own, full-random on "
                             "CUDA, tiny on CPU)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="PATH",
                        help='JSON file to write, relative to the current directory ("" to skip)')
    parser.add_argument("--results-md", default=None, metavar="PATH",
                        help="with --measure: a RESULTS.md to append the measured plan to (default: none; make bench "
                             "passes benchmarks/RESULTS.md)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars while measuring")


def _checked_overhead(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"max_gpu_overhead must be a positive number (generator GPUs per trainer GPU), got {value!r}")
    return float(value)


def _benchmark_module(name: str):
    """``benchmarks.<name>`` from the source checkout (the benchmarks are not part of the installed package)."""
    if not (REPO_ROOT / "benchmarks" / f"{name}.py").is_file():
        raise RuntimeError(f"--measure runs benchmarks/{name}.py, which needs a source checkout of onlineaug "
                           f"(benchmarks/ beside onlineaug/); or pass --trainer-images-per-s and "
                           f"--producer-images-per-s measured elsewhere")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # spawned DataLoader workers and producers inherit sys.path
    return importlib.import_module(f"benchmarks.{name}")


def _measure_devices(args) -> tuple[str, str]:
    import torch

    if args.device is not None:
        trainer = args.device
    else:
        trainer = "cuda:0" if torch.cuda.is_available() else "cpu"
    if args.generator_device is not None:
        return trainer, args.generator_device
    if trainer.startswith("cuda") and torch.cuda.device_count() > 1:
        index = torch.device(trainer).index or 0
        return trainer, f"cuda:{1 if index == 0 else 0}"
    return trainer, trainer


def measure(args: argparse.Namespace) -> dict:
    """Run the generator and overhead benchmarks here; return both rates and the two results."""
    generator_bench = _benchmark_module("generator")
    overhead_bench = _benchmark_module("overhead")
    trainer_device, generator_device = _measure_devices(args)
    progress = not args.no_progress
    quick = ["--quick"] if args.quick else []

    argv = [*quick, "--device", generator_device]
    if args.generator:
        argv += ["--generator", args.generator]
    generated = generator_bench.benchmark(generator_bench.build_parser().parse_args(argv), progress=progress)
    # The trainer's rate: the vanilla run (an upper bound of what an augmented trainer consumes); the GenMix run
    # beside it shows the loader keeping up with the pool.
    argv = [*quick, "--device", trainer_device, "--generator-device", generator_device, "--recipes", "genmix",
            "--baselines", "--no-repeat-vanilla", "--p-aug", str(args.p_aug), "--max-reuse", str(args.max_reuse)]
    trained = overhead_bench.benchmark(overhead_bench.build_parser().parse_args(argv), progress=progress)
    return {
        "trainer_images_per_s": trained["vanilla_images_per_s"],
        "producer_images_per_s": generated["images_per_s"],
        "trainer_device": trainer_device,
        "generator_device": generator_device,
        "generator": generated,
        "overhead": trained,
    }


def _environment(*devices) -> dict:
    try:
        common = _benchmark_module("common")
    except (RuntimeError, ImportError):
        common = None
    if common is not None:
        return common.environment(*devices) if devices else common.environment()
    import torch

    import onlineaug

    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "onlineaug": onlineaug.__version__}}


def _write_json(path, data: dict) -> Path:
    if IN_CHECKOUT:
        return _benchmark_module("common").write_json(path, data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def run_plan(args: argparse.Namespace) -> dict:
    """The ``plan`` command: (measure,) plan, print, write JSON (and a RESULTS.md block after measuring)."""
    measured = None
    trainer_rate, producer_rate = args.trainer_images_per_s, args.producer_images_per_s
    if args.measure:
        measured = measure(args)
        trainer_rate = trainer_rate or measured["trainer_images_per_s"]
        producer_rate = producer_rate or measured["producer_images_per_s"]
    elif args.quick:
        raise SystemExit("plan: --quick only applies with --measure")
    if trainer_rate is None or producer_rate is None:
        raise SystemExit("plan: give --trainer-images-per-s and --producer-images-per-s (images/s of one trainer GPU "
                         "and of one generator GPU), or --measure to measure them on this machine")
    try:
        result = plan(trainer_rate, producer_rate, p_aug=args.p_aug, max_reuse=args.max_reuse,
                      trainer_gpus=args.trainer_gpus, generator_gpus=args.generator_gpus)
        table = plan_table(trainer_rate, producer_rate, trainer_gpus=args.trainer_gpus, p_augs=args.table_p_aug,
                           max_reuses=args.table_max_reuse)
        max_gpu_overhead = _checked_overhead(args.max_gpu_overhead)
        fewer = alternatives(result, max_gpu_overhead=max_gpu_overhead)
        where = layout(result, gpus_per_node=args.gpus_per_node, trainer_nodes=args.trainer_nodes)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"plan: {error}") from None

    settings = {key: value for key, value in vars(args).items() if key not in ("command",)}
    devices = (measured["trainer_device"], measured["generator_device"]) if measured else ()
    output = {"benchmark": "plan", **_environment(*devices), "settings": settings, "plan": result, "table": table,
              "fewer_generator_gpus": fewer, "layout": where}
    if measured:
        output["measured"] = {
            "trainer_images_per_s": measured["trainer_images_per_s"], "trainer_device": measured["trainer_device"],
            "producer_images_per_s": measured["producer_images_per_s"],
            "generator_device": measured["generator_device"],
            "generator": measured["generator"], "overhead": measured["overhead"]}

    print()
    if measured:
        g, o = measured["generator"], measured["overhead"]
        gs, os_ = g["settings"], o["settings"]
        print(f"measured producer: {measured['producer_images_per_s']:.3g} images/s on {g['device']} "
              f"({g['weights']['label']}; {gs['task']}, {gs['size']} px, {gs['steps']} steps, batch "
              f"{g['best']['batch_size']})")
        print(f"measured trainer:  {measured['trainer_images_per_s']:.3g} images/s on {o['device']} "
              f"({os_['model']}, batch {os_['batch_size']}, {os_['image_size']} px, vanilla)")
        genmix = o["A_O"].get("onlineaug genmix")
        if genmix is not None:
            print(f"online GenMix on that trainer: A_O {genmix * 100:+.1f}%")
    print(format_plan(result))
    print(format_layout(where))
    advice = format_advice(result, fewer, max_gpu_overhead)
    if advice:
        print()
        print(advice)
    print()
    print(f"for other targets ({args.trainer_gpus} trainer GPU(s)):")
    print(text_table(TABLE_COLUMNS, table_rows(table)))

    if args.out:
        print(f"wrote {_write_json(args.out, output)}")
    if measured and args.results_md:
        common = _benchmark_module("common")
        columns = ("trainer img/s", "producer img/s", "p_aug", "max_reuse", "T", "exact G", "G", "fresh img/s",
                   "avg reuse", "generated share", "GPU-h overhead")
        row = [result["trainer_images_per_s"], result["producer_images_per_s"], result["p_aug"], result["max_reuse"],
               result["trainer_gpus"], result["generator_gpus_exact"], result["generator_gpus"],
               result["fresh_images_per_s"], result["average_reuse"], common.format_percent(result["generated_share"]),
               common.format_percent(result["gpu_hour_overhead"])]
        g = measured["generator"]
        notes = [f"producer rate: {g['weights']['label']}, {g['settings']['task']} {g['settings']['size']} px "
                 f"{g['settings']['steps']} steps on {measured['generator_device']}",
                 f"trainer rate: vanilla {measured['overhead']['settings']['model']} on {measured['trainer_device']}"]
        path = common.append_results_md(args.results_md, "plan (measured here)", columns, [row], env=output,
                                        settings={k: settings[k] for k in ("p_aug", "max_reuse", "trainer_gpus",
                                                                           "generator_gpus", "quick")},
                                        notes=notes)
        print(f"appended to {path}")
    return output
