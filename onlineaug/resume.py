"""Mid-epoch resume: what ``OnlineGenAugLoader.state_dict()`` saves and how a new loader continues from it.

The loader seeds every stream per ``(seed, rank, epoch)``, so the state of an epoch in progress is small: the
epoch, the batches the user has received in it (``k``), the replacement coins' and the batch-time parameters'
generator states after batch ``k``, and whatever the sampler needs to yield the same order again. Batches are
assembled ahead of the one the user trains on (``prefetch``, DataLoader workers), so every state here is the one
*after the last batch handed out*, never the one of a batch assembled ahead: the coins' state travels with each
assembled batch, and a stateful sampler's state is snapshotted at each batch boundary as its indices are drawn.

How the sampler's order is restored (:func:`sampler_kind`):

* ``"plain"``: an order fixed by the loader's seed and the epoch (the loader's own ``RandomSampler`` is reseeded
  per epoch; ``SequentialSampler``; ``DistributedSampler`` through ``set_epoch``; a list or range). The resumed
  pass draws the first ``k x batch_size`` indices again and drops them: nothing is loaded or decoded for them.
* ``"generator"``: a sampler with its own ``torch.Generator`` (``RandomSampler(generator=g)``,
  ``SubsetRandomSampler``, ``WeightedRandomSampler``): the generator's state at the start of the epoch is saved
  and set again, then the first indices are drawn and dropped as above.
* ``"stateful"``: a sampler (or its iterator) with ``state_dict()``/``load_state_dict()``, in torchdata's
  convention: its state after ``n`` indices, loaded before the next iteration, makes that iteration continue
  after them (``torchdata.stateful_dataloader.StatefulDistributedSampler``, its ``RandomSampler``). Its state after
  ``k`` batches is saved and loaded; the sampler skips on its own.

Any other sampler cannot be restored and :func:`sampler_kind` says what to change. Loading checks that the
settings which decide the remaining batches (batch size, seed, dataset length, sampler, recipe, ...) are the saved
ones; what only changes how many generated samples are served (``p_aug``, ``max_reuse``, ``pool_size``, generator
devices) may differ, so a run can be restarted with the miss-rate warning's advice applied.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch
from torch.utils.data import DistributedSampler, SequentialSampler

from onlineaug.images import EpochTaggedSampler

STATE_VERSION = 1
SAMPLER_KINDS = ("plain", "generator", "stateful")


def _has_state(thing) -> bool:
    return callable(getattr(thing, "state_dict", None)) and callable(getattr(thing, "load_state_dict", None))


def sampler_kind(sampler, iterator=None) -> str:
    """How ``sampler``'s order is restored (see the module docstring); raises ``TypeError`` when it cannot be.

    ``iterator`` is the sampler's current iterator, when a pass has begun (torchdata's ``RandomSampler`` keeps its
    state there).
    """
    if _has_state(sampler) or (iterator is not None and _has_state(iterator)):
        return "stateful"
    if hasattr(sampler, "generator"):
        if isinstance(sampler.generator, torch.Generator):
            return "generator"
        raise TypeError(
            f"the loader cannot save the order of {type(sampler).__name__}(generator=None): it draws from torch's "
            f"global random state. Pass it a generator (generator=torch.Generator().manual_seed(0)); the loader "
            f"then saves the generator's state at the start of each epoch")
    if isinstance(sampler, (SequentialSampler, DistributedSampler, list, tuple, range)):
        return "plain"
    raise TypeError(
        f"the loader cannot save the order of a {type(sampler).__name__} sampler: it has no state_dict() and no "
        f"torch.Generator the loader could save. Give it state_dict() and load_state_dict() in torchdata's "
        f"convention (its state after n indices, loaded before the next iteration, continues after them), or a "
        f"`generator` attribute holding the torch.Generator it draws from")


class ResumableSampler(EpochTaggedSampler):
    """:class:`EpochTaggedSampler` that can start a pass after the indices already delivered.

    :meth:`resume_at` sets where the next pass starts (indices delivered, and for a stateful sampler its state
    there). For stateful samplers it snapshots the sampler's state each time a whole batch of indices has been
    drawn, in :attr:`snapshots` (batches drawn -> state); the loader takes the one of the batches it has handed out.
    """

    def __init__(self, sampler, batch_size: int):
        super().__init__(sampler)
        self.batch_size = batch_size
        self.snapshots: dict[int, dict] = {}
        self.iterator = None  # the sampler's iterator of the pass in progress
        self.kind: str | None = None  # sampler_kind of that pass (None: it could not be saved)
        self._resume: tuple[int, dict | None] | None = None

    def resume_at(self, delivered: int, state: dict | None = None) -> None:
        """The next pass starts after ``delivered`` indices (``state``: a stateful sampler's state there)."""
        self._resume = (delivered, state)

    def state(self) -> dict:
        """A stateful sampler's state now: its own ``state_dict()`` and its iterator's, where they have one."""
        return {"sampler": self.sampler.state_dict() if _has_state(self.sampler) else None,
                "iterator": self.iterator.state_dict() if _has_state(self.iterator) else None}

    def __iter__(self):
        epoch = self.epoch
        delivered, state = self._resume or (0, None)
        self._resume = None
        self.snapshots = {}
        if state is not None and state.get("sampler") is not None:
            self.sampler.load_state_dict(state["sampler"])
        inner = iter(self.sampler)
        if state is not None and state.get("iterator") is not None:
            inner.load_state_dict(state["iterator"])
        self.iterator = inner
        try:
            self.kind = sampler_kind(self.sampler, inner)
        except TypeError:
            self.kind = None  # iterating is fine; state_dict() raises the error
        stateful = self.kind == "stateful"
        if delivered and not stateful:  # draw the delivered indices again and drop them: nothing is loaded
            next(itertools.islice(inner, delivered, delivered), None)
        return self._tagged(epoch, inner, delivered, stateful)

    def _tagged(self, epoch: int, inner, count: int, stateful: bool):
        every = self.batch_size
        for index in inner:
            count += 1
            if stateful and count % every == 0:
                self.snapshots[count // every] = self.state()
            yield epoch, int(index)


@dataclasses.dataclass
class EpochPass:
    """One pass over the loader: its epoch, the batches handed out so far, and the states after the last one."""

    epoch: int
    delivered: int  # batches of this epoch the user has received (a resumed pass starts above 0)
    length: int  # batches in a whole epoch
    params: torch.Generator  # the batch-time parameters' generator (advanced only when a batch is handed out)
    coins_state: dict  # the replacement coins' state after the last batch handed out
    sampler_generator: torch.Tensor | None = None  # "generator" samplers: the state at the start of the epoch
    sampler_state: dict | None = None  # "stateful" samplers: the state after the last batch handed out
    complete: bool = False

    @property
    def finished(self) -> bool:
        return self.complete or self.delivered >= self.length


def check_settings(saved: dict, current: dict) -> None:
    """Raise ``ValueError`` naming every setting that differs between a saved state and this loader."""
    differ = [f"{name}: saved {saved.get(name)!r}, this loader {value!r}" for name, value in current.items()
              if saved.get(name) != value]
    if differ:
        raise ValueError(
            "this state was saved by a loader with other settings, so its remaining batches are not this loader's "
            "(" + "; ".join(differ) + "). Build the loader with the saved settings; p_aug, max_reuse, pool_size "
            "and the generator devices may change between runs")


def numpy_state(state: dict) -> dict:
    """A NumPy bit generator's state as plain ints and strings (copied: the live one keeps changing)."""
    return {key: (numpy_state(value) if isinstance(value, dict) else
                  int(value) if isinstance(value, (int, np.integer)) else value) for key, value in state.items()}


__all__ = ["EpochPass", "ResumableSampler", "SAMPLER_KINDS", "STATE_VERSION", "check_settings", "numpy_state",
           "sampler_kind"]
