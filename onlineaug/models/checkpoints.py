"""Where a transformers model's weights come from: random weights built in process, a local folder, or a hub
id in the local Hugging Face cache.

The perception models (CLIP, CLIPSeg, GroundingDINO, SAM) are transformers checkpoints: a folder with
``config.json``, the weights (``model.safetensors``, ``pytorch_model.bin`` or a sharded index) and, for models
that read text, the tokenizer files. :func:`locate` finds that folder without loading anything (so the trainer
can check every model before a producer starts), and raises :class:`ModelNotFoundError` saying how to get the
weights. Nothing is downloaded unless ``ONLINEAUG_ALLOW_DOWNLOAD=1``, as for the diffusion pipelines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Sequence

import torch

from onlineaug.generators.weights import ALLOW_DOWNLOAD_ENV, _HUB_ID, hf_cache_dir
from onlineaug.generators.weights import looks_like_path as _looks_like_path
from onlineaug.generators.seeding import seeded
from onlineaug.models.spec import LoadPolicy

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Tokenizer files, as alternatives: a fast tokenizer's tokenizer.json, or the slow tokenizer's own files.
CLIP_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
BERT_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.txt",))
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class ModelNotFoundError(FileNotFoundError):
    """A model's weights are not on this machine; the message says how to get them."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A located checkpoint: pass ``location`` and ``from_pretrained_kwargs`` to ``X.from_pretrained``."""

    location: str  # a folder on disk, or a hub id to download (only with ONLINEAUG_ALLOW_DOWNLOAD=1)
    folder: str | None  # where the files are now (None: not downloaded yet)
    cache_dir: str
    local_only: bool

    @property
    def from_pretrained_kwargs(self) -> dict:
        return {"local_files_only": self.local_only, "cache_dir": self.cache_dir}

    def read_json(self, name: str) -> dict | None:
        """``name`` (e.g. ``preprocessor_config.json``) from the folder, or None when it has none."""
        if self.folder is None or not os.path.isfile(os.path.join(self.folder, name)):
            return None
        path = os.path.join(self.folder, name)
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except ValueError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); re-download or re-save the model") from None

    def image_processor_config(self) -> dict | None:
        """The image processor's settings: ``preprocessor_config.json`` (hub checkpoints), else the
        ``image_processor`` entry of ``processor_config.json`` (what transformers 5 ``save_pretrained`` writes)."""
        config = self.read_json("preprocessor_config.json")
        if config is not None:
            return config
        return (self.read_json("processor_config.json") or {}).get("image_processor")


def policy_dtype(policy: LoadPolicy, device: torch.device) -> torch.dtype:
    """The dtype :class:`LoadPolicy` asks for: its ``dtype``, else float16 on CUDA and float32 elsewhere."""
    if policy.dtype is not None:
        return _DTYPES[policy.dtype]
    return torch.float16 if device.type == "cuda" else torch.float32


@contextlib.contextmanager
def building(seed: int, name: str, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Build random weights reproducibly from ``(seed, name)``, directly on ``device`` in ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device, seeded(seed, f"models/{name}", device):
            yield
    finally:
        torch.set_default_dtype(previous)


def not_found_message(what: str, source: str, default_repo: str, looked_for: str, cause: str = "") -> str:
    """How to get the weights of ``what`` (e.g. ``"CLIP (role 'filter')"``), naming the commands to run."""
    repo = source if _HUB_ID.match(source) and "/" in source else default_repo
    local = os.path.join("/path/to", repo.split("/")[-1])
    lines = [
        f"{what} weights not found (source={source!r}).",
        f"Looked for: {looked_for}.",
        "To get them, do one of:",
        f"  - download once into the Hugging Face cache, on a machine with internet: huggingface-cli download "
        f"{repo} (or: hf download {repo}); if that cache is elsewhere here, set HF_HOME=/path/to/cache (the "
        f"folder whose hub/ holds models--{repo.replace('/', '--')}), or HF_HUB_CACHE to that hub/ folder;",
        f"  - or download into a folder (huggingface-cli download {repo} --local-dir {local}) and pass that "
        f"folder as the source;",
        f"  - set {ALLOW_DOWNLOAD_ENV}=1 to let this process download into the HF cache;",
        "  - for tests without weights, use 'tiny' (or 'full-random' for benchmarks).",
    ]
    if cause:
        lines.append(f"Underlying error: {cause}")
    return "\n".join(lines)


def _missing_files(folder: str, tokenizer_files: Sequence[Sequence[str]]) -> list[str]:
    names = set(os.listdir(folder))
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not names.intersection(WEIGHT_FILES):
        missing.append(f"weights (one of {', '.join(WEIGHT_FILES)})")
    if tokenizer_files and not any(set(group) <= names for group in tokenizer_files):
        missing.append("tokenizer files (" + " or ".join("+".join(group) for group in tokenizer_files) + ")")
    return missing


def _cached_snapshot(repo_id: str, cache_dir: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except ValueError:  # not a valid repo id
        return None
    return os.path.dirname(config) if isinstance(config, str) else None


def locate(source: str, *, what: str, default_repo: str,
           tokenizer_files: Sequence[Sequence[str]] = ()) -> Checkpoint:
    """Find the checkpoint ``source`` names (a folder, else a hub id in the HF cache) without loading it.

    Raises :class:`ModelNotFoundError` when the folder or cached snapshot is missing, or lacks ``config.json``,
    the weights or (when ``tokenizer_files`` is given) the tokenizer.
    """
    path = os.path.abspath(os.path.expanduser(source))
    cache = hf_cache_dir()
    allow_download = os.environ.get(ALLOW_DOWNLOAD_ENV) == "1"
    if os.path.isdir(path):
        folder, looked_for = path, f"the folder {path}"
    elif _looks_like_path(source):
        raise ModelNotFoundError(not_found_message(what, source, default_repo,
                                                   f"a local folder at {path} (does not exist)"))
    else:
        looked_for = f"a local folder at {path} (does not exist), then hub id {source!r} in the HF cache {cache}"
        folder = _cached_snapshot(source, cache)
        if folder is None:
            if allow_download:
                return Checkpoint(source, None, cache, local_only=False)
            raise ModelNotFoundError(not_found_message(
                what, source, default_repo, f"{looked_for}: not cached ({ALLOW_DOWNLOAD_ENV} is not 1)"))
    missing = _missing_files(folder, tokenizer_files)
    if missing:
        cause = (f"{folder} lacks {'; '.join(missing)} (a partial download, or not a transformers checkpoint "
                 f"saved with save_pretrained?)")
        raise ModelNotFoundError(not_found_message(what, source, default_repo, looked_for, cause))
    return Checkpoint(folder, folder, cache, local_only=True)


def describe_source(source: str, name: str) -> str:
    """One line for logs about a real-weight ``source`` of model ``name`` (never loads anything)."""
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.isdir(path):
        return f"{name} from local folder {path}"
    if _looks_like_path(source):
        return f"{name} from local folder {path} (missing)"
    cache = hf_cache_dir()
    state = "cached" if _cached_snapshot(source, cache) is not None else "not cached"
    return f"{name} from hub id {source} (HF cache at {cache}, {state})"
