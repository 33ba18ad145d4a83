"""Load a generator pipeline from a spec, and apply one device/dtype policy to every pipeline.

A spec is ``"tiny"`` (tiny random weights, in process), ``"full-random"`` (full-size random weights,
for benchmarks), a local diffusers folder, or a Hugging Face hub id such as
``timbrooks/instruct-pix2pix`` (InstructPix2Pix, Brooks, Holynski, Efros, CVPR 2023). Hub ids are read
from the local HF cache only, unless ``ONLINEAUG_ALLOW_DOWNLOAD=1``; missing weights raise
:class:`GeneratorNotFoundError` saying how to get them.

On CUDA the pipeline runs in float16 with SDPA attention, channels-last UNet/VAE and TF32 matmuls.
``compile_unet=True`` wraps the UNet in ``torch.compile(dynamic=False)``: every new (batch, height,
width) recompiles, so feed the producer fixed shape buckets.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.models.attention_processor import AttnProcessor2_0

from onlineaug.devices import parse_device

from ._progress import quiet_progress_bars
from .full_random import build_full_random_pipeline
from .seeding import check_seed
from .tasks import DEFAULT_HUB_IDS, PIPELINE_CLASSES, TASK_TITLES, UNET_IN_CHANNELS, check_task
from .tiny import build_tiny_pipeline

SCHEDULERS = {
    "euler_a": EulerAncestralDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
}
# DiffuseMix's official code runs InstructPix2Pix with Euler ancestral; the other tasks keep the
# scheduler stored with the weights.
DEFAULT_SCHEDULER = {"instruct-pix2pix": "euler_a", "img2img": None, "text2img": None}

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}

ALLOW_DOWNLOAD_ENV = "ONLINEAUG_ALLOW_DOWNLOAD"
_NOT_LOADED = ("safety_checker", "feature_extractor")  # passed as None to from_pretrained
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class GeneratorNotFoundError(FileNotFoundError):
    """The generator's weights are not on this machine; the message says how to get them."""


# ----------------------------------------------------------------------------- public API


def load_pipeline(
    spec: str,
    task: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    compile_unet: bool = False,
    seed: int = 0,
    scheduler: str | None = None,
    progress: bool = False,
) -> DiffusionPipeline:
    """Load the pipeline for ``task`` (one of :data:`TASKS`) from ``spec``, ready to run on ``device``.

    Args:
        spec: ``"tiny"``, ``"full-random"``, a local diffusers folder or a hub id (the two names
            win over folders called so: write ``./tiny`` for a folder).
        device: where the pipeline runs.
        dtype: default float16 on CUDA, float32 elsewhere; a ``torch.dtype`` or "fp16"/"bf16"/"fp32".
        compile_unet: wrap the UNet in ``torch.compile(fullgraph=False, dynamic=False)``.
        seed: weights seed for the random-weight specs (ignored for real weights).
        scheduler: one of :data:`SCHEDULERS`; default Euler ancestral for instruct-pix2pix and the
            stored scheduler otherwise.
        progress: show diffusers' per-step progress bar.
    """
    spec = _check_spec(spec)
    check_task(task)
    device = _check_device(device)
    dtype = _resolve_dtype(dtype, device)
    check_seed(seed)
    for name, flag in (("compile_unet", compile_unet), ("progress", progress)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)} or None")

    if spec == "tiny":
        pipe = build_tiny_pipeline(task, seed=seed)
    elif spec == "full-random":
        pipe = build_full_random_pipeline(task, device=device, dtype=dtype, seed=seed)
    else:
        pipe = _from_pretrained(spec, task, dtype, progress)
        _check_in_channels(pipe.unet.config.in_channels, spec, task)
    scheduler = scheduler or DEFAULT_SCHEDULER[task]
    return _apply_policy(pipe, device, dtype, compile_unet, scheduler, progress)


def describe(spec: str, task: str | None = None) -> str:
    """One line for logs saying what ``spec`` is (never loads weights, never touches the network)."""
    spec = _check_spec(spec)
    title = TASK_TITLES[check_task(task)] if task is not None else None
    if spec == "tiny":
        return f"tiny random-weight {title or 'Stable Diffusion-family pipeline'} (in-process)"
    if spec == "full-random":
        what = f"{title}, " if title else ""
        return (f"full-size random-weight SD 1.5 architecture ({what}UNet ~860M, VAE ~84M, CLIP ViT-L/14 "
                f"text ~123M; untrained, for speed/FLOPs only)")
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path):
        index = os.path.join(path, "model_index.json")
        kind = _read_class_name(index) if os.path.isfile(index) else "no model_index.json"
        return f"local folder {path} ({kind})"
    if _looks_like_path(spec):
        return f"local folder {path} (missing)"
    cache = hf_cache_dir()
    state = "not cached" if _cached_snapshot(spec, cache) is None else "cached"
    return f"hub id {spec} (HF cache at {cache}, {state})"


