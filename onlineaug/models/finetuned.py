"""Fine-tuned weights on top of a diffusion pipeline: LoRA and textual inversion, loaded through diffusers.

**LoRA** (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022): a layer's weight becomes
``W + scale * (alpha / r) * B A`` with ``A`` (r x in) and ``B`` (out x r). :func:`load_lora` loads a file or a
folder with ``pipe.load_lora_weights`` (diffusers/PEFT, kohya and the older attention-processor formats), folds
``B A`` into ``W`` with ``pipe.fuse_lora(lora_scale=scale)`` and removes the adapter layers, so the UNet that is
then compiled is a plain one. Diff-Mix's ``pytorch_lora_weights.safetensors`` (written by ``unet.save_attn_procs``
in diffusers 0.25: keys ``...attn1.processor.to_q_lora.down.weight``) is no longer read by current diffusers,
which skips it without an error; it is converted here to the PEFT layout first (``down`` -> ``lora_A``, ``up`` ->
``lora_B``, ``to_out`` -> ``to_out.0``; no alphas, i.e. ``alpha = r``, as those processors had).

**Textual inversion** (Gal et al., "An Image is Worth One Word", ICLR 2023): new token embeddings for the text
encoder(s). :func:`read_textual_inversion` accepts

- Diff-Mix's file: ``{"learned_embeds_dict": {token: (768,)}, "name2placeholder": {class: token},
  "placeholder2name": {token: class}}`` (torch);
- a plain ``{token: (d,) or (n, d)}`` file (torch or safetensors): DA-Fusion's merged file, diffusers'
  ``learned_embeds.safetensors``, one or many tokens;
- Automatic1111's ``{"string_to_param": {"*": (n, d)}, "name": token}``;
- SDXL's two-encoder file ``{"clip_l": (n, 768), "clip_g": (n, 1280)}`` (the token is the file's stem), or the
  same with ``{token: tensor}`` dicts under both keys.

and :func:`load_textual_inversion` adds every token with ``pipe.load_textual_inversion(embeddings, token=tokens)``
(for SDXL once per text encoder). ``class_tokens`` maps class names to tokens: ``name2placeholder`` when the file
has one, else each token written ``<name>`` (underscores read as spaces: ``<red_winged_blackbird>`` serves
"red winged blackbird").
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Mapping

import torch

LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
TEXTUAL_INVERSION_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
ADAPTER_NAME = "onlineaug"
# diffusers <= 0.25 attention-processor LoRA keys (unet.save_attn_procs), e.g.
# down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight
_ATTN_PROCS_KEY = re.compile(r"^(?:unet\.)?(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora"
                             r"\.(?P<which>down|up)\.weight$")
_BRACKETED = re.compile(r"^<(?P<name>[^<>]+)>$")


# ----------------------------------------------------------------------------- files


def _resolve_file(path: str, names: tuple[str, ...], what: str) -> str:
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(path):
        for name in names:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{what} folder {path} holds none of {list(names)} (found {sorted(os.listdir(path))});"
                                f" pass the weight file itself")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path} does not exist")
    return path


def lora_file(path: str) -> str:
    """The LoRA weight file ``path`` names (a file, or a folder holding ``pytorch_lora_weights.*``)."""
    return _resolve_file(path, LORA_WEIGHT_NAMES, "LoRA")


def textual_inversion_file(path: str) -> str:
    """The embedding file ``path`` names (a file, or a folder holding diffusers' ``learned_embeds.*``)."""
    return _resolve_file(path, TEXTUAL_INVERSION_NAMES, "textual inversion")


def _load_tensors(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling errors have no common type
        raise ValueError(f"{path} is not a torch file of tensors, dicts and strings (torch.load with "
                         f"weights_only=True failed: {error})") from error
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a dict")
    return dict(state)


# ----------------------------------------------------------------------------- LoRA


def convert_attn_procs_lora(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The PEFT-layout UNet LoRA of an attention-processor state dict (Diff-Mix's), or None if it is not one."""
    if not state or not all(_ATTN_PROCS_KEY.match(k) for k in state):
        return None
    converted = {}
    for key, value in state.items():
        match = _ATTN_PROCS_KEY.match(key)
        proj = "to_out.0" if match["proj"] == "to_out" else match["proj"]
        which = "lora_A" if match["which"] == "down" else "lora_B"
        converted[f"unet.{match['module']}.{proj}.{which}.weight"] = value
    return converted


@contextlib.contextmanager
def _quiet_unmatched_components() -> Iterator[None]:
    """Drop diffusers' "No LoRA keys associated to <component>" notices: a UNet-only LoRA (Diff-Mix's) logs one
    per text encoder. :func:`load_lora` checks itself that some component took the weights."""
    class Drop(logging.Filter):
        def filter(self, record):
            return "No LoRA keys associated to" not in record.getMessage()

    loggers = [logging.getLogger(name) for name in ("diffusers.loaders.peft", "diffusers.loaders.lora_base")]
    drop = Drop()
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def load_lora(pipe, path: str, scale: float = 1.0) -> tuple[str, ...]:
    """Load the LoRA at ``path`` into ``pipe``, fuse it with ``scale`` and drop the adapter layers.

    Returns the components that took weights (e.g. ``("unet",)``). Raises ``FileNotFoundError`` for a missing
    file and ``ValueError`` for a file none of whose keys match the pipeline.
    """
    file = lora_file(path)
    keys_source: Mapping | str = file
    state = _load_tensors(file)
    converted = convert_attn_procs_lora(state)
    with _quiet_unmatched_components():
        if converted is not None:
            keys_source = converted
            pipe.load_lora_weights(converted, adapter_name=ADAPTER_NAME)
        else:
            pipe.load_lora_weights(os.path.dirname(file), weight_name=os.path.basename(file),
                                   adapter_name=ADAPTER_NAME)
    components = tuple(name for name, adapters in pipe.get_list_adapters().items() if ADAPTER_NAME in adapters)
    if not components:
        sample = sorted(keys_source if isinstance(keys_source, Mapping) else state)[:3]
        raise ValueError(f"no LoRA weights of {file} matched {type(pipe).__name__}'s "
                         f"{', '.join(pipe._lora_loadable_modules)} (keys such as {sample}); is it a LoRA for "
                         f"another architecture?")
    pipe.fuse_lora(components=list(components), lora_scale=float(scale), adapter_names=[ADAPTER_NAME])
    pipe.unload_lora_weights()  # the fused weights stay; the PEFT layers go (plain Linear layers to compile)
    return components


# ----------------------------------------------------------------------------- textual inversion


@dataclasses.dataclass(frozen=True)
class TextualInversion:
    """The tokens of one embedding file and their vectors, per text encoder."""

    tokens: tuple[str, ...]
    embeddings: tuple[torch.Tensor, ...]  # for text_encoder: (d,) or (n, d) per token
    embeddings_2: tuple[torch.Tensor, ...] | None  # for SDXL's text_encoder_2, else None
    class_tokens: dict[str, str]  # class name -> token
    path: str


def _check_embedding(path: str, token, value) -> torch.Tensor:
    if not isinstance(token, str) or not token:
        raise ValueError(f"{path}: token {token!r} is not a non-empty string")
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() not in (1, 2):
        what = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{path}: the embedding of {token!r} is {what}; expected a float tensor (d,) or (n, d)")
    return value.detach().float()


def _token_dict(path: str, value, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{path}: {what} must be a non-empty dict token -> tensor, got {type(value).__name__}")
    return {token: _check_embedding(path, token, emb) for token, emb in value.items()}


def class_tokens_of(tokens, name2placeholder: Mapping | None, path: str = "") -> dict[str, str]:
    """Class name -> token: ``name2placeholder`` if given, else every ``<name>`` token (underscores as spaces)."""
    if name2placeholder:
        unknown = sorted(set(name2placeholder.values()) - set(tokens))
        if unknown:
            raise ValueError(f"{path}: name2placeholder names tokens {unknown} that learned_embeds_dict lacks")
        return {str(name): token for name, token in name2placeholder.items()}
    mapping = {}
    for token in tokens:
        match = _BRACKETED.match(token)
        if match:
            name = match["name"].replace("_", " ")
            if name in mapping:
                raise ValueError(f"{path}: tokens {mapping[name]!r} and {token!r} both read as class {name!r}")
            mapping[name] = token
    return mapping


def read_textual_inversion(path: str) -> TextualInversion:
    """Parse an embedding file in any of the formats of this module's docstring (nothing is loaded yet)."""
    file = textual_inversion_file(path)
    state = _load_tensors(file)
    stem = os.path.basename(file).split(".")[0]
    name2placeholder = None
    embeddings_2 = None
    if "learned_embeds_dict" in state:  # Diff-Mix
        embeds = _token_dict(file, state["learned_embeds_dict"], "learned_embeds_dict")
        name2placeholder = state.get("name2placeholder") or None
        if name2placeholder is not None and not isinstance(name2placeholder, Mapping):
            raise ValueError(f"{file}: name2placeholder must be a dict class name -> token")
    elif "string_to_param" in state:  # Automatic1111
        token = state.get("name") or stem
        embeds = {token: _check_embedding(file, token, state["string_to_param"].get("*"))}
    elif set(state) == {"clip_l", "clip_g"}:  # SDXL: one embedding per text encoder
        parts = []
        for key in ("clip_l", "clip_g"):
            value = state[key]
            parts.append(_token_dict(file, value, key) if isinstance(value, Mapping)
                         else {stem: _check_embedding(file, stem, value)})
        if list(parts[0]) != list(parts[1]):
            raise ValueError(f"{file}: clip_l has tokens {list(parts[0])} but clip_g has {list(parts[1])}")
        embeds, embeddings_2 = parts[0], tuple(parts[1].values())
    elif state and all(isinstance(v, torch.Tensor) for v in state.values()):  # {token: tensor}
        embeds = _token_dict(file, state, "the file")
    else:
        raise ValueError(f"{file} is no textual-inversion file this loader knows: keys {sorted(state)[:8]}; "
                         f"expected {{token: tensor}}, Diff-Mix's {{'learned_embeds_dict', 'name2placeholder', ...}}, "
                         f"Automatic1111's {{'string_to_param', 'name'}} or SDXL's {{'clip_l', 'clip_g'}}")
    tokens = tuple(embeds)
    return TextualInversion(tokens, tuple(embeds.values()), embeddings_2,
                            class_tokens_of(tokens, name2placeholder, file), file)


def _encoder_width(text_encoder) -> int:
    return int(text_encoder.get_input_embeddings().weight.shape[-1])


def load_textual_inversion(pipe, path: str) -> TextualInversion:
    """Add the tokens of ``path`` to ``pipe``'s tokenizer(s) and text encoder(s); return what was added."""
    ti = read_textual_inversion(path)
    encoders = [(pipe.tokenizer, pipe.text_encoder, ti.embeddings)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        if ti.embeddings_2 is None:
            widths = sorted({int(e.shape[-1]) for e in ti.embeddings})
            raise ValueError(
                f"{ti.path} holds one embedding per token (width {widths}), but {type(pipe).__name__} has two text "
                f"encoders (widths {_encoder_width(pipe.text_encoder)} and {_encoder_width(pipe.text_encoder_2)}): "
                f"an SDXL embedding file needs both, as {{'clip_l': tensor, 'clip_g': tensor}} (one {{token: "
                f"tensor}} dict under each key for several tokens)")
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2, ti.embeddings_2))
    elif ti.embeddings_2 is not None:
        raise ValueError(f"{ti.path} is an SDXL embedding file (clip_l + clip_g) but {type(pipe).__name__} is an "
                         f"SD 1.x pipeline with one text encoder; use an SDXL model or an SD 1.x embedding")
    for tokenizer, encoder, embeddings in encoders:
        width = _encoder_width(encoder)
        wrong = {t: tuple(e.shape) for t, e in zip(ti.tokens, embeddings) if e.shape[-1] != width}
        if wrong:
            raise ValueError(f"{ti.path}: embeddings {wrong} do not fit {type(encoder).__name__} (width {width})")
        taken = sorted(t for t in ti.tokens if t in tokenizer.get_vocab())
        if taken:
            raise ValueError(f"{ti.path}: tokens {taken} are already in the tokenizer's vocabulary (loaded twice, "
                             f"or a word of the vocabulary); rename them in the file")
        pipe.load_textual_inversion(list(embeddings), token=list(ti.tokens), tokenizer=tokenizer,
                                    text_encoder=encoder)
    return ti
