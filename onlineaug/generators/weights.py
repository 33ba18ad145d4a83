"""Where a pipeline's weights are on this machine, whether they are complete, and loading them.

A source is a local diffusers folder or a Hugging Face hub id read from the local HF cache (``HF_HUB_CACHE``,
else ``$HF_HOME/hub``); nothing is downloaded unless ``ONLINEAUG_ALLOW_DOWNLOAD=1``. Every check here reads only
small JSON files and file names, never weights, so :func:`inspect_weights` can run in the trainer process before
any producer starts, and a producer's ``from_pretrained`` cannot fail halfway on a partial download.

What a complete folder holds (as ``save_pretrained`` and ``hf download`` write it): ``model_index.json``, a dict
naming the pipeline class and its components, and per component the pipeline needs
(:data:`~.tasks.REQUIRED_COMPONENTS`) its files: ``config.json`` plus weights for the models (``unet``, ``vae``,
``text_encoder``, ``text_encoder_2``; a sharded checkpoint's index and every shard it names), ``tokenizer.json``
or ``vocab.json`` + ``merges.txt`` for tokenizers, ``scheduler_config.json`` for the scheduler.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re

import torch
from diffusers import DiffusionPipeline

from ._progress import quiet_progress_bars
from .tasks import (
    ARCHITECTURE_TITLES,
    DEFAULT_HUB_IDS,
    REQUIRED_COMPONENTS,
    UNET_IN_CHANNELS,
    architecture_of,
    pipeline_class,
)
from .tiny import pipeline_options

ALLOW_DOWNLOAD_ENV = "ONLINEAUG_ALLOW_DOWNLOAD"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TOKENIZER_COMPONENTS = ("tokenizer", "tokenizer_2")
# weight files: <stem>[.<variant>].<ext>, e.g. diffusion_pytorch_model.fp16.safetensors, model.safetensors
_WEIGHT_FILE = re.compile(r"^(?P<stem>diffusion_pytorch_model|model|pytorch_model)(?:\.(?P<variant>[\w-]+))?"
                          r"\.(?P<ext>safetensors|bin)$")
_SHARD_INDEX = re.compile(r"^(?P<stem>diffusion_pytorch_model|model|pytorch_model)(?:\.(?P<variant>[\w-]+))?"
                          r"\.(?P<ext>safetensors|bin)\.index\.json$")


class GeneratorNotFoundError(FileNotFoundError):
    """The generator's weights are not on this machine (or only partly); the message says how to get them."""


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


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Where a spec's weights are: ``location`` is what ``from_pretrained`` gets (a folder or a hub id)."""

    spec: str
    location: str
    local_only: bool
    cache_dir: str
    looked_for: str  # for error messages
    folder: str | None  # where the files are on disk now (the folder or the cached snapshot), if known


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """What :func:`inspect_weights` read from a complete folder."""

    source: WeightsSource
    class_name: str
    architecture: str
    variant: str | None  # "fp16" when the folder holds only the fp16 weight files of some model
    unet_in_channels: int | None


# ----------------------------------------------------------------------------- locating


def looks_like_path(spec: str) -> bool:
    return (spec.startswith((".", "~", os.sep)) or spec.endswith(("/", os.sep))
            or (os.altsep is not None and os.altsep in spec) or not _HUB_ID.match(spec))