def ensure_available(spec: str, task: str) -> None:
    """Raise now, in the calling process, what :func:`load_pipeline` would raise for missing weights.

    Checks without loading any weights: the folder or cached snapshot exists, has model_index.json and
    every component subfolder it lists, and its UNet's ``in_channels`` fits ``task``. Raises
    :class:`GeneratorNotFoundError` (with how to get the weights) or ``ValueError``. ``"tiny"`` and
    ``"full-random"`` are always available.
    """
    spec = _check_spec(spec)
    check_task(task)
    if spec not in ("tiny", "full-random"):
        _check_files(_locate(spec, task), spec, task)


def hf_cache_dir() -> str:
    """The HF hub cache as the environment says now: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``.

    Read at call time (huggingface_hub reads it once, at import), so setting ``HF_HOME`` in a running
    process before loading still works.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return os.path.join(os.path.expanduser(home), "hub")


# ----------------------------------------------------------------------------- validation


def _check_spec(spec) -> str:
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"generator spec must be a non-empty str or path ('tiny', 'full-random', a "
                        f"folder or a hub id), got {spec!r}")
    return spec


def _check_device(device) -> torch.device:
    if str(device) == "meta":
        raise ValueError("device 'meta' cannot run a pipeline; use the build_* functions of "
                         "onlineaug.generators.full_random to count parameters")
    return parse_device(device)


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(
                f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)} or a torch.dtype"
            )
        return DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating torch.dtype, a name in {list(DTYPES)} or None, got {dtype!r}"
        )
    return dtype


def _check_in_channels(have: int, spec: str, task: str) -> None:
    want = UNET_IN_CHANNELS[task]
    if have != want:
        guess = "instruct-pix2pix" if have == 8 else "img2img or text2img"
        raise ValueError(
            f"{spec!r} has a UNet with in_channels={have}, but task {task!r} needs in_channels={want}; "
            f"these weights are for {guess}"
        )


# ----------------------------------------------------------------------------- real weights


def _looks_like_path(spec: str) -> bool:
    return (spec.startswith((".", "~", os.sep)) or spec.endswith(("/", os.sep))
            or (os.altsep is not None and os.altsep in spec) or not _HUB_ID.match(spec))


def _cached_snapshot(repo_id: str, cache_dir: str) -> str | None:
    """The cached snapshot folder of ``repo_id`` holding model_index.json, or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        index = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=cache_dir)
    except ValueError:  # not a valid repo id
        return None
    return os.path.dirname(index) if isinstance(index, str) else None


def _read_class_name(index_path: str) -> str:
    try:
        with open(index_path, encoding="utf-8") as f:
            return str(json.load(f).get("_class_name", "unknown pipeline class"))
    except (OSError, ValueError) as err:
        return f"unreadable model_index.json: {err}"


