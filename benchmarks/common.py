"""Shared helpers of the benchmarks: environment, peak FLOPs, timing, JSON, plots and ``RESULTS.md``.

Every benchmark writes its figures with the device, library versions, settings and date they ran under
(:func:`environment`), as JSON (:func:`write_json`), as a PNG (:func:`pyplot`, Agg backend) and as a block
appended to ``benchmarks/RESULTS.md`` (:func:`append_results_md`). Figures in ``RESULTS.md`` are only ever
appended by the scripts, never written by hand.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from onlineaug.devices import parse_device
from onlineaug.tables import format_value

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
RESULTS_MD = REPO_ROOT / "benchmarks" / "RESULTS.md"

RESULTS_MD_HEADER = """# Benchmark results

Appended by the scripts in `benchmarks/` (`make bench` for the CPU smoke runs; `benchmarks/README.md` for the
GPU runs). Never edit a figure here by hand: rerun the script. Each block names the device, versions,
settings and date it ran under.
"""

# Dense (no sparsity) tensor-core peak, FLOP/s, for fp16 and bf16 (equal on these parts), from the vendors'
# data sheets. Matched against torch.cuda.get_device_name() in order: the first key contained in the name
# (case-insensitive) wins, so the specific variants come first.
PEAK_DENSE_FP16_FLOPS: tuple[tuple[str, str, float], ...] = (
    ("h100 pcie", "NVIDIA H100 PCIe", 756e12),
    ("h100 nvl", "NVIDIA H100 NVL", 835e12),
    ("h100", "NVIDIA H100 SXM", 989.4e12),
    ("h200", "NVIDIA H200", 989.4e12),
    ("a100", "NVIDIA A100", 312e12),
    ("l40s", "NVIDIA L40S", 362e12),
)

VERSIONED_PACKAGES = ("torch", "triton", "diffusers", "transformers", "kornia", "timm", "torchvision", "numpy",
                      "onlineaug")


# ------------------------------------------------------------------------------------------- environment
def package_version(name: str) -> str | None:
    """The installed version of ``name``, or None when it is not installed."""
    if name == "torch":
        return torch.__version__
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    if name == "onlineaug":  # a checkout on PYTHONPATH, not installed
        import onlineaug

        return onlineaug.__version__
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    """A human name for ``device``: the GPU's name, or the CPU model and its core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({os.cpu_count()} cores)"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def environment(*devices: torch.device | str) -> dict:
    """What a figure was measured on: ``device`` (the first of ``devices``), ``devices``, ``versions``, ``date``."""
    devices = [torch.device(d) for d in devices] or [torch.device("cpu")]
    cuda = {}
    if torch.cuda.is_available():
        cuda = {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                "gpu_count": torch.cuda.device_count()}
    return {
        "date": now(),
        "device": device_name(devices[0]),
        "device_type": devices[0].type,
        "devices": {str(d): device_name(d) for d in devices},
        "versions": {"python": platform.python_version(),
                     **{name: package_version(name) for name in VERSIONED_PACKAGES}, **cuda},
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
    }


@contextlib.contextmanager
def torch_threads(count: int | None):
    """Run the block with ``torch.set_num_threads(count)`` (unchanged if None); restore afterwards."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(value: str | None) -> torch.device:
    """``value`` as a device (default: ``cuda`` when one is available, else ``cpu``), checked."""
    if value is None:
        value = "cuda" if torch.cuda.is_available() else "cpu"
    return parse_device(value)


# ------------------------------------------------------------------------------------------- peak FLOPs
def peak_flops(device: torch.device | str, dtype: torch.dtype) -> tuple[float | None, str]:
    """Dense fp16/bf16 tensor-core peak of ``device`` in FLOP/s, and where it came from.

    None (MFU not reported) on CPU, for other dtypes, and for GPUs not in :data:`PEAK_DENSE_FP16_FLOPS`;
    pass ``--peak-tflops`` to the benchmark for those.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None, "n/a on CPU"
    if dtype not in (torch.float16, torch.bfloat16):
        return None, f"n/a for {dtype} (the table holds dense fp16/bf16 peaks)"
    name = torch.cuda.get_device_name(device)
    return lookup_peak(name)


