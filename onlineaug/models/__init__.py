"""Models by role: what a recipe's producer runs (diffusion pipelines, CLIP filters, segmenters).

A recipe declares its models with :meth:`~onlineaug.recipes.Recipe.model_roles` (role -> :class:`ModelRole`);
the loader resolves the user's choices with :func:`resolve_models` (``generator=`` names the main role,
``models=`` overrides any role), checks that every one is on this machine with :func:`ensure_available` before
any process starts, and each producer builds them with :func:`load_model` under one :class:`LoadPolicy`.

Sources: ``"tiny"`` (tiny random weights built in process), ``"full-random"`` (the real architecture's size,
random weights: honest FLOPs for benchmarks), a local folder, a hub id read from the local Hugging Face cache
(``HF_HOME`` / ``HF_HUB_CACHE``; nothing is downloaded unless ``ONLINEAUG_ALLOW_DOWNLOAD=1``), or ``"dataset"``
for masks the dataset provides.
"""

from __future__ import annotations

from typing import Mapping

import torch

from onlineaug.models.spec import (
    ARCHITECTURES,
    DIFFUSION_KINDS,
    KINDS,
    RANDOM_SOURCES,
    SEGMENTER_KINDS,
    LoadPolicy,
    ModelRole,
    ModelSpec,
)

__all__ = ["ARCHITECTURES", "DIFFUSION_KINDS", "KINDS", "RANDOM_SOURCES", "SEGMENTER_KINDS", "LoadPolicy",
           "ModelRole", "ModelSpec", "describe_model", "ensure_available", "load_model", "resolve_models"]


def resolve_models(roles: Mapping[str, ModelRole], main_role: str | None, generator,
                   models: Mapping | None) -> dict[str, ModelSpec]:
    """The spec of every role: ``models[role]``, else ``generator`` for the main role, else a default.

    Roles other than the main one that ``models`` does not name follow ``generator`` when it is a random-weight
    source (``"tiny"``/``"full-random"``: a test or benchmark run stays self-contained), and load their
    role's default otherwise.
    """
    models = dict(models or {})
    unknown = sorted(set(models) - set(roles))
    if unknown:
        valid = ", ".join(sorted(roles)) or "none (this recipe runs no model)"
        raise ValueError(f"models names unknown roles {unknown}; this recipe's roles: {valid}")
    generator_spec = ModelSpec.parse(generator, main_role or "generator") if generator is not None else None
    resolved = {}
    for role, info in roles.items():
        if role in models:
            spec = ModelSpec.parse(models[role], role)
        elif role == main_role and generator_spec is not None:
            spec = generator_spec
        elif generator_spec is not None and generator_spec.is_random and info.kind != "dataset-masks":
            spec = ModelSpec(generator_spec.random_weights[0])
        else:
            spec = ModelSpec(info.default)
        resolved[role] = spec.with_role_defaults(info)
    return resolved


def ensure_available(role_name: str, role: ModelRole, spec: ModelSpec, dataset=None) -> None:
    """Raise now, in the calling process, what :func:`load_model` would raise for missing weights.

    ``dataset``: the training dataset (a ``dataset-masks`` segmenter checks that it provides masks).
    """
    if role.kind in DIFFUSION_KINDS:
        from onlineaug.models.diffusion_checks import ensure_diffusion_available

        ensure_diffusion_available(role_name, role, spec)
        return
    if role.kind in PERCEPTION_KINDS:
        _ensure_perception(role_name, role, spec, dataset)
        return
    raise NotImplementedError(f"model kind {role.kind!r} (role {role_name!r}) is not available yet")


def describe_model(role: ModelRole, spec: ModelSpec) -> str:
    """One line for logs: what fills this role (never loads weights)."""
    if role.kind in DIFFUSION_KINDS:
        from onlineaug.models.diffusion import describe_diffusion

        return describe_diffusion(role, spec)
    if role.kind in PERCEPTION_KINDS:
        return _describe_perception(role, spec)
    return f"{role.kind} from {spec.source}"


def load_model(role: ModelRole, spec: ModelSpec, *, device: torch.device | str, policy: LoadPolicy = LoadPolicy(),
               seed: int = 0, dataset=None):
    """Build the model for ``role`` from ``spec`` on ``device`` under ``policy``.

    Returns a diffusers pipeline for the diffusion kinds (:func:`onlineaug.models.diffusion.load_diffusion`: with
    ``pipe.kind``, ``pipe.architecture``, ``pipe.class_tokens``, ``pipe.placeholder_tokens``), a
    :class:`~onlineaug.models.clip.ClipEmbedder` for ``"clip"``, and a segmenter (``segment(images, texts,
    indices)``) for the segmenter kinds.
    """
    if role.kind in DIFFUSION_KINDS:
        from onlineaug.models.diffusion import load_diffusion

        return load_diffusion(role, spec, device=device, policy=policy, seed=seed)
    if role.kind in PERCEPTION_KINDS:
        return _load_perception(role, spec, device=device, policy=policy, seed=seed, dataset=dataset)
    raise NotImplementedError(f"model kind {role.kind!r} is not available yet")


# ----------------------------------------------------------------------------- perception kinds (CLIP, segmenters)
PERCEPTION_KINDS = ("clip",) + SEGMENTER_KINDS


def _check_no_fine_tuning(role: ModelRole, spec: ModelSpec) -> None:
    for name in ("lora", "textual_inversion"):
        if getattr(spec, name) is not None:
            raise ValueError(f"{name}={getattr(spec, name)!r} was given for a {role.kind!r} model; LoRA and textual "
                             f"inversion apply to the diffusion pipelines only")


def _load_perception(role: ModelRole, spec: ModelSpec, *, device, policy: LoadPolicy, seed: int, dataset):
    from onlineaug.devices import parse_device

    _check_no_fine_tuning(role, spec)
    device = parse_device(device)
    if role.kind == "clip":
        from onlineaug.models.clip import load_clip

        return load_clip(role, spec, device=device, policy=policy, seed=seed)
    from onlineaug.models.segmenters import load_segmenter

    return load_segmenter(role, spec, device=device, policy=policy, seed=seed, dataset=dataset)


def _ensure_perception(role_name: str, role: ModelRole, spec: ModelSpec, dataset) -> None:
    _check_no_fine_tuning(role, spec)
    if role.kind == "clip":
        from onlineaug.models.clip import ensure_clip_available

        ensure_clip_available(role_name, role, spec)
        return
    from onlineaug.models.segmenters import ensure_segmenter_available

    ensure_segmenter_available(role_name, role, spec, dataset=dataset)


def _describe_perception(role: ModelRole, spec: ModelSpec) -> str:
    if role.kind == "clip":
        from onlineaug.models.clip import describe_clip

        return describe_clip(spec)
    from onlineaug.models.segmenters import describe_segmenter

    return describe_segmenter(role, spec)
