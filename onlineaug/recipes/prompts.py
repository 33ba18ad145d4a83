"""Prompt embeddings computed once per pipeline and prompt text, then reused by every pipeline call.

A producer calls its pipeline thousands of times with the same few prompts (DiffuseMix's nine filters, GenMix's
templates); encoding them again on every call runs the text encoder (CLIP ViT-L/14: 123M parameters) on
``3 x batch`` sequences per call for nothing. :func:`prompt_embeddings` returns the text encoder's hidden states
for a list of texts exactly as the pipeline's own ``encode_prompt`` computes them (same tokenizer, padding,
truncation, textual-inversion tokens and dtype), encoding only the texts it has not seen for that pipeline, all in
one call. Pass them as ``prompt_embeds=``/``negative_prompt_embeds=`` instead of ``prompt=``.

The cache is keyed by pipeline (weakly: it goes when the pipeline does) and by text; it is dropped when the
pipeline's text encoder or tokenizer is replaced or the tokenizer grows (new textual-inversion tokens).
Pipelines whose ``encode_prompt`` needs more than one text encoder (SDXL: pooled embeddings too) are not cached:
:func:`prompt_embeddings` returns None and the caller passes the prompt strings.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Sequence

import torch

# The SD 1.x pipelines (one CLIP text encoder, prompt_embeds of shape (n, 77, d)) whose encoding is cached.
CACHED_PIPELINES = ("StableDiffusionInstructPix2PixPipeline", "StableDiffusionPipeline",
                    "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")


@dataclasses.dataclass
class _Cache:
    key: tuple
    embeddings: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # text -> (seq, dim)
    encoder_calls: int = 0  # text-encoder calls made to fill it (for tests and logs)


_CACHES: "weakref.WeakKeyDictionary[Any, _Cache]" = weakref.WeakKeyDictionary()


def cacheable(pipe: Any) -> bool:
    """Whether :func:`prompt_embeddings` caches for this pipeline (an SD 1.x pipeline of :data:`CACHED_PIPELINES`)."""
    names = {cls.__name__ for cls in type(pipe).__mro__}
    return bool(names & set(CACHED_PIPELINES)) and getattr(pipe, "text_encoder", None) is not None


def _key(pipe: Any) -> tuple:
    tokenizer = pipe.tokenizer
    return id(pipe.text_encoder), id(tokenizer), len(tokenizer)


def _encode(pipe: Any, texts: list[str]) -> torch.Tensor:
    """The pipeline's own prompt encoding, without guidance: (len(texts), seq, dim) in the text encoder's dtype."""
    device = pipe._execution_device
    if hasattr(pipe, "encode_prompt"):  # StableDiffusion(Img2Img|Inpaint)Pipeline: (prompt_embeds, negative)
        return pipe.encode_prompt(texts, device, 1, False)[0]
    return pipe._encode_prompt(texts, device, 1, False)  # InstructPix2Pix: prompt_embeds only without guidance


def prompt_embeddings(pipe: Any, texts: Sequence[str]) -> torch.Tensor | None:
    """The text-encoder hidden states of ``texts`` for ``pipe``, (len(texts), seq, dim); None if not cacheable.

    Texts not yet cached for this pipeline are encoded together in one text-encoder call; the rest are read
    from the cache. Rows follow ``texts`` (repeats allowed).
    """
    if not cacheable(pipe):
        return None
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError(f"prompt texts must be strings, got {[type(t).__name__ for t in texts]}")
    key = _key(pipe)
    cache = _CACHES.get(pipe)
    if cache is None or cache.key != key:
        cache = _CACHES[pipe] = _Cache(key)
    missing = list(dict.fromkeys(t for t in texts if t not in cache.embeddings))
    if missing:
        with torch.inference_mode():
            encoded = _encode(pipe, missing)
        cache.encoder_calls += 1
        for text, row in zip(missing, encoded):
            cache.embeddings[text] = row
    return torch.stack([cache.embeddings[t] for t in texts])


def encoder_calls(pipe: Any) -> int:
    """How many text-encoder calls :func:`prompt_embeddings` has made for ``pipe`` (0 if none)."""
    cache = _CACHES.get(pipe)
    return cache.encoder_calls if cache is not None else 0