def _not_found_message(spec: str, task: str, looked_for: str, cause: str = "") -> str:
    repo = spec if _HUB_ID.match(spec) and "/" in spec else DEFAULT_HUB_IDS[task]
    local = os.path.join("/path/to", repo.split("/")[-1])
    lines = [
        f"generator weights for task {task!r} not found (generator={spec!r}).",
        f"Looked for: {looked_for}.",
        "To get them, do one of:",
        f"  - download once, on a machine with internet: huggingface-cli download {repo} --local-dir {local}",
        f"    (or: hf download {repo} --local-dir {local}), then pass generator={local!r};",
        f"  - if it is already in a Hugging Face cache, set HF_HOME=/path/to/cache (the folder whose hub/ "
        f"holds models--{repo.replace('/', '--')}), or HF_HUB_CACHE to that hub/ folder;",
        "  - pass a local diffusers folder (with model_index.json) as generator=;",
        f"  - set {ALLOW_DOWNLOAD_ENV}=1 to let this process download into the HF cache;",
        "  - for tests without weights, use generator='tiny'.",
    ]
    if cause:
        lines.append(f"Underlying error: {cause}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _Source:
    location: str  # a folder, or a hub id
    local_only: bool
    cache_dir: str
    looked_for: str  # for error messages
    folder: str | None  # where the files are on disk now (the folder or the cached snapshot), if known


def _locate(spec: str, task: str) -> _Source:
    """Find where ``spec``'s weights are, or raise :class:`GeneratorNotFoundError` saying how to get them."""
    path = os.path.abspath(os.path.expanduser(spec))
    cache = hf_cache_dir()
    allow_download = os.environ.get(ALLOW_DOWNLOAD_ENV) == "1"
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            singles = [n for n in sorted(os.listdir(path)) if n.endswith((".safetensors", ".ckpt"))]
            hint = (f" It holds single-file checkpoint(s) {singles}: convert them with "
                    f"{PIPELINE_CLASSES[task].__name__}.from_single_file(...).save_pretrained(folder)."
                    if singles else "")
            raise GeneratorNotFoundError(
                f"{path} exists but is not a diffusers pipeline folder: it has no model_index.json "
                f"(expected model_index.json with unet/, vae/, text_encoder/, tokenizer/, scheduler/ "
                f"subfolders, as written by save_pretrained or `hf download`).{hint}"
            )
        return _Source(path, True, cache, f"the diffusers folder {path}", path)
    if _looks_like_path(spec):
        looked_for = f"a local folder at {path} (does not exist)"
        raise GeneratorNotFoundError(_not_found_message(spec, task, looked_for))
    looked_for = f"a local folder at {path} (does not exist), then hub id {spec!r} in the HF cache {cache}"
    if not allow_download:
        looked_for += f" (downloads off; {ALLOW_DOWNLOAD_ENV} is not 1)"
    snapshot = _cached_snapshot(spec, cache)
    if snapshot is None and not allow_download:
        raise GeneratorNotFoundError(_not_found_message(spec, task, looked_for + ": not cached"))
    return _Source(spec, not allow_download, cache, looked_for, snapshot)


def _check_files(source: _Source, spec: str, task: str) -> None:
    """Without loading weights: every component of model_index.json is there, the UNet fits the task."""
    if source.folder is None:
        return  # to be downloaded
    index_path = os.path.join(source.folder, "model_index.json")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except ValueError as err:
        raise ValueError(f"{index_path} is not valid JSON ({err}); re-download or re-save the "
                         f"pipeline") from None
    missing = [
        name for name, value in index.items()
        if isinstance(value, list) and value[0] is not None and name not in _NOT_LOADED
        and not os.path.isdir(os.path.join(source.folder, name))
    ]
    if missing:
        cause = f"model_index.json lists {missing}, which {source.folder} lacks (a partial download?)"
        raise GeneratorNotFoundError(_not_found_message(spec, task, source.looked_for, cause=cause))
    unet_config = os.path.join(source.folder, "unet", "config.json")
    if os.path.isfile(unet_config):
        with open(unet_config, encoding="utf-8") as f:
            _check_in_channels(json.load(f).get("in_channels"), spec, task)


def _from_pretrained(spec: str, task: str, dtype: torch.dtype, progress: bool) -> DiffusionPipeline:
    source = _locate(spec, task)
    _check_files(source, spec, task)
    try:
        with contextlib.nullcontext() if progress else quiet_progress_bars():
            return PIPELINE_CLASSES[task].from_pretrained(
                source.location,
                dtype=dtype,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                local_files_only=source.local_only,
                cache_dir=source.cache_dir,
                # without accelerate diffusers falls back (and logs a long notice); say it up front
                low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
            )
    except OSError as err:  # diffusers/huggingface_hub report missing files as OSError subclasses
        message = _not_found_message(spec, task, source.looked_for, cause=str(err))
        raise GeneratorNotFoundError(message) from err


# ----------------------------------------------------------------------------- policy


def _apply_policy(pipe, device, dtype, compile_unet, scheduler, progress) -> DiffusionPipeline:
    modules = (pipe.unet, pipe.vae, pipe.text_encoder)
    if any(m.dtype != dtype for m in modules):  # diffusers warns on every dtype cast, even a no-op one
        pipe.to(dtype=dtype)
    pipe.to(device=device)
    for module in modules:
        module.eval().requires_grad_(False)
    # SDPA (flash / memory-efficient kernels on CUDA); diffusers' default, set explicitly in case the
    # checkpoint or an earlier call installed another processor.
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    if device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        torch.backends.cuda.matmul.allow_tf32 = True
    if scheduler is not None:
        pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=not progress)
    if compile_unet:
        # dynamic=False: one graph per (batch, height, width); fixed shape buckets avoid recompiles.
        pipe.unet = torch.compile(pipe.unet, fullgraph=False, dynamic=False)
    return pipe
