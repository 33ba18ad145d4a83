"""Validating arguments once, at the public API, with who they belong to in every message.

Loader arguments and ``recipe_options`` come from configs and command lines, so they arrive as whatever the user
typed: a bare string where a list was meant (``prompts="snowy"`` must not become five one-letter prompts),
``"no"`` for a bool, ``"0.5"`` for a probability, ``2.9`` for a step count, ``nan`` or ``inf`` for a scale. Each
checker returns the value in its canonical type or raises ``TypeError``/``ValueError`` saying whose argument,
which one, what was given and what is expected.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np


class Checks:
    """Checkers bound to an owner: ``Checks("recipe 'genmix'").integer("num_inference_steps", 4, low=1)``."""

    def __init__(self, owner: str, what: str = "option"):
        self.owner, self.what = owner, what

    @classmethod
    def recipe(cls, name: str) -> "Checks":
        return cls(f"recipe {name!r}", "option")

    def _fail(self, error: type, name: str, value, expected: str):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise error(f"{self.owner}: {self.what} {name}={shown} is invalid: expected {expected}")

    def boolean(self, name: str, value) -> bool:
        if not isinstance(value, (bool, np.bool_)):
            self._fail(TypeError, name, value, "True or False (a bool, not a string or number)")
        return bool(value)

    def integer(self, name: str, value, *, low: int | None = None, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            self._fail(TypeError, name, value, "an int" + (" (2.9 would be truncated silently)"
                                                            if isinstance(value, float) else ""))
        value = int(value)
        if (low is not None and value < low) or (high is not None and value > high):
            self._fail(ValueError, name, value, _bounds("an int", low, high))
        return value

    def real(self, name: str, value, *, low: float | None = None, high: float | None = None,
             low_open: bool = False, high_open: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            self._fail(TypeError, name, value, "a number")
        given, value = value, float(value)
        if not math.isfinite(value):
            self._fail(ValueError, name, given, "a finite number")
        if (low is not None and (value < low or (low_open and value == low))) or \
                (high is not None and (value > high or (high_open and value == high))):
            self._fail(ValueError, name, given, _bounds("a number", low, high, low_open, high_open))
        return value

    def probability(self, name: str, value) -> float:
        return self.real(name, value, low=0.0, high=1.0)

    def text(self, name: str, value, *, allow_empty: bool = False) -> str:
        if not isinstance(value, str) or (not value and not allow_empty):
            self._fail(TypeError, name, value, "a non-empty string" if not allow_empty else "a string")
        return value

    def choice(self, name: str, value, choices: Sequence) -> Any:
        if not any(type(value) is type(c) and value == c for c in choices):  # 1 is not True, "1" is not 1
            self._fail(ValueError, name, value, f"one of {list(choices)}")
        return value

    def sequence(self, name: str, value, item, *, min_length: int = 1) -> tuple:
        """A list/tuple checked item by item with ``item(name, value)``; a bare string is an error."""
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            hint = f" (for one value write [{value!r}])" if isinstance(value, str) else ""
            self._fail(TypeError, name, value, f"a list{hint}")
        if len(value) < min_length:
            self._fail(ValueError, name, value, f"a list of at least {min_length} item(s)")
        return tuple(item(f"{name}[{i}]", v) for i, v in enumerate(value))

    def strings(self, name: str, value, *, min_length: int = 1) -> tuple[str, ...]:
        return self.sequence(name, value, self.text, min_length=min_length)

    def template(self, name: str, value, *fields: str) -> str:
        value = self.text(name, value)
        for field in fields:
            if "{" + field + "}" not in value:
                self._fail(ValueError, name, value, f"a template containing '{{{field}}}'")
        try:
            value.format(**{f: "x" for f in fields})
        except (KeyError, IndexError, ValueError) as error:
            self._fail(ValueError, name, value, f"a template with only the fields {list(fields)} ({error})")
        return value

    def path(self, name: str, value) -> str | None:
        import os

        if value is None:
            return None
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        return self.text(name, value)

    def generation_size(self, value, default: int) -> int:
        size = default if value is None else self.integer("generation_size", value, low=8)
        if size % 8:
            self._fail(ValueError, "generation_size", size, "a positive multiple of 8 (the VAE's downsampling)")
        return size


def _bounds(what: str, low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"{what} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{what} {'>' if low_open else '>='} {low}"
    return f"{what} {'<' if high_open else '<='} {high}"