def lookup_peak(name: str) -> tuple[float | None, str]:
    lowered = name.lower()
    for key, label, flops in PEAK_DENSE_FP16_FLOPS:
        if key in lowered:
            return flops, f"{label} dense fp16/bf16 peak {flops / 1e12:.1f} TFLOP/s (data sheet)"
    return None, f"unknown GPU {name!r}: pass --peak-tflops to report MFU"


# ------------------------------------------------------------------------------------------------ timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall time of a block on ``device``: synchronise, ``perf_counter``, run, synchronise, ``perf_counter``.

    On CUDA it also records CUDA events around the block (``gpu_seconds``: the time the device's stream
    took, which is at most the wall time when the host keeps the GPU fed).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = math.nan
        self.gpu_seconds: float | None = None
        self._events = None

    def __enter__(self) -> "Timer":
        synchronize(self.device)
        if self.device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._events is not None:
            self._events[1].record()
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
        if self._events is not None:
            self.gpu_seconds = self._events[0].elapsed_time(self._events[1]) / 1e3


# ------------------------------------------------------------------------------------------------ output
def _jsonable(value):
    if isinstance(value, (torch.device, torch.dtype, Path)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return str(value)


def _finite(value):
    """NaN/inf floats -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: str | os.PathLike, data: Mapping) -> Path:
    """Write ``data`` as indented JSON (creating the folder); NaN becomes null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(data), indent=2, default=_jsonable) + "\n", encoding="utf-8")
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def format_percent(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value * 100:+.1f}%" if signed else f"{value * 100:.1f}%"


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub markdown table; cells are formatted with :func:`format_value` unless already strings."""
    def cell(value) -> str:
        text = value if isinstance(value, str) else format_value(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def describe_environment(env: Mapping) -> str:
    """One line: device, versions (those installed), CPU count, git commit."""
    versions = env.get("versions", {})
    shown = ", ".join(f"{name} {versions[name]}" for name in ("python", *VERSIONED_PACKAGES, "cuda")
                      if versions.get(name))
    commit = f", commit {env['git_commit']}" if env.get("git_commit") else ""
    return f"{env.get('device')}; {shown}; {env.get('cpu_count')} CPUs{commit}"


def describe_settings(settings: Mapping) -> str:
    def show(value) -> str:
        if isinstance(value, (list, tuple)):
            return " ".join(str(v) for v in value)
        return str(value)

    return ", ".join(f"{key}={show(value)}" for key, value in settings.items() if value is not None)


def append_results_md(path: str | os.PathLike | None, title: str, columns: Sequence[str], rows: Sequence[Sequence],
                      *, env: Mapping, settings: Mapping, notes: Sequence[str] = ()) -> Path | None:
    """Append one block to ``path`` (``RESULTS.md``): a heading with the date, the environment and settings
    lines, notes, then a markdown table. Creates the file with its header if needed. ``path=None``: skip."""
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    block = [f"## {title} ({env.get('date', now())})", "",
             f"- environment: {describe_environment(env)}",
             f"- settings: {describe_settings(settings)}"]
    block += [f"- note: {note}" for note in notes]
    block += ["", markdown_table(columns, rows), ""]
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    with path.open("a", encoding="utf-8") as f:
        if not existing.strip():
            f.write(RESULTS_MD_HEADER + "\n")
        elif not existing.endswith("\n"):
            f.write("\n")
        if existing.strip():
            f.write("\n")
        f.write("\n".join(block))
    return path


def run_cli(module, argv=None) -> dict:
    """The ``main`` of ``generator.py`` and ``overhead.py``: parse, measure, write JSON/PNG/RESULTS.md, print."""
    args = module.build_parser().parse_args(argv)
    result = module.benchmark(args)
    paths = module.report(result, args.out, args.results_md or None)
    module.print_summary(result)
    if paths:
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return result
