"""A CLIP tokenizer generated in code, for pipelines whose weights are random.

The real Stable Diffusion / InstructPix2Pix (Brooks et al., CVPR 2023) tokenizer is CLIP's byte-level
BPE with 49,408 entries: the 256 byte symbols, the same 256 with the end-of-word suffix ``</w>``, 48,894
merges, then ``<|startoftext|>`` and ``<|endoftext|>``. We write the same layout without the merges (no
download needed): 256 + 256 + 2 = 514 entries, a merges file holding only the ``#version: 0.2`` header.
Every text still tokenizes (into single bytes), so ids always lie in ``[0, 514)`` and the start/end
tokens are the two largest ids, as in the real vocabulary.
"""
from __future__ import annotations

import json
import os
import tempfile

from transformers import CLIPTokenizer

MODEL_MAX_LENGTH = 77  # CLIP's context length, used by every SD 1.x pipeline
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def bytes_to_unicode() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) uses for the bytes 0..255."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def generated_vocab() -> dict[str, int]:
    """Byte symbols, byte symbols + ``</w>``, then the start and end tokens (ids 512 and 513)."""
    symbols = bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


VOCAB_SIZE = len(generated_vocab())  # 514


def write_tokenizer_files(folder: str) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (header only) into ``folder``."""
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(generated_vocab(), f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")


def build_tokenizer() -> CLIPTokenizer:
    """Write the generated vocabulary to a temporary folder and load it with ``CLIPTokenizer``.

    Loading from files goes through the same code path as a real checkpoint's ``tokenizer/`` folder.
    The loaded tokenizer keeps everything in memory, so the folder is removed afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="onlineaug-tokenizer-") as folder:
        write_tokenizer_files(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=MODEL_MAX_LENGTH)
    if len(tokenizer) != VOCAB_SIZE or tokenizer.eos_token_id != VOCAB_SIZE - 1:
        raise RuntimeError(  # a transformers change, not a user error: say what we saw
            f"generated CLIP tokenizer has {len(tokenizer)} tokens and eos id {tokenizer.eos_token_id}; "
            f"expected {VOCAB_SIZE} and {VOCAB_SIZE - 1} (transformers version changed the loading?)"
        )
    return tokenizer
