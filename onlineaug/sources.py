"""Which dataset indices producers may start from: exactly those the trainer's sampler can yield.

A user who splits train/validation with a sampler (``SubsetRandomSampler``), shards with ``DistributedSampler``
or re-weights with ``WeightedRandomSampler`` must never see a generated sample made from an index the sampler
would not yield: that would leak a held-out split into training through the generator. So:

* the trainer computes a :class:`SourceSet` from its sampler for each epoch (:func:`sampler_sources`);
* it publishes it to its producers through a small shared-memory table (:class:`SharedSources`, versioned like
  the pool's slots), which producers re-read when the version changes;
* producers draw every source from it (with the sampler's weights), by class where a recipe needs that;
* the trainer serves only pooled samples whose source index is in the current set (``allowed_mask``), so a
  sample generated just before an epoch changed the shard is not served either.

Dataset labels (for class-conditional drawing) come from ``dataset.targets`` / ``dataset.labels`` when the
dataset has them (torchvision datasets, ``Subset`` of those), else from one scan of the dataset
(:func:`dataset_labels`, with a progress bar), done once per loader.
"""

from __future__ import annotations

import hashlib
from multiprocessing import shared_memory
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import (
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    WeightedRandomSampler,
)


class SourceSet:
    """A set of dataset indices with sampling weights and (optionally) their labels.

    Args:
        indices: int64 (n,) distinct dataset indices.
        weights: float (n,) non-negative sampling weights, or None (uniform).
        labels: int64 (n,) the class of each index, or None when no recipe needs classes.
    """

    def __init__(self, indices, weights=None, labels=None):
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1 or not len(self.indices):
            raise ValueError("the sampler yields no index: producers have nothing to start from")
        self.probabilities = None
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != self.indices.shape or not np.isfinite(weights).all() or (weights < 0).any():
                raise ValueError("source weights must be finite, >= 0 and one per index")
            keep = weights > 0
            if not keep.any():
                raise ValueError("every source index has weight 0: producers have nothing to start from")
            self.indices, weights = self.indices[keep], weights[keep]
            if labels is not None:
                labels = np.asarray(labels)[keep]
            self.probabilities = weights / weights.sum()
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if self.labels is not None and self.labels.shape != self.indices.shape:
            raise ValueError("source labels must be one per index")
        self._by_class: dict[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def draw(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` indices, drawn with replacement by the sampler's weights."""
        positions = rng.choice(len(self.indices), size=count, p=self.probabilities)
        return self.indices[positions]

    # ---------------------------------------------------------------------------------------- by class
    def _require_labels(self) -> np.ndarray:
        if self.labels is None:
            raise RuntimeError("this recipe draws sources by class but the source set has no labels "
                               "(the recipe must set needs_labels = True)")
        return self.labels

    @property
    def by_class(self) -> dict[int, np.ndarray]:
        """class -> positions (into ``indices``) of its indices."""
        if self._by_class is None:
            labels = self._require_labels()
            order = np.argsort(labels, kind="stable")
            classes, starts = np.unique(labels[order], return_index=True)
            self._by_class = {int(c): part for c, part in zip(classes, np.split(order, starts[1:]))}
        return self._by_class

    @property
    def classes(self) -> np.ndarray:
        """The classes with at least one index (of non-zero weight), sorted."""
        return np.array(sorted(self.by_class), dtype=np.int64)

    def draw_classes(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` classes, uniformly among those present."""
        classes = self.classes
        return classes[rng.integers(len(classes), size=count)]

    def draw_of_classes(self, classes: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """One index of each given class (by the sampler's weights within the class)."""
        out = np.empty(len(classes), dtype=np.int64)
        for row, label in enumerate(np.asarray(classes).tolist()):
            positions = self.by_class.get(int(label))
            if positions is None:
                raise ValueError(f"class {label} has no index the sampler can yield")
            p = None
            if self.probabilities is not None:
                p = self.probabilities[positions] / self.probabilities[positions].sum()
            out[row] = self.indices[positions[rng.choice(len(positions), p=p)]]
        return out

    def allowed_mask(self, length: int) -> np.ndarray:
        """A bool array over all dataset indices: True where producers may start from."""
        mask = np.zeros(length, dtype=bool)
        mask[self.indices] = True
        return mask

    def fingerprint(self) -> str:
        h = hashlib.blake2b(self.indices.tobytes(), digest_size=12)
        if self.probabilities is not None:
            h.update(self.probabilities.tobytes())
        return h.hexdigest()


# ------------------------------------------------------------------------------------------- samplers
def sampler_sources(sampler, dataset_length: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``(indices, weights or None)``: what ``sampler`` can yield in its current epoch.

    Standard samplers are read without iterating them (``RandomSampler``/``SequentialSampler``: every index;
    ``SubsetRandomSampler``: its ``indices``; ``WeightedRandomSampler``: the indices of non-zero weight, with
    those weights). Others (``DistributedSampler``: this rank's shard of this epoch; user samplers) are
    iterated once: the set is what one pass yields.
    """
    if isinstance(sampler, (RandomSampler, SequentialSampler)):
        indices, weights = np.arange(len(sampler.data_source)), None
    elif isinstance(sampler, SubsetRandomSampler):
        indices, weights = np.unique(np.asarray(list(sampler.indices), dtype=np.int64)), None
    elif isinstance(sampler, WeightedRandomSampler):
        weights = torch.as_tensor(sampler.weights, dtype=torch.float64).numpy()
        indices = np.arange(len(weights))
    else:
        indices, weights = np.unique(np.fromiter((int(i) for i in iter(sampler)), dtype=np.int64)), None
    if len(indices) and (indices.min() < 0 or indices.max() >= dataset_length):
        raise ValueError(f"the sampler ({type(sampler).__name__}) yields indices outside the dataset "
                         f"[0, {dataset_length}): e.g. {int(indices.max())}")
    return indices, weights


def epoch_dependent(sampler) -> bool:
    """Whether the sampler's index set may change with the epoch (a shuffled ``DistributedSampler``, user
    samplers); the standard samplers' sets are fixed."""
    return not isinstance(sampler, (RandomSampler, SequentialSampler, SubsetRandomSampler, WeightedRandomSampler))


# ----------------------------------------------------------------------------------------------- labels
def _label_array(values, length: int) -> np.ndarray | None:
    try:
        array = np.asarray(values.numpy() if isinstance(values, torch.Tensor) else values)
    except (TypeError, ValueError):
        return None
    if array.shape != (length,) or not np.issubdtype(array.dtype, np.integer):
        return None
    return array.astype(np.int64)


def known_labels(dataset) -> np.ndarray | None:
    """The labels a dataset states without loading items (``targets``/``labels``; through ``Subset``)."""
    if isinstance(dataset, Subset):
        parent = known_labels(dataset.dataset)
        return None if parent is None else parent[np.asarray(dataset.indices, dtype=np.int64)]
    for name in ("targets", "labels"):
        values = getattr(dataset, name, None)
        if values is not None and not callable(values):
            array = _label_array(values, len(dataset))
            if array is not None:
                return array
    return None


def dataset_labels(dataset, num_classes: int, *, progress: bool = True, label_of=None) -> np.ndarray:
    """Every item's label: stated by the dataset (fast) or read item by item once (with a progress bar).

    ``label_of(dataset, index) -> int`` reads one label when scanning (default: the loader's item parser).
    """
    labels = known_labels(dataset)
    if labels is None:
        if label_of is None:
            from onlineaug.images import load_image

            def label_of(data, index):
                return load_image(data, index, num_classes)[1]

        from tqdm.auto import tqdm

        items = tqdm(range(len(dataset)), desc="onlineaug: reading labels (give the dataset a .targets "
                     "attribute to skip this)", unit="item", disable=not progress, leave=False)
        labels = np.fromiter((label_of(dataset, i) for i in items), dtype=np.int64, count=len(dataset))
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(f"dataset label {int(labels[bad][0])} (item {int(np.flatnonzero(bad)[0])}) is out of range "
                         f"for num_classes={num_classes}")
    return labels


# -------------------------------------------------------------------------------------- shared table
class SharedSources:
    """The current source set in shared memory: written by the trainer, read by its producers.

    Layout (int64 words): ``version``, ``count``, ``has_weights``, then ``capacity`` indices, then ``capacity``
    float64 weights. ``version`` is odd while the trainer rewrites the table (readers retry), even otherwise.
    """

    _HEADER = 3

    def __init__(self, segment: shared_memory.SharedMemory, capacity: int, owner: bool):
        self.name, self.capacity, self.owner = segment.name, capacity, owner
        self._segment = segment
        words = np.ndarray((self._HEADER + 2 * capacity,), dtype=np.int64, buffer=segment.buf)
        self._header = words[:self._HEADER]
        self._indices = words[self._HEADER:self._HEADER + capacity]
        self._weights = words[self._HEADER + capacity:].view(np.float64)

    @classmethod
    def create(cls, capacity: int) -> "SharedSources":
        from onlineaug.pool import _untracked, segment_name

        size = 8 * (cls._HEADER + 2 * capacity)
        segment = _untracked(segment_name("sources"), create=True, size=size)
        table = cls(segment, capacity, owner=True)
        table._header[:] = 0
        return table

    @classmethod
    def attach(cls, name: str, capacity: int) -> "SharedSources":
        from onlineaug.pool import _attach_untracked

        return cls(_attach_untracked(name), capacity, owner=False)

    @property
    def version(self) -> int:
        return int(self._header[0])

    def publish(self, indices: np.ndarray, weights: np.ndarray | None) -> None:
        count = len(indices)
        if count > self.capacity:
            raise ValueError(f"{count} source indices do not fit a table of {self.capacity}")
        start = int(self._header[0])
        self._header[0] = start + 1  # odd: being written
        self._header[1] = count
        self._header[2] = weights is not None
        self._indices[:count] = indices
        if weights is not None:
            self._weights[:count] = weights
        self._header[0] = start + 2

    def read(self) -> tuple[int, np.ndarray, np.ndarray | None] | None:
        """``(version, indices, weights)`` of a consistent table, or None if none is published or it is being
        rewritten (try again)."""
        version = int(self._header[0])
        if version == 0 or version % 2:
            return None
        count, has_weights = int(self._header[1]), bool(self._header[2])
        indices = self._indices[:count].copy()
        weights = self._weights[:count].copy() if has_weights else None
        if int(self._header[0]) != version:
            return None
        return version, indices, weights

    def close(self) -> None:
        self._header = self._indices = self._weights = None
        try:
            self._segment.close()
        except BufferError:
            pass
        if self.owner:
            from onlineaug.pool import _unlink_quietly

            _unlink_quietly(self._segment.name.lstrip("/"))  # a producer may have removed it already