def cached_snapshot(repo_id: str, cache_dir: str) -> str | None:
    """The cached snapshot folder of ``repo_id`` holding model_index.json, or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        index = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=cache_dir)
    except ValueError:  # not a valid repo id
        return None
    return os.path.dirname(index) if isinstance(index, str) else None


def not_found_message(spec: str, task: str, architecture: str | None, looked_for: str, cause: str = "") -> str:
    repo = spec if _HUB_ID.match(spec) and "/" in spec else DEFAULT_HUB_IDS[task, architecture or "sd15"]
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


def locate(spec: str, task: str, architecture: str | None = None) -> WeightsSource:
    """Find where ``spec``'s weights are, or raise :class:`GeneratorNotFoundError` saying how to get them.

    ``architecture`` only picks the hub id suggested in the message when ``spec`` is not one.
    """
    path = os.path.abspath(os.path.expanduser(spec))
    cache = hf_cache_dir()
    allow_download = os.environ.get(ALLOW_DOWNLOAD_ENV) == "1"
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            singles = [n for n in sorted(os.listdir(path)) if n.endswith((".safetensors", ".ckpt"))]
            cls = pipeline_class(task, architecture or "sd15").__name__
            hint = (f" It holds single-file checkpoint(s) {singles}: convert them with "
                    f"{cls}.from_single_file(...).save_pretrained(folder)." if singles else "")
            raise GeneratorNotFoundError(
                f"{path} exists but is not a diffusers pipeline folder: it has no model_index.json "
                f"(expected model_index.json with unet/, vae/, text_encoder/, tokenizer/, scheduler/ "
                f"subfolders, as written by save_pretrained or `hf download`).{hint}"
            )
        return WeightsSource(spec, path, True, cache, f"the diffusers folder {path}", path)
    if looks_like_path(spec):
        looked_for = f"a local folder at {path} (does not exist)"
        raise GeneratorNotFoundError(not_found_message(spec, task, architecture, looked_for))
    looked_for = f"a local folder at {path} (does not exist), then hub id {spec!r} in the HF cache {cache}"
    if not allow_download:
        looked_for += f" (downloads off; {ALLOW_DOWNLOAD_ENV} is not 1)"
    snapshot = cached_snapshot(spec, cache)
    if snapshot is None and not allow_download:
        raise GeneratorNotFoundError(not_found_message(spec, task, architecture, looked_for + ": not cached"))
    return WeightsSource(spec, spec, not allow_download, cache, looked_for, snapshot)


# ----------------------------------------------------------------------------- checking


def read_model_index(folder: str) -> dict:
    """``model_index.json`` of ``folder`` as a dict; ``ValueError`` saying what is wrong otherwise."""
    path = os.path.join(folder, "model_index.json")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-download or re-save the pipeline") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path} holds a JSON {type(index).__name__} ({json.dumps(index)[:60]}), not the object "
                         f"naming the pipeline class and its components that save_pretrained writes "
                         f"(e.g. {{\"_class_name\": \"StableDiffusionPipeline\", \"unet\": [\"diffusers\", "
                         f"\"UNet2DConditionModel\"], ...}}); re-download or re-save the pipeline")
    return index


def _component_problems(folder: str, name: str) -> list[str]:
    """What is missing from component ``name``'s subfolder (empty when it is complete)."""
    sub = os.path.join(folder, name)
    if not os.path.isdir(sub):
        return [f"{name}/"]
    files = set(os.listdir(sub))
    if name == "scheduler":
        return [] if "scheduler_config.json" in files else [f"{name}/scheduler_config.json"]
    if name in TOKENIZER_COMPONENTS:
        if "tokenizer.json" in files or {"vocab.json", "merges.txt"} <= files:
            return []
        return [f"{name}/tokenizer.json (or vocab.json + merges.txt)"]
    problems = [] if "config.json" in files else [f"{name}/config.json"]
    weights = [f for f in files if _WEIGHT_FILE.match(f) and os.path.getsize(os.path.join(sub, f)) > 0]
    for index_name in (f for f in files if _SHARD_INDEX.match(f)):
        try:
            with open(os.path.join(sub, index_name), encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            problems.append(f"{name}/{index_name} (unreadable shard index: {err})")
            continue
        missing = [s for s in shards if not os.path.isfile(os.path.join(sub, s))]
        problems += [f"{name}/{s}" for s in missing]
        if not missing:
            weights.append(index_name)
    if not weights:
        problems.append(f"{name}/ weights (diffusion_pytorch_model.safetensors, model.safetensors or .bin, or a "
                        f"sharded *.index.json with its shards; found {sorted(files) or 'nothing'})")
    return problems


def _weight_variants(folder: str, name: str) -> set[str | None]:
    """The variants a model component has weights for (None: the plain files)."""
    found = set()
    for f in os.listdir(os.path.join(folder, name)):
        match = _WEIGHT_FILE.match(f) or _SHARD_INDEX.match(f)
        if match:
            found.add(match["variant"])
    return found


def inspect_weights(source: WeightsSource, task: str) -> WeightsInfo | None:
    """Check, without loading any weights, that ``source`` is a complete pipeline for ``task``.

    Returns what was read (architecture from ``model_index.json``, the weight variant to load), or None when the
    weights are still to be downloaded (``ONLINEAUG_ALLOW_DOWNLOAD=1`` and not cached). Raises
    :class:`GeneratorNotFoundError` naming every missing file, or ``ValueError`` for a folder that does not fit
    ``task`` (a 4-channel UNet for ``inpaint``) or is no Stable Diffusion pipeline.
    """
    if source.folder is None:
        return None
    folder, spec = source.folder, source.spec
    index = read_model_index(folder)
    class_name = str(index.get("_class_name", ""))
    architecture = architecture_of(class_name, index)
    if architecture is None:
        raise ValueError(f"{folder} holds a {class_name or 'pipeline without _class_name'} (model_index.json), "
                         f"not a Stable Diffusion 1.x or SDXL pipeline; task {task!r} needs one of those")
    listed = [name for name in REQUIRED_COMPONENTS[architecture]
              if isinstance(index.get(name), list) and index[name] and index[name][0] is not None]
    unlisted = [name for name in REQUIRED_COMPONENTS[architecture] if name not in listed]
    problems = [f"{name} (not named in model_index.json)" for name in unlisted]
    for name in listed:
        problems += _component_problems(folder, name)
    if problems:
        cause = (f"{folder} is incomplete (a partial download?); {ARCHITECTURE_TITLES[architecture]} "
                 f"{class_name} is missing: {', '.join(problems)}")
        raise GeneratorNotFoundError(not_found_message(spec, task, architecture, source.looked_for, cause=cause))
    unet_config = os.path.join(folder, "unet", "config.json")
    try:
        with open(unet_config, encoding="utf-8") as f:
            in_channels = json.load(f).get("in_channels")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{unet_config} is not a JSON object of UNet settings ({err}); re-download or re-save "
                         f"the pipeline") from None
    check_in_channels(in_channels, spec, task)
    variants = [_weight_variants(folder, name) for name in MODEL_COMPONENTS if name in listed]
    variant = None
    if any(None not in found for found in variants):  # some model has only variant files: load that variant
        common = set.intersection(*[found - {None} for found in variants if None not in found])
        variant = "fp16" if "fp16" in common else (sorted(common)[0] if common else None)
        if variant is None:
            raise GeneratorNotFoundError(not_found_message(
                spec, task, architecture, source.looked_for,
                cause=f"the models in {folder} hold weight files of different variants "
                      f"({dict(zip(MODEL_COMPONENTS, map(sorted, variants)))}); download one variant for all"))
    return WeightsInfo(source, class_name, architecture, variant, in_channels)


