"""The diffusion kinds of :mod:`onlineaug.models`: a diffusers pipeline per (kind, architecture), built under one
:class:`~onlineaug.models.LoadPolicy`.

Kinds (:data:`~onlineaug.models.DIFFUSION_KINDS`) x architectures (``sd15``, ``sdxl``) pick the pipeline class
(:data:`onlineaug.generators.tasks.PIPELINE_CLASSES`): ``StableDiffusion{,Img2Img,Inpaint,InstructPix2Pix}Pipeline``
and their ``StableDiffusionXL*`` counterparts. Sources: ``"tiny"`` / ``"full-random"`` (random weights, the
role's architecture unless the source names one: ``"tiny-sdxl"``, ``"full-random-sd15"``), a local diffusers
folder or a hub id in the local HF cache, whose ``model_index.json`` says the architecture.

:func:`prepare_pipeline` is the one place a pipeline is made ready, in this order:

1. dtype and device (``LoadPolicy.dtype``: fp16 on CUDA by default, else fp32), eval mode, no gradients;
2. the scheduler (:data:`SCHEDULERS`, with the role's ``scheduler_config`` overriding entries: CosXL's
   ``EDMEulerScheduler(sigma_min=0.002, sigma_max=120, sigma_data=1, prediction_type="v_prediction",
   sigma_schedule="exponential")``);
3. textual inversion, then LoRA fused with ``lora_scale`` (:mod:`.finetuned`), before anything is compiled;
4. SDPA attention processors (UNet, VAE; the text encoders use transformers' SDPA), fused QKV projections,
   channels-last UNet/VAE, cuDNN autotuning, TF32 matmuls on CUDA;
5. ``torch.compile(unet, mode=..., fullgraph=False, dynamic=False)`` and optionally the VAE decoder: every new
   (batch, height, width) recompiles, so feed the producer fixed shape buckets.

SDXL's VAE overflows in fp16: its config has ``force_upcast=True`` and diffusers' SDXL pipelines then encode and
decode in fp32 when the pipeline runs in fp16 (bf16 has fp32's range and needs no upcast). That is kept as is;
``pipe.vae_decodes_in_fp32`` says whether it applies, and a warning is logged when an SDXL VAE would decode in
fp16 (right for ``madebyollin/sdxl-vae-fp16-fix``, NaN images for the original VAE; producers drop and count
non-finite images).
"""
from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping

import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from onlineaug.devices import parse_device
from onlineaug.models.diffusion_checks import (
    SCHEDULER_CLASS_NAMES,
    check_scheduler,
    ensure_diffusion_available,
    role_architecture,
    scheduler_class,
    scheduler_settings,
    source_and_architecture,
)
from onlineaug.models.spec import DIFFUSION_KINDS, LoadPolicy, ModelRole, ModelSpec

logger = logging.getLogger(__name__)

SCHEDULERS = {name: scheduler_class(name) for name in SCHEDULER_CLASS_NAMES}
# Settings a scheduler name implies on top of the stored config (the role's scheduler_config still wins).
SCHEDULER_DEFAULTS = {"dpm++": {"algorithm_type": "dpmsolver++"}}  # DPM-Solver++ (Lu et al., 2022), as Diff-Mix

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class _DropEmptyFp32Notice(logging.Filter):
    """diffusers 0.42 logs "There are modules in X that should be kept in float32: []" on every ``.to(dtype)`` of
    any model, even with no such module; SDXL img2img/inpaint casts its VAE on every call. Drop only the empty
    notice: one that names modules still passes."""

    def filter(self, record):
        return "that should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropEmptyFp32Notice())


