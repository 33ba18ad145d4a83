"""Load a generator pipeline from a spec and a task: the by-name entry point of benchmarks and scripts.

A spec is ``"tiny"`` (tiny random weights, in process), ``"full-random"`` (full-size random weights, for
benchmarks), a local diffusers folder, or a Hugging Face hub id such as ``timbrooks/instruct-pix2pix``
(InstructPix2Pix, Brooks, Holynski, Efros, CVPR 2023). Hub ids are read from the local HF cache only, unless
``ONLINEAUG_ALLOW_DOWNLOAD=1``; missing weights raise :class:`GeneratorNotFoundError` saying how to get them.

Everything goes through :func:`onlineaug.models.diffusion.prepare_pipeline`, the one load policy that producers
use too (``onlineaug.models.load_model``): fp16 on CUDA, SDPA attention, channels-last UNet/VAE and TF32 matmuls
on CUDA; ``compile_unet=True`` wraps the UNet in ``torch.compile(dynamic=False)``: every new (batch, height,
width) recompiles, so feed the producer fixed shape buckets.
"""
from __future__ import annotations

import os

import torch
from diffusers import DiffusionPipeline

from onlineaug.models.diffusion import DTYPES, SCHEDULERS, check_device, resolve_dtype
from onlineaug.models.spec import LoadPolicy

from .seeding import check_seed
from .tasks import ARCHITECTURE_TITLES, TASK_TITLES, check_architecture, check_task
from .weights import (
    ALLOW_DOWNLOAD_ENV,
    GeneratorNotFoundError,
    describe_weights,
    hf_cache_dir,
    inspect_weights,
    locate,
)

# These lived here before weights.py; onlineaug.models.checkpoints (the perception models) imports them from here.
from .weights import _HUB_ID  # noqa: F401
from .weights import looks_like_path as _looks_like_path  # noqa: F401

# DiffuseMix's official code runs InstructPix2Pix with Euler ancestral; the other tasks keep the
# scheduler stored with the weights.
DEFAULT_SCHEDULER = {"instruct-pix2pix": "euler_a", "img2img": None, "text2img": None, "inpaint": None}
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

__all__ = ["ALLOW_DOWNLOAD_ENV", "DEFAULT_SCHEDULER", "DTYPES", "SCHEDULERS", "GeneratorNotFoundError", "describe",
           "ensure_available", "hf_cache_dir", "load_pipeline"]


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
    architecture: str = "sd15",
    policy: LoadPolicy | None = None,
) -> DiffusionPipeline:
    """Load the pipeline for ``task`` (one of :data:`~.tasks.TASKS`) from ``spec``, ready to run on ``device``.

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
        architecture: ``"sd15"`` or ``"sdxl"`` for ``"tiny"``/``"full-random"`` (real weights carry their own).
        policy: the whole :class:`~onlineaug.models.LoadPolicy` (replaces ``dtype`` and ``compile_unet``).
    """
    from onlineaug.models.diffusion import build_pipeline, prepare_pipeline

    spec = _check_spec(spec)
    check_task(task)
    check_architecture(architecture)
    device = check_device(device)
    check_seed(seed)
    for name, flag in (("compile_unet", compile_unet), ("progress", progress)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)} or None")
    if policy is None:
        resolved = resolve_dtype(dtype, device)
        if resolved not in _DTYPE_NAMES:
            raise ValueError(f"dtype {resolved} is not one of {', '.join(_DTYPE_NAMES.values())}")
        policy = LoadPolicy(dtype=_DTYPE_NAMES[resolved], compile=compile_unet)
    pipe = build_pipeline(task, spec, architecture, device=device, dtype=resolve_dtype(policy.dtype, device),
                          seed=seed, progress=progress)
    return prepare_pipeline(pipe, device=device, policy=policy, scheduler=scheduler or DEFAULT_SCHEDULER[task],
                            progress=progress)


def describe(spec: str, task: str | None = None, architecture: str = "sd15") -> str:
    """One line for logs saying what ``spec`` is (never loads weights, never touches the network)."""
    spec = _check_spec(spec)
    title = TASK_TITLES[check_task(task)] if task is not None else None
    arch = ARCHITECTURE_TITLES[check_architecture(architecture)]
    if spec == "tiny":
        return f"tiny random-weight {arch} {title or 'pipeline'} (in-process)"
    if spec == "full-random":
        what = f"{title}, " if title else ""
        sizes = ("UNet ~860M, VAE ~84M, CLIP ViT-L/14 text ~123M" if architecture == "sd15" else
                 "UNet ~2.6B, VAE ~84M, CLIP ViT-L/14 ~123M + OpenCLIP ViT-bigG/14 ~695M text")
        return f"full-size random-weight {arch} architecture ({what}{sizes}; untrained, for speed/FLOPs only)"
    return describe_weights(spec)


def ensure_available(spec: str, task: str) -> None:
    """Raise now, in the calling process, what :func:`load_pipeline` would raise for missing weights.

    Checks without loading any weights: the folder or cached snapshot exists, its model_index.json names every
    component the pipeline needs, each with its config and weight files, and its UNet's ``in_channels`` fits
    ``task``. Raises :class:`GeneratorNotFoundError` (with how to get the weights) or ``ValueError``.
    ``"tiny"`` and ``"full-random"`` are always available.
    """
    spec = _check_spec(spec)
    check_task(task)
    if spec not in ("tiny", "full-random"):
        inspect_weights(locate(spec, task), task)


def _check_spec(spec) -> str:
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"generator spec must be a non-empty str or path ('tiny', 'full-random', a "
                        f"folder or a hub id), got {spec!r}")
    return spec