def check_in_channels(have, spec: str, task: str) -> None:
    want = UNET_IN_CHANNELS[task]
    if have != want:
        fits = [t for t, n in UNET_IN_CHANNELS.items() if n == have]
        guess = f"these weights are for {' or '.join(fits)}" if fits else "no task here takes that"
        raise ValueError(
            f"{spec!r} has a UNet with in_channels={have}, but task {task!r} needs in_channels={want} "
            f"(8: instruct-pix2pix; 9: inpaint = 4 noisy latent + 1 mask + 4 masked-image latent; 4: img2img, "
            f"text2img); {guess}"
        )


def describe_weights(spec: str) -> str:
    """One line saying what ``spec`` (a folder or a hub id) is, without loading or checking anything heavy."""
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path):
        index = os.path.join(path, "model_index.json")
        kind = _read_class_name(index) if os.path.isfile(index) else "no model_index.json"
        return f"local folder {path} ({kind})"
    if looks_like_path(spec):
        return f"local folder {path} (missing)"
    cache = hf_cache_dir()
    state = "not cached" if cached_snapshot(spec, cache) is None else "cached"
    return f"hub id {spec} (HF cache at {cache}, {state})"


def _read_class_name(index_path: str) -> str:
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as err:
        return f"unreadable model_index.json: {err}"
    if not isinstance(index, dict):
        return f"model_index.json is a {type(index).__name__}, not an object"
    return str(index.get("_class_name", "unknown pipeline class"))


# ----------------------------------------------------------------------------- loading


def from_pretrained(spec: str, task: str, *, dtype: torch.dtype, architecture: str | None = None,
                    progress: bool = False) -> DiffusionPipeline:
    """Check ``spec``'s files (:func:`inspect_weights`), then ``from_pretrained`` the pipeline class of ``task``
    and the folder's architecture. ``architecture`` is the fallback for a hub id still to be downloaded."""
    source = locate(spec, task, architecture)
    info = inspect_weights(source, task)
    architecture = info.architecture if info is not None else (architecture or "sd15")
    cls = pipeline_class(task, architecture)
    try:
        with contextlib.nullcontext() if progress else quiet_progress_bars():
            pipe = cls.from_pretrained(
                source.location,
                dtype=dtype,
                variant=info.variant if info is not None else None,
                local_files_only=source.local_only,
                cache_dir=source.cache_dir,
                # without accelerate diffusers falls back (and logs a long notice); say it up front
                low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
                **pipeline_options(architecture),
            )
    except OSError as err:  # diffusers/huggingface_hub report missing files as OSError subclasses
        message = not_found_message(spec, task, architecture, source.looked_for, cause=str(err))
        raise GeneratorNotFoundError(message) from err
    check_in_channels(pipe.unet.config.in_channels, spec, task)  # a downloaded hub id is checked only now
    return pipe
