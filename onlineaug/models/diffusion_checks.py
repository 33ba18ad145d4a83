"""What the trainer checks about a diffusion role before any producer starts, without importing diffusers.

Importing diffusers (and, through it, transformers and ``torch._dynamo``) takes seconds; a loader built with
random weights (``"tiny"``, ``"full-random"``) and no scheduler settings should not pay that in the training
process, which never runs a pipeline. diffusers is imported here only when a check needs a class: a local or
cached checkpoint to inspect, or ``scheduler_config`` entries to match against a scheduler's settings.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from onlineaug.models.spec import ModelRole, ModelSpec

# scheduler name -> diffusers class name (the classes: onlineaug.models.diffusion.SCHEDULERS)
SCHEDULER_CLASS_NAMES = {
    "euler_a": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "edm_euler": "EDMEulerScheduler",
}
RANDOM_SOURCES = ("tiny", "full-random")


def role_architecture(role: ModelRole, spec: ModelSpec) -> str:
    """What a random-weight spec builds: the architecture it names (``"tiny-sdxl"``), else the role's."""
    random = spec.random_weights
    return (random[1] if random is not None and random[1] is not None else role.architecture) or "sd15"


def source_and_architecture(role: ModelRole, spec: ModelSpec) -> tuple[str, str]:
    """``("tiny" | "full-random" | a folder or hub id, architecture)``."""
    random = spec.random_weights
    return (random[0] if random is not None else spec.source), role_architecture(role, spec)


def scheduler_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, SCHEDULER_CLASS_NAMES[name])


def scheduler_settings(cls) -> list[str]:
    """The config entries scheduler class ``cls`` takes (its constructor's arguments)."""
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]


def check_scheduler(name: str | None, overrides: Mapping | None, stored: type | None = None) -> type | None:
    """The scheduler class ``name`` means (``stored`` for None); ``ValueError`` for an unknown name or for
    ``overrides`` naming a setting that class does not take (with the valid ones). None when not yet known, or
    when nothing needs the class (a known name without overrides: diffusers is not imported)."""
    if name is not None and name not in SCHEDULER_CLASS_NAMES:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULER_CLASS_NAMES)} or None")
    if name is not None and not overrides and stored is None:
        return None
    cls = scheduler_class(name) if name is not None else stored
    if cls is not None:
        unknown = sorted(set(overrides or {}) - set(scheduler_settings(cls)))
        if unknown:
            raise ValueError(f"scheduler_config keys {unknown} are not settings of {cls.__name__}; valid: "
                             f"{', '.join(scheduler_settings(cls))}")
    return cls


def ensure_diffusion_available(role_name: str, role: ModelRole, spec: ModelSpec) -> None:
    """Raise now what :func:`~onlineaug.models.diffusion.load_diffusion` would raise for missing or mismatched
    files (no weights loaded).

    Checks the folder or cached snapshot (a dict ``model_index.json`` naming a Stable Diffusion 1.x or SDXL
    pipeline, every component the pipeline needs with its config and weight files, a UNet whose input channels
    fit the kind), the scheduler settings, and that the LoRA and textual-inversion files exist.
    """
    from onlineaug.models.finetuned import lora_file, read_textual_inversion

    source, architecture = source_and_architecture(role, spec)
    where = f"models[{role_name!r}]"
    if source not in RANDOM_SOURCES:
        from onlineaug.generators.weights import inspect_weights, locate

        inspect_weights(locate(source, role.kind, architecture), role.kind)
    try:
        check_scheduler(role.scheduler, role.scheduler_config)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    # the embedding file is small: parse it now, so a wrong format fails here and not in every producer
    for check, path, what in ((lora_file, spec.lora, "lora"),
                              (read_textual_inversion, spec.textual_inversion, "textual_inversion")):
        if path is not None:
            try:
                check(path)
            except (FileNotFoundError, ValueError) as error:
                raise type(error)(f"{where}[{what!r}]: {error}") from None


__all__ = ["RANDOM_SOURCES", "SCHEDULER_CLASS_NAMES", "check_scheduler", "ensure_diffusion_available",
           "role_architecture", "scheduler_settings", "source_and_architecture"]