# ----------------------------------------------------------------------------- small resolvers


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """``LoadPolicy.dtype`` (or a ``torch.dtype``) as a ``torch.dtype``: None is fp16 on CUDA, fp32 elsewhere."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)} or a torch.dtype")
        return DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, a name in {list(DTYPES)} or None, got {dtype!r}")
    return dtype


def check_device(device) -> torch.device:
    if str(device) == "meta":
        raise ValueError("device 'meta' cannot run a pipeline; use the build_* functions of "
                         "onlineaug.generators.full_random to count parameters")
    return parse_device(device)


# ----------------------------------------------------------------------------- schedulers


def make_scheduler(current, name: str | None, overrides: Mapping | None = None):
    """The scheduler ``name`` (or ``current``'s class for None) from ``current``'s config, with ``overrides``.

    Only the entries the new class takes are carried over (the others would be ignored with a warning);
    ``overrides`` naming a setting the class does not take is an error listing the valid ones.
    """
    overrides = dict(overrides or {})
    if name is None and not overrides:
        return current
    cls = check_scheduler(name, overrides, type(current))
    accepted = set(scheduler_settings(cls))
    base = {k: v for k, v in current.config.items() if k in accepted}
    return cls.from_config({**base, **SCHEDULER_DEFAULTS.get(name, {}), **overrides})


# ----------------------------------------------------------------------------- building


def build_pipeline(task: str, source: str, architecture: str, *, device: torch.device, dtype: torch.dtype,
                   seed: int = 0, progress: bool = False) -> DiffusionPipeline:
    """The pipeline of ``task`` from ``source`` ("tiny", "full-random", a folder or a hub id), not yet prepared.

    ``architecture`` applies to the random-weight sources (real weights carry their own). Full-random models
    are allocated directly on ``device`` in ``dtype`` (a second each on a GPU; never run them on a CPU).
    """
    from onlineaug.generators.full_random import build_full_random_pipeline
    from onlineaug.generators.seeding import check_seed
    from onlineaug.generators.tiny import build_tiny_pipeline
    from onlineaug.generators.weights import from_pretrained

    check_seed(seed)
    if source == "tiny":
        return build_tiny_pipeline(task, seed=seed, architecture=architecture)
    if source == "full-random":
        return build_full_random_pipeline(task, device=device, dtype=dtype, seed=seed, architecture=architecture)
    return from_pretrained(source, task, dtype=dtype, architecture=architecture, progress=progress)


def _modules(pipe) -> list[torch.nn.Module]:
    names = ("unet", "vae") + TEXT_ENCODERS
    return [m for m in (getattr(pipe, n, None) for n in names) if isinstance(m, torch.nn.Module)]


def prepare_pipeline(pipe: DiffusionPipeline, *, device, policy: LoadPolicy = LoadPolicy(),
                     scheduler: str | None = None, scheduler_config: Mapping | None = None,
                     lora: str | None = None, lora_scale: float = 1.0, textual_inversion: str | None = None,
                     progress: bool = False) -> DiffusionPipeline:
    """Apply the load policy and the fine-tuned weights to ``pipe`` (steps 1-5 of this module's docstring).

    Sets ``pipe.class_tokens`` (class name -> placeholder token; empty without textual inversion),
    ``pipe.placeholder_tokens`` (the tokens added), ``pipe.lora_components`` (the components a LoRA changed) and
    ``pipe.vae_decodes_in_fp32``. Returns ``pipe``.
    """
    from onlineaug.models.finetuned import load_lora, load_textual_inversion

    device = check_device(device)
    dtype = resolve_dtype(policy.dtype, device)
    # 1. dtype, device, inference mode
    if any(m.dtype != dtype for m in _modules(pipe)):  # diffusers warns on every cast, even a no-op one
        pipe.to(dtype=dtype)
    pipe.to(device=device)
    for module in _modules(pipe):
        module.eval().requires_grad_(False)
    # 2. scheduler
    pipe.scheduler = make_scheduler(pipe.scheduler, scheduler, scheduler_config)
    # 3. fine-tuned weights, before compilation
    pipe.class_tokens, pipe.placeholder_tokens, pipe.lora_components = {}, [], ()
    if textual_inversion is not None:
        ti = load_textual_inversion(pipe, textual_inversion)
        pipe.class_tokens, pipe.placeholder_tokens = dict(ti.class_tokens), list(ti.tokens)
    if lora is not None:
        pipe.lora_components = load_lora(pipe, lora, lora_scale)
    # 4. kernels and layouts. SDPA (flash / memory-efficient kernels on CUDA) is diffusers' default; set it
    # explicitly in case the checkpoint or an earlier call installed another processor.
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    for name in TEXT_ENCODERS:
        encoder = getattr(pipe, name, None)
        if encoder is not None and encoder.config._attn_implementation != "sdpa":
            encoder.set_attn_implementation("sdpa")
    if policy.fuse_qkv:
        pipe.fuse_qkv_projections()  # fused projections with FusedAttnProcessor2_0 (SDPA) in UNet and VAE
    if policy.channels_last if policy.channels_last is not None else device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    cudnn = policy.cudnn_benchmark if policy.cudnn_benchmark is not None else device.type == "cuda"
    if cudnn:
        torch.backends.cudnn.benchmark = True
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    pipe.vae_decodes_in_fp32 = _check_vae_upcast(pipe, dtype)
    pipe.set_progress_bar_config(disable=not progress)
    # 5. compilation
    if policy.compile_mode is not None:
        # dynamic=False: one graph per (batch, height, width); fixed shape buckets avoid recompiles.
        pipe.unet = torch.compile(pipe.unet, mode=policy.compile_mode, fullgraph=False, dynamic=False)
        if policy.compile_vae:
            pipe.vae.decoder = torch.compile(pipe.vae.decoder, mode=policy.compile_mode, fullgraph=False,
                                             dynamic=False)
    elif policy.compile_vae:
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, fullgraph=False, dynamic=False)
    return pipe


def _check_vae_upcast(pipe, dtype: torch.dtype) -> bool:
    """Whether the VAE runs in fp32 although the pipeline runs in fp16 (diffusers' SDXL ``force_upcast``)."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    upcast = sdxl and dtype == torch.float16 and bool(getattr(pipe.vae.config, "force_upcast", False))
    if sdxl and dtype == torch.float16 and not upcast:
        logger.warning("onlineaug: this SDXL VAE has force_upcast=False and decodes in fp16: right for an fp16-fixed "
                       "VAE (madebyollin/sdxl-vae-fp16-fix), NaN images for the original SDXL VAE (they are "
                       "dropped and counted as non_finite)")
    return upcast


# ----------------------------------------------------------------------------- roles


def load_diffusion(role: ModelRole, spec: ModelSpec, *, device, policy: LoadPolicy = LoadPolicy(), seed: int = 0,
                   progress: bool = False) -> DiffusionPipeline:
    """The pipeline that fills ``role`` with ``spec``, on ``device`` under ``policy`` (see the module docstring).

    Sets ``pipe.kind`` and ``pipe.architecture`` besides the attributes of :func:`prepare_pipeline`.
    """
    if role.kind not in DIFFUSION_KINDS:
        raise ValueError(f"kind {role.kind!r} is not a diffusion kind ({', '.join(DIFFUSION_KINDS)})")
    device = check_device(device)
    source, architecture = source_and_architecture(role, spec)
    dtype = resolve_dtype(policy.dtype, device)
    pipe = build_pipeline(role.kind, source, architecture, device=device, dtype=dtype, seed=seed, progress=progress)
    prepare_pipeline(pipe, device=device, policy=policy, scheduler=role.scheduler,
                     scheduler_config=role.scheduler_config, lora=spec.lora, lora_scale=spec.lora_scale,
                     textual_inversion=spec.textual_inversion, progress=progress)
    pipe.kind = role.kind
    pipe.architecture = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15"
    return pipe


def describe_diffusion(role: ModelRole, spec: ModelSpec) -> str:
    """One line for logs: the kind, architecture and source, fine-tuned weights and scheduler (loads nothing)."""
    from onlineaug.generators.tasks import ARCHITECTURE_TITLES, TASK_TITLES
    from onlineaug.generators.weights import describe_weights

    source, architecture = source_and_architecture(role, spec)
    title = TASK_TITLES[role.kind]
    if source == "tiny":
        text = f"tiny random-weight {ARCHITECTURE_TITLES[architecture]} {title} (in-process)"
    elif source == "full-random":
        text = (f"full-size random-weight {ARCHITECTURE_TITLES[architecture]} {title} (untrained, for "
                f"speed/FLOPs only)")
    else:
        text = f"{title} from {describe_weights(source)}"
    if spec.textual_inversion is not None:
        text += f" + textual inversion {os.path.basename(spec.textual_inversion.rstrip(os.sep))}"
    if spec.lora is not None:
        text += f" + LoRA {os.path.basename(spec.lora.rstrip(os.sep))} (scale {spec.lora_scale:g})"
    if role.scheduler is not None or role.scheduler_config:
        settings = ", ".join(f"{k}={v!r}" for k, v in sorted(role.scheduler_config.items()))
        text += f"; scheduler {role.scheduler or 'stored'}" + (f" ({settings})" if settings else "")
    return text


__all__ = ["DTYPES", "SCHEDULERS", "SCHEDULER_DEFAULTS", "build_pipeline", "describe_diffusion",
           "ensure_diffusion_available", "load_diffusion", "make_scheduler", "prepare_pipeline", "resolve_dtype",
           "role_architecture"]
