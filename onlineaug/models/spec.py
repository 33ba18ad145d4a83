"""What a recipe asks for (:class:`ModelRole`), what the user chose (:class:`ModelSpec`), and how it is loaded
(:class:`LoadPolicy`).

A recipe names the models it needs by role (``"edit"``, ``"filter"``, ``"segmenter"``, ``"inpaint"``, ...), each
with a *kind* (which family of model and which wrapper the recipe gets back) and a default source. The user's
``generator=`` names the recipe's main role; ``models={role: spec}`` overrides any role. Every model then goes
through one loading policy (:class:`LoadPolicy`) in the producer process that runs it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

# Kinds of model a role can be. Diffusion kinds load a diffusers pipeline (SD 1.x or SDXL); "clip" a CLIP
# image/text embedder; the segmenter kinds a wrapper with ``segment(images, texts, indices)``.
DIFFUSION_KINDS = ("instruct-pix2pix", "img2img", "text2img", "inpaint")
SEGMENTER_KINDS = ("lang-sam", "clipseg", "dataset-masks")
KINDS = DIFFUSION_KINDS + ("clip",) + SEGMENTER_KINDS
ARCHITECTURES = ("sd15", "sdxl")  # what "tiny" / "full-random" build for diffusion kinds
RANDOM_SOURCES = ("tiny", "full-random")  # random weights built in process: no files


@dataclasses.dataclass(frozen=True)
class ModelRole:
    """One model a recipe needs.

    Attributes:
        kind: one of :data:`KINDS`.
        default: the source used when the user names none (a hub id, or ``"dataset"`` for dataset masks).
        architecture: for diffusion kinds, ``"sd15"`` or ``"sdxl"``: what ``"tiny"``/``"full-random"`` build.
            Real weights carry their own architecture (read from ``model_index.json``).
        scheduler: a scheduler name of :data:`onlineaug.models.diffusion.SCHEDULERS` or None (keep the one stored
            with the weights); ``scheduler_config`` overrides entries of its config (e.g. CosXL's EDM settings).
        lora, textual_inversion: fine-tuned weights the recipe's own options name (``ModelSpec`` fields win).
        options: kind-specific settings (e.g. segmenter thresholds).
    """

    kind: str
    default: str
    architecture: str | None = None
    scheduler: str | None = None
    scheduler_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    lora: str | None = None
    textual_inversion: str | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind in DIFFUSION_KINDS and self.architecture not in ARCHITECTURES:
            raise ValueError(f"a {self.kind!r} role needs architecture in {ARCHITECTURES}, got {self.architecture!r}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which weights fill a role: ``source`` plus optional fine-tuned weights applied before compilation.

    ``source``: ``"tiny"`` (tiny random weights, built in process), ``"full-random"`` (the real architecture's size
    with random weights, for benchmarks), a local folder, a hub id read from the local Hugging Face cache, or
    ``"dataset"`` (a ``dataset-masks`` segmenter). ``"tiny-sdxl"``/``"tiny-sd15"`` (and ``full-random-...``) pick
    the architecture explicitly.
    """

    source: str
    lora: str | None = None
    lora_scale: float = 1.0
    textual_inversion: str | None = None

    @classmethod
    def parse(cls, value, role: str) -> "ModelSpec":
        """A spec from a string, a path, a dict ``{"source", "lora", "lora_scale", "textual_inversion"}`` or a spec."""
        if isinstance(value, ModelSpec):
            return value
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, str):
            if not value:
                raise ValueError(f"models[{role!r}] is an empty string; give 'tiny', 'full-random', a hub id or a folder")
            return cls(value)
        if isinstance(value, Mapping):
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - fields)
            if unknown:
                raise ValueError(f"models[{role!r}] has unknown keys {unknown}; valid keys: {sorted(fields)}")
            if "source" not in value:
                raise ValueError(f"models[{role!r}] needs a 'source' ('tiny', 'full-random', a hub id or a folder)")
            spec = cls(**{k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in value.items()})
            for name in ("source", "lora", "textual_inversion"):
                item = getattr(spec, name)
                if name == "source" and (not isinstance(item, str) or not item):
                    raise TypeError(f"models[{role!r}]['source'] must be a non-empty string, got {item!r}")
                if name != "source" and item is not None and not isinstance(item, str):
                    raise TypeError(f"models[{role!r}][{name!r}] must be a path (str), got {item!r}")
            if isinstance(spec.lora_scale, bool) or not isinstance(spec.lora_scale, (int, float)):
                raise TypeError(f"models[{role!r}]['lora_scale'] must be a number, got {spec.lora_scale!r}")
            return spec
        raise TypeError(f"models[{role!r}] must be a string (source), a dict or a ModelSpec, got "
                        f"{type(value).__name__} {value!r:.60}")

    def with_role_defaults(self, role: ModelRole) -> "ModelSpec":
        """Fill fine-tuned weights the recipe's options named, where the user's spec names none."""
        return dataclasses.replace(self, lora=self.lora or role.lora,
                                   textual_inversion=self.textual_inversion or role.textual_inversion)

    @property
    def random_weights(self) -> tuple[str, str | None] | None:
        """``("tiny" | "full-random", architecture or None)`` for a random-weight source, else None."""
        for base in RANDOM_SOURCES:
            if self.source == base:
                return base, None
            for architecture in ARCHITECTURES:
                if self.source == f"{base}-{architecture}":
                    return base, architecture
        return None

    @property
    def is_random(self) -> bool:
        return self.random_weights is not None


COMPILE_MODES = (False, True, "default", "max-autotune", "reduce-overhead", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class LoadPolicy:
    """How every model is loaded in a producer (and in the benchmarks: one policy for both).

    Attributes:
        dtype: "fp16" | "bf16" | "fp32" or None: fp16 on CUDA, fp32 elsewhere.
        compile: ``torch.compile`` the denoiser (UNet) where it applies: False, True (mode "default"), or a mode.
        compile_vae: also compile the VAE decoder.
        fuse_qkv: fuse the attention projections (diffusers ``fuse_qkv_projections``).
        channels_last: None = on CUDA only.
        cudnn_benchmark: None = on CUDA only.
    """

    dtype: str | None = None
    compile: bool | str = False
    compile_vae: bool = False
    fuse_qkv: bool = False
    channels_last: bool | None = None
    cudnn_benchmark: bool | None = None

    def __post_init__(self):
        if self.dtype not in (None, "fp16", "bf16", "fp32"):
            raise ValueError(f"dtype must be 'fp16', 'bf16', 'fp32' or None, got {self.dtype!r}")
        if self.compile not in COMPILE_MODES or isinstance(self.compile, int) and not isinstance(self.compile, bool):
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        for name in ("compile_vae", "fuse_qkv"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("channels_last", "cudnn_benchmark"):
            if getattr(self, name) not in (None, True, False):
                raise TypeError(f"{name} must be a bool or None, got {getattr(self, name)!r}")

    @property
    def compile_mode(self) -> str | None:
        if self.compile is False:
            return None
        return "default" if self.compile is True else self.compile
