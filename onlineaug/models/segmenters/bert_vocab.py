"""A BERT WordPiece vocabulary generated in code, for GroundingDINO text towers whose weights are random.

GroundingDINO's modelling code hard-codes the ids of four special tokens of ``bert-base-uncased``
(``SPECIAL_TOKENS = [101, 102, 1012, 1029]``: ``[CLS]``, ``[SEP]``, ``"."``, ``"?"``): it splits the prompt into
phrases at them. A generated vocabulary must put those tokens at those ids, as the real one does (and
``[PAD]`` at 0, ``[UNK]`` at 100, ``[MASK]`` at 103). The rest holds every lowercase letter and digit, alone and
as a ``##`` continuation, and the other ASCII punctuation, so every lowercased ASCII text tokenizes (into single
characters); unused ids are ``[unusedN]`` fillers, as in BERT's own file.
"""

from __future__ import annotations

import os
import string
import tempfile

from transformers import BertTokenizer

SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}


def generated_bert_vocab() -> list[str]:
    """The tokens in id order (1030 + a few entries)."""
    pieces = list(string.ascii_lowercase + string.digits)
    words = pieces + ["##" + p for p in pieces] + [c for c in string.punctuation if c not in ".?"]
    tokens: list[str | None] = [None] * (max(SPECIAL_IDS.values()) + 1)
    for token, index in SPECIAL_IDS.items():
        tokens[index] = token
    free = (i for i in range(104, len(tokens)) if tokens[i] is None)
    for word in words:
        tokens[next(free)] = word
    unused = 0
    for i, token in enumerate(tokens):
        if token is None:
            tokens[i] = f"[unused{unused}]"
            unused += 1
    return tokens


def build_bert_tokenizer(model_max_length: int = 256) -> BertTokenizer:
    """Write the generated ``vocab.txt`` to a temporary folder and load it with ``BertTokenizer``."""
    with tempfile.TemporaryDirectory(prefix="onlineaug-bert-vocab-") as folder:
        with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(generated_bert_vocab()) + "\n")
        tokenizer = BertTokenizer.from_pretrained(folder, do_lower_case=True, model_max_length=model_max_length)
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_IDS))
    if ids != list(SPECIAL_IDS.values()):  # a transformers change, not a user error: say what we saw
        raise RuntimeError(f"generated BERT tokenizer maps {list(SPECIAL_IDS)} to {ids}, expected "
                           f"{list(SPECIAL_IDS.values())} (GroundingDINO relies on these ids)")
    return tokenizer
