"""What the trainer sees of the generated supply: per-class serves, the recent miss rate, and its warning.

A miss is a row whose ``p_aug`` coin asked for a generated sample when none could be served (the trainer kept
the real one: it never waits). Over a whole run the miss count mixes the slow start (producers load their
models) with the steady state; the rate over the last ``window`` batches says whether the producers keep up
*now*. When it stays above ``warn_above`` for a whole window, :class:`ServeMonitor` says so once, and
:func:`miss_rate_advice` turns the measured rates into what to change, with the numbers
:func:`onlineaug.plan.plan` gives (the same model as ``python -m onlineaug plan``).
"""

from __future__ import annotations

import collections
import math
import time
from typing import Mapping

import numpy as np

from onlineaug.plan import plan


class ServeMonitor:
    """Counts per served batch: generated samples per class, and (wanted, missed, samples, time) of the last
    ``window`` batches."""

    def __init__(self, num_classes: int, window: int, warn_above: float | None):
        self.window, self.warn_above = window, warn_above
        self.generated_per_class = np.zeros(num_classes, dtype=np.int64)
        self.recent: collections.deque[tuple[int, int, int, float]] = collections.deque(maxlen=window)
        self.warned = False

    def record(self, counts: dict[str, int], generated_labels: np.ndarray | None, now: float | None = None) -> None:
        """One served batch: its counts (``generated``, ``misses``, ``real``) and the labels of its generated rows."""
        if generated_labels is not None and len(generated_labels):
            labels = np.asarray(generated_labels, dtype=np.int64)
            self.generated_per_class += np.bincount(labels, minlength=len(self.generated_per_class))[
                :len(self.generated_per_class)]
        wanted = counts["generated"] + counts["misses"]
        samples = counts["generated"] + counts["real"]
        self.recent.append((wanted, counts["misses"], samples, time.monotonic() if now is None else now))

    def miss_rate(self) -> float:
        """Misses per generated sample asked for, over the last ``window`` batches (0 when none was asked for)."""
        wanted = sum(w for w, _, _, _ in self.recent)
        return sum(m for _, m, _, _ in self.recent) / wanted if wanted else 0.0

    def samples_per_s(self) -> float | None:
        """Samples served per second over the window (None with fewer than two batches)."""
        if len(self.recent) < 2:
            return None
        elapsed = self.recent[-1][3] - self.recent[0][3]
        served = sum(s for _, _, s, _ in list(self.recent)[1:])  # the first batch opens the interval
        return served / elapsed if elapsed > 0 else None

    def should_warn(self) -> bool:
        """Once: a whole window of batches whose miss rate is above ``warn_above``."""
        if self.warned or self.warn_above is None or len(self.recent) < self.window:
            return False
        if self.miss_rate() <= self.warn_above:
            return False
        self.warned = True
        return True

    def state_dict(self) -> dict:
        return {"generated_per_class": self.generated_per_class.tolist(),
                "recent": [[w, m, s] for w, m, s, _ in self.recent], "warned": self.warned}

    def load_state_dict(self, state: dict) -> None:
        per_class = np.asarray(state["generated_per_class"], dtype=np.int64)
        if per_class.shape != self.generated_per_class.shape:
            raise ValueError(f"the saved per-class counts have {per_class.size} classes, this loader "
                             f"{self.generated_per_class.size}")
        self.generated_per_class = per_class
        now = time.monotonic()  # the saved run's clock means nothing here: rates restart from this run's batches
        self.recent.clear()
        self.recent.extend((int(w), int(m), int(s), now) for w, m, s in state["recent"][-self.window:])
        self.warned = bool(state["warned"])


def miss_rate_advice(rate: float, window: int, *, p_aug: float, max_reuse: int, generators: int,
                     trainer_images_per_s: float | None, producer_images_per_s: float | None) -> str:
    """The miss-rate warning's text: what was seen, and what each of the three remedies would need."""
    seen = (f"{rate * 100:.0f}% of the generated samples asked for over the last {window} batches were misses (real "
            f"samples served instead, at p_aug={p_aug}, max_reuse={max_reuse}, {generators} generator device(s))")
    remedies = "add generator devices, raise max_reuse or lower p_aug"
    if not trainer_images_per_s or not producer_images_per_s:
        return (f"{seen}; the producers have made nothing to measure yet. To serve more generated samples: "
                f"{remedies}; `python -m onlineaug plan --measure` prints the numbers")
    result = plan(trainer_images_per_s, producer_images_per_s, p_aug=p_aug, max_reuse=max_reuse)
    keep_reuse = plan(trainer_images_per_s, producer_images_per_s, p_aug=p_aug, max_reuse=max_reuse,
                      generator_gpus=generators)
    numbers = (f"the trainer takes {trainer_images_per_s:.1f} images/s and each producer makes "
               f"{producer_images_per_s:.2f}/s, so keeping both needs {result['generator_gpus']} generator devices; "
               f"with {generators}: max_reuse={keep_reuse['max_reuse_to_keep_p_aug']} keeps p_aug={p_aug}, or "
               f"p_aug={math.floor(keep_reuse['p_aug_at_max_reuse'] * 1e4) / 1e4} keeps max_reuse={max_reuse}")
    command = (f"python -m onlineaug plan --trainer-images-per-s {trainer_images_per_s:.1f} --producer-images-per-s "
               f"{producer_images_per_s:.3g} --p-aug {p_aug} --max-reuse {max_reuse} --generator-gpus {generators}")
    return f"{seen}. {numbers}. To serve more generated samples: {remedies}; `{command}` prints the numbers"


def flat_stats(stats: Mapping, prefix: str = "") -> dict[str, float]:
    """``stats()`` as one flat ``{name: number}`` for a metrics logger: nested dicts and per-class lists become
    ``"rejected/clip_filter"`` and ``"generated_per_class/3"``; what is not a number is left out."""
    flat: dict[str, float] = {}
    for key, value in stats.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_stats(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            flat.update({f"{name}/{i}": v for i, v in enumerate(value) if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


__all__ = ["ServeMonitor", "flat_stats", "miss_rate_advice"]
