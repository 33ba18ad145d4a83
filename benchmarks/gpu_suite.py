"""Every GPU figure of the project from one command, inside about 8 minutes on one H100/H200: ``make bench-gpu``.

In order, each step a subprocess with its own time budget (a step past its budget is stopped and the suite goes
on), every JSON, PNG and ``RESULTS.md`` block written into one folder (``--out``, default ``$OUT`` if set, else
``runs/bench-gpu``):

1. ``preflight``: the device, the versions, the packages the steps import (installs the wheels carried in
   ``.whl/`` into ``/tmp/site`` first when diffusers or kornia is missing: ``../shared/tools/device-wheels.sh``);
2. ``kernels``: the batch-time kernels at B=256, 224 px: GB/s and % of the HBM peak, against eager torch and
   ``torch.compile`` (``benchmarks/kernels.py``);
3. ``producer-ip2p``: the producer loop of GenMix (InstructPix2Pix, 512 px, 20 steps, ``full-random`` SD 1.5
   weights) at two batch sizes under fp16 + ``torch.compile``, against the papers' one-image diffusers call, with
   UNet MFU and the per-stage split (``benchmarks/producer_loop.py``);
4. ``producer-img2img``: the same for Diff-Mix (SD 1.5 img2img, 512 px, 20 steps, one strength 0.7 so one shape
   per batch size);
5. ``trainer``: ResNet-50, batch 256, 224 px, AMP, channels-last: vanilla vs online GenMix from a pool pre-filled
   by a producer on the same GPU, the library's CutMix, torchvision CutMix and timm Mixup; A_O
   (``benchmarks/overhead.py``; the tiny generator keeps the pool full: what the trainer pays to serve it);
6. ``single-gpu`` (opt-in, ``--steps single-gpu``, 120 s): the one-GPU case, the trainer next to a full-random
   GenMix producer on the same GPU: both rates and A_O under contention.

``--dry-run`` (``make bench-gpu-dry``, or ``make bench-gpu DRY_RUN=1``) prints the GPU plan with each step's
budget, then runs the same steps, through the same subprocess path, on the CPU with tiny settings (a couple of
minutes on 2 cores), so every code path the GPU run takes has run before a GPU is at hand. ``--plan`` only prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TOTAL_BUDGET_S = 480  # what the GPU suite may take, all steps together (one `run` call allows 600 s)
WHEEL_DIR = REPO_ROOT / ".whl"
WHEEL_TARGET = "/tmp/site"
# distribution name -> module name of what the steps import
NEEDED = {"torch": "torch", "triton": "triton", "diffusers": "diffusers", "transformers": "transformers",
          "kornia": "kornia", "timm": "timm", "torchvision": "torchvision", "numpy": "numpy", "pillow": "PIL",
          "matplotlib": "matplotlib"}

@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    what: str
    script: str  # under benchmarks/, or "-c" for inline code
    gpu_args: tuple[str, ...]
    dry_args: tuple[str, ...]
    budget_s: int  # on the GPU: the step is stopped past it
    inner_budget: bool = False  # the script takes --budget-s (it then stops timing early and still reports)
    optional: bool = False  # run only when named in --steps (not part of the 8-minute default)


PREFLIGHT = (  # versions without importing the heavy packages (find_spec + metadata); then torch and the device
    "import importlib.metadata as md, importlib.util as u, json, sys, torch\n"
    "def version(dist, module):\n"
    "    if u.find_spec(module) is None: return None\n"
    "    try: return md.version(dist)\n"
    "    except md.PackageNotFoundError: return 'present'\n"
    f"mods = {{d: version(d, m) for d, m in {NEEDED!r}.items()}}\n"
    "dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'\n"
    "print(json.dumps({'device': dev, 'cuda': torch.version.cuda, 'modules': mods, 'python': sys.version}))"
)

STEPS = (
    Step("preflight", "device, versions, packages", "-c", (PREFLIGHT,), (PREFLIGHT,), 20),
    Step("kernels", "batch-time kernels at B=256, 224 px: GB/s, % of HBM peak vs eager and torch.compile",
         "kernels.py", ("--device", "cuda", "--batch-sizes", "256", "--size", "224", "--reps", "20"),
         ("--device", "cpu", "--batch-sizes", "2", "--size", "32", "--reps", "1", "--no-compile",
          "--ops", "concat_blend", "cutmix"), 80),
    Step("producer-ip2p", "GenMix producer loop (InstructPix2Pix 512 px, 20 steps, full-random, fp16 + compile), "
         "batch 8 and 16 vs the papers' diffusers call; UNet MFU; stages",
         "producer_loop.py", ("--device", "cuda", "--recipe", "genmix", "--generator", "full-random", "--size", "512",
                              "--steps", "20", "--batch-sizes", "8", "16", "--dtype", "fp16", "--compile",
                              "--compile-mode", "default", "--baseline-images", "3", "--repeats", "2"),
         ("--quick", "--device", "cpu", "--recipe", "genmix", "--no-compile", "--batch-sizes", "2",
          "--baseline-images", "1", "--repeats", "1"), 170, inner_budget=True),
    Step("producer-img2img", "Diff-Mix producer loop (SD 1.5 img2img 512 px, 20 steps, strength 0.7, full-random, "
         "fp16 + compile), batch 8 and 16 vs the papers' diffusers call",
         "producer_loop.py", ("--device", "cuda", "--recipe", "diffmix", "--recipe-options", '{"strengths": [0.7]}',
                              "--generator", "full-random", "--size", "512", "--steps", "20", "--batch-sizes", "8",
                              "16", "--dtype", "fp16", "--compile", "--compile-mode", "default",
                              "--baseline-images", "3", "--repeats", "2"),
         ("--quick", "--device", "cpu", "--recipe", "diffmix", "--recipe-options", '{"strengths": [0.7]}',
          "--no-compile", "--batch-sizes", "2", "--baseline-images", "1", "--repeats", "1"), 130, inner_budget=True),
    Step("trainer", "ResNet-50 b256 224 px AMP: vanilla vs GenMix (pool pre-filled by a producer on the same GPU), "
         "CutMix, torchvision CutMix, timm Mixup; A_O",
         "overhead.py", ("--device", "cuda", "--model", "resnet50", "--batch-size", "256", "--image-size", "224",
                         "--amp", "--steps", "50", "--warmup-steps", "10", "--recipes", "genmix", "cutmix",
                         "--baselines", "tv-cutmix", "timm-mixup", "--generator", "tiny", "--pool-size", "256",
                         "--warmup", "256"),
         ("--quick", "--device", "cpu", "--steps", "2", "--warmup-steps", "1", "--recipes", "genmix", "cutmix",
          "--baselines", "tv-cutmix", "--no-repeat-vanilla", "--pool-size", "16", "--warmup", "4"), 80),
    Step("single-gpu", "opt-in: one GPU for both: ResNet-50 trainer next to a full-random GenMix producer (512 px, "
         "20 steps) on the same GPU; trainer rate, A_O and the producer's rate under contention",
         "overhead.py", ("--device", "cuda", "--model", "resnet50", "--batch-size", "256", "--image-size", "224",
                         "--amp", "--steps", "50", "--warmup-steps", "10", "--recipes", "genmix", "--baselines",
                         "--generator", "full-random", "--num-inference-steps", "20", "--generator-batch-size", "8",
                         "--pool-size", "64", "--warmup", "16"),
         ("--quick", "--device", "cpu", "--steps", "2", "--warmup-steps", "1", "--recipes", "genmix", "--baselines",
          "--no-repeat-vanilla", "--pool-size", "16", "--warmup", "4"), 120, optional=True),
)


def step_command(step: Step, *, dry_run: bool, out: Path, python: str) -> list[str]:
    """The command line of ``step``: the GPU or the dry-run arguments, with its outputs under ``out``."""
    args = list(step.dry_args if dry_run else step.gpu_args)
    if step.script == "-c":
        return [python, "-c", *args]
    command = [python, str(REPO_ROOT / "benchmarks" / step.script), *args]
    if step.script == "kernels.py":
        command += ["--out", str(out / step.name / "kernels.json")]
    else:
        command += ["--out", str(out / step.name)]
    command += ["--results-md", str(out / "RESULTS.md")]
    if step.inner_budget and not dry_run:
        command += ["--budget-s", str(max(10, step.budget_s - 45))]  # time to report after timing stops
    return command


def child_environment(*, dry_run: bool, extra_path: str | None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [p for p in (extra_path, str(REPO_ROOT), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # Triton on the CPU runs in its interpreter
    else:
        env.pop("TRITON_INTERPRET", None)  # kernels.py refuses to time the interpreter
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def install_wheels(python: str, log) -> str | None:
    """Install the carried wheels (``.whl/``, from ``device-wheels.sh``) into /tmp/site when diffusers or kornia
    is missing; return the folder to put on PYTHONPATH (None if nothing was needed or carried)."""
    missing = [m for m in ("diffusers", "kornia") if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    wheels = sorted(glob.glob(str(WHEEL_DIR / "*.whl")))
    if not wheels:
        log(f"preflight: {', '.join(missing)} missing and no wheels in {WHEEL_DIR}: run ../shared/tools/"
            f"device-wheels.sh here and carry .whl to the GPU machine")
        return None
    command = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--upgrade", "--target", WHEEL_TARGET, *wheels]
    log(f"preflight: installing {len(wheels)} carried wheels into {WHEEL_TARGET} ({', '.join(missing)} missing)")
    subprocess.run(command, check=True)
    sys.path.insert(0, WHEEL_TARGET)  # this process's summary reads their versions too
    importlib.invalidate_caches()
    return WHEEL_TARGET


def print_plan(out: Path, *, dry_run: bool, python: str, log=print) -> None:
    log(f"GPU plan (one H100/H200, {TOTAL_BUDGET_S} s in all; each step is stopped past its budget):")
    total = 0
    for step in STEPS:
        total += 0 if step.optional else step.budget_s
        log(f"  {step.name:<17} budget {step.budget_s:>3} s  {step.what}")
        if step.script != "-c":
            log(f"      {shlex.join(step_command(step, dry_run=False, out=out, python=python))}")
    log(f"  total budget {total} s without the opt-in steps (--steps NAME ... runs them); outputs in {out}")
    if dry_run:
        log("dry run: the same steps on the CPU with tiny settings (figures are not GPU figures)")


def run_step(step: Step, command: list[str], *, env: dict, out: Path, timeout: float | None, log) -> dict:
    log_path = out / f"{step.name}.log"
    start = time.monotonic()
    status, returncode = "ok", None
    with open(log_path, "w", encoding="utf-8") as handle:
        handle.write("$ " + shlex.join(command) + "\n")
        handle.flush()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 15)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
            status = "timed out"
    seconds = time.monotonic() - start
    tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-12:]
    log(f"  {step.name}: {status} in {seconds:.0f} s" + ("" if status == "ok" else "; last lines:\n    " +
                                                          "\n    ".join(tail)))
    return {"step": step.name, "status": status, "returncode": returncode, "seconds": seconds,
            "budget_s": step.budget_s, "log": str(log_path), "command": command}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny settings")
    parser.add_argument("--plan", action="store_true", help="print the plan and exit")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else runs/bench-gpu)")
    parser.add_argument("--steps", nargs="+", choices=[s.name for s in STEPS], default=None,
                        help="run only these steps (default: all but the opt-in single-gpu)")
    args = parser.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or REPO_ROOT / "runs" / ("bench-gpu-dry" if args.dry_run
                                                                          else "bench-gpu")).resolve()
    python = sys.executable
    print_plan(out, dry_run=args.dry_run, python=python)
    if args.plan:
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device here: `make bench-gpu DRY_RUN=1` (--dry-run) runs the same steps on the CPU",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    extra = install_wheels(python, print) if not args.dry_run else None
    env = child_environment(dry_run=args.dry_run, extra_path=extra)
    chosen = [s for s in STEPS if (s.name in args.steps if args.steps else not s.optional)]
    start = time.monotonic()
    results = []
    for step in chosen:
        command = step_command(step, dry_run=args.dry_run, out=out, python=python)
        remaining = TOTAL_BUDGET_S - (time.monotonic() - start)
        if not args.dry_run and remaining < 15:
            results.append({"step": step.name, "status": "skipped: suite budget spent", "seconds": 0,
                            "budget_s": step.budget_s, "command": command})
            print(f"  {step.name}: skipped (suite budget spent)")
            continue
        # a step may use its budget plus what the steps before it left unused, never the later steps' budgets
        later = sum(s.budget_s for s in chosen[chosen.index(step) + 1:])
        timeout = None if args.dry_run else max(min(step.budget_s, remaining), remaining - later)
        results.append(run_step(step, command, env=env, out=out, timeout=timeout, log=print))
        if step.name == "preflight" and results[-1]["status"] == "ok":
            lines = Path(results[-1]["log"]).read_text(encoding="utf-8").splitlines()
            results[-1]["found"] = json.loads(lines[-1])
            missing = [m for m, v in results[-1]["found"]["modules"].items() if v is None]
            if missing:
                print(f"  preflight: missing modules {missing}: the steps importing them will fail")
    total = time.monotonic() - start
    summary = write_summary(out, results, total=total, dry_run=args.dry_run)
    print(f"suite: {sum(r['status'] == 'ok' for r in results)}/{len(results)} steps ok in {total:.0f} s; "
          f"wrote {summary}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


def write_summary(out: Path, results: list[dict], *, total: float, dry_run: bool) -> Path:
    """``suite.json`` and a ``RESULTS.md`` block: device, versions, each step's status, time and budget."""
    from benchmarks import common

    env = common.environment("cuda" if not dry_run else "cpu")
    data = {"benchmark": "gpu_suite", **env, "dry_run": dry_run, "total_seconds": total,
            "total_budget_s": TOTAL_BUDGET_S, "steps": results}
    path = common.write_json(out / "suite.json", data)
    rows = [[r["step"], r["status"], r["seconds"], r["budget_s"]] for r in results]
    title = "bench-gpu suite" + (" (dry run on the CPU: not GPU figures)" if dry_run else "")
    common.append_results_md(out / "RESULTS.md", title, ("step", "status", "seconds", "budget s"), rows, env=env,
                             settings={"dry_run": dry_run, "total_budget_s": TOTAL_BUDGET_S,
                                       "steps": [r["step"] for r in results]},
                             notes=[f"total {total:.0f} s", "each step's own blocks above name its settings"])
    return path


if __name__ == "__main__":
    sys.exit(main())
