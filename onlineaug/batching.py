"""Batch assembly on the trainer's host: real samples, replacements from the pool, and the copy to the device.

:class:`BatchAssembler` turns one DataLoader batch into a :class:`~onlineaug.recipes.Batch` on the trainer's
device: per sample a ``p_aug`` coin, a pooled sample copied into the batch's host buffers where one is ready
(a miss where none is), then non-blocking host-to-device copies. On CUDA the copies run on a side stream and
the pool-only fields live in a ring of pinned buffers; a buffer is refilled only after the copy that read it
has finished (its CUDA event), as FFCV does.

:func:`prefetch_batches` assembles a few batches ahead of the one being trained on, so their copies overlap
the trainer's GPU work.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from onlineaug.pool import Field, SamplePool
from onlineaug.recipes import Batch, Recipe


@dataclasses.dataclass
class ReadyBatch:
    """An assembled batch, its sample counts, and the event after which its device tensors may be read."""

    batch: Batch
    counts: dict[str, int]  # real, generated, fresh, reused, misses
    copied: torch.cuda.Event | None = None
    generated_labels: np.ndarray | None = None  # the labels of the generated rows (per-class counts in stats())
    coins_state: dict | None = None  # the replacement coins' state after this batch (set by the loader: resume)

    def wait(self) -> Batch:
        """Make the current stream wait for the copies; return the batch."""
        if self.copied is not None:
            stream = torch.cuda.current_stream(self.batch.generated.device)
            stream.wait_event(self.copied)
            for tensor in (*self.batch.fields.values(), self.batch.generated):
                tensor.record_stream(stream)  # allocated on the copy stream, used on this one
        return self.batch


class BatchAssembler:
    """Real batch + pool replacements -> device batch. Used from a single thread at a time."""

    def __init__(self, recipe: Recipe, pool: SamplePool | None, *, device: torch.device, image_size: int,
                 batch_size: int, p_aug: float, ring_size: int = 4):
        self.recipe, self.pool, self.device, self.p_aug = recipe, pool, device, p_aug
        self.allowed: np.ndarray | None = None  # bool over dataset indices: sources the sampler yields now
        self.cuda = device.type == "cuda"
        self.real_fields = {**recipe.real_fields, "label": "label", "index": "index"}
        self.pool_only: dict[str, Field] = {
            name: field for name, field in recipe.pool_fields(image_size).items() if name not in self.real_fields}
        self.overlap = [name for name in recipe.pool_fields(image_size) if name in self.real_fields]
        self.match_by = {None: None, "class": "label", "index": "index"}[recipe.serve_match]
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.batch_size, self.ring_size = batch_size, ring_size
        self._ring: list[dict[str, torch.Tensor]] = []  # on CUDA: pinned, allocated on first use
        self._ring_events: list[torch.cuda.Event | None] = [None] * ring_size
        self._ring_next = 0

    def _allocate(self, batch_size: int) -> dict[str, torch.Tensor]:
        return {name: torch.zeros((batch_size, *f.shape), dtype=getattr(torch, f.dtype), pin_memory=self.cuda)
                for name, f in self.pool_only.items()}

    def _pool_only_buffers(self, batch_size: int) -> tuple[dict[str, torch.Tensor], int | None]:
        """Buffers for the pool-only fields, and on CUDA the ring index to record the copy's event under."""
        if not self.cuda:
            return self._allocate(batch_size), None  # the batch is used in place on the CPU: fresh each time
        if not self._ring:
            self._ring = [self._allocate(self.batch_size) for _ in range(self.ring_size)]
        index = self._ring_next
        self._ring_next = (index + 1) % self.ring_size
        if self._ring_events[index] is not None:
            self._ring_events[index].synchronize()  # the copy that last read this buffer has finished
        return {name: buffer[:batch_size] for name, buffer in self._ring[index].items()}, index

    def _replace_from_pool(self, host: dict[str, torch.Tensor], coins: np.random.Generator,
                           counts: dict[str, int]) -> np.ndarray:
        size = next(iter(host.values())).shape[0]
        generated = np.zeros(size, dtype=bool)
        wanted = np.flatnonzero(coins.random(size) < self.p_aug)
        if self.match_by is None:
            found = self.pool.acquire(len(wanted), self.allowed)
            pairs = list(zip(wanted, found))
        else:  # a pooled sample of the row's own class / an edit of the row's own image
            keys = host[self.match_by].numpy()[wanted]
            pairs = [(row, hit) for row, hit in zip(wanted, self.pool.acquire_matching(keys, self.match_by,
                                                                                       self.allowed)) if hit]
        counts["misses"] += len(wanted) - len(pairs)
        if not pairs:
            return generated
        # NumPy views of the host buffers, made once per batch: a row of one is a view in 0.1-0.3 us, where
        # ``host[name][row].numpy()`` costs 3-5 us, per field and row (GenMix: 5 fields, ~32 rows a batch).
        arrays = {name: host[name].numpy() for name in self.pool.fields}
        rows = np.array([row for row, _ in pairs], dtype=np.int64)
        saved = {name: arrays[name][rows] for name in self.overlap}  # the real rows (a copy), should a read tear
        for k, (row, (slot, seq)) in enumerate(pairs):
            targets = {name: array[row, ...] for name, array in arrays.items()}  # (a 0-d view for scalars)
            previous_serves = self.pool.read(slot, seq, targets)
            if previous_serves is None:  # the producer began overwriting the slot as we copied: keep the real one
                for name, values in saved.items():
                    np.copyto(targets[name], values[k])
                counts["misses"] += 1
                continue
            generated[row] = True
            counts["fresh" if previous_serves == 0 else "reused"] += 1
        return generated

    def assemble(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                 coins: np.random.Generator) -> ReadyBatch:
        real = {"image": images, "label": labels.to(torch.int64), "index": indices.to(torch.int64)}
        host = {name: real[source] for name, source in self.real_fields.items()}
        size = images.shape[0]
        counts = {"real": 0, "generated": 0, "fresh": 0, "reused": 0, "misses": 0}
        generated = np.zeros(size, dtype=bool)
        ring_index = None
        if self.pool is not None:
            buffers, ring_index = self._pool_only_buffers(size)
            host.update(buffers)
            generated = self._replace_from_pool(host, coins, counts)
        counts["generated"] = int(generated.sum())
        counts["real"] = size - counts["generated"]
        mask = torch.from_numpy(generated)
        generated_labels = host["label"].numpy()[generated] if "label" in host and counts["generated"] else None
        if not self.cuda:
            return ReadyBatch(Batch(fields={n: t.to(self.device) for n, t in host.items()}, generated=mask), counts,
                              generated_labels=generated_labels)
        with torch.cuda.stream(self.copy_stream):
            fields = {name: tensor.to(self.device, non_blocking=True) for name, tensor in host.items()}
            device_mask = mask.pin_memory().to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        if ring_index is not None:
            self._ring_events[ring_index] = copied
        return ReadyBatch(Batch(fields=fields, generated=device_mask), counts, copied, generated_labels)


def prefetch_batches(source: Iterable, assemble: Callable[..., ReadyBatch], *, depth: int,
                     before_each: Callable[[], None]) -> Iterator[ReadyBatch]:
    """Yield ``assemble(*item)`` for ``source``'s items, assembled ``depth`` batches ahead of the one yielded.

    On the calling thread, as timm's ``PrefetchLoader``: on CUDA the copies of the batches ahead run on the
    side stream while the training step of the yielded one runs, with no GIL hand-off to a thread (which
    costs milliseconds per batch). ``before_each`` runs before each batch is assembled (the loader polls its
    producers there).
    """
    pending: collections.deque[ReadyBatch] = collections.deque()
    for item in source:
        before_each()
        pending.append(assemble(*item))
        if len(pending) > depth:
            yield pending.popleft()
    while pending:
        yield pending.popleft()
