"""The shared-memory pool between producer processes and the trainer.

Fixed slots, allocated once by the trainer. Each slot holds one generated sample: the recipe's payload
fields (images as uint8, labels and metadata as int64/float32) laid out back to back. Two segments:

* ``data``: ``num_slots * slot_bytes`` of payload;
* ``control``: int64 counters: per slot ``seq``, ``uses``, ``uses_seq``, ``written_ns``, ``lease``; per producer
  one counter per name of ``PoolSpec.counter_names`` (``produced``, ``busy_ns``, ``started_ns``,
  ``heartbeat_ns``, rejections by reason, ...).

Every payload holds ``index`` (the dataset index of the sample's source, -1 for none) and ``label`` (the class it
is served as): the trainer looks slots up by them (:meth:`SamplePool.acquire` with ``allowed``,
:meth:`SamplePool.acquire_matching`).

Slot protocol (a seqlock; no cross-process lock, so a producer killed at any instant cannot wedge the pool):

* Slot ``s`` belongs to producer ``s % num_producers``; only that producer writes it.
* The producer makes ``seq[s]`` odd, writes the payload, then makes ``seq[s]`` even and larger than any
  value it had before. An odd ``seq`` (including one left by a producer that died mid-write) is never
  served; ``seq == 0`` is a slot never written.
* The trainer (the only consumer, and the only writer of ``uses``/``uses_seq``/``lease``) leases the ready slots
  it picks (``lease[s]`` = the time it took them) until it has copied them out; it checks ``seq`` before and
  after the copy: if it changed, the copy may be torn and is thrown away. A producer skips leased slots, and
  after making ``seq`` odd it checks ``lease`` once more and backs off (restoring ``seq``) if the trainer took
  the slot meanwhile. A lease older than ``LEASE_TIMEOUT_NS`` (a trainer that died or raised between picking and
  copying) no longer holds a slot. A slot is served at most ``max_reuse`` times per write: ``uses[s]`` counts serves of the write
  numbered ``uses_seq[s]``.
* The two sides prefer different slots, so that a read rarely overlaps a write: the trainer takes the fewest
  served, then the newest; a producer overwrites, among its own slots that no read holds, never-written or
  abandoned ones first, then exhausted ones, then the most used, then the oldest.
* Backpressure (``PoolSpec.backpressure``): a producer only overwrites slots that were served at least once
  (or are unusable): when every slot it owns holds a fresh, never-served sample it waits instead of throwing
  generated work away. Recipes that serve by index or class match turn it off (a fresh sample may wait long
  for its match), and then the oldest is overwritten.

Ordering relies on aligned 8-byte loads/stores being atomic and on x86-64's memory ordering (total store
order: stores become visible in program order, loads are not reordered with loads): NumPy issues no fences. On
other architectures (e.g. aarch64 GH200 nodes) a torn read could go undetected, so :meth:`SamplePool.create` and
:meth:`SamplePool.attach` refuse to run there unless ``ONLINEAUG_ALLOW_WEAK_MEMORY_ORDER=1`` accepts the risk.

Shared memory is reserved when the pool is created (``posix_fallocate``): tmpfs allocates pages only when they
are first written, so without it a ``/dev/shm`` that fills up later kills the process with SIGBUS mid-write;
with it, a full ``/dev/shm`` is a clear :class:`MemoryError` at creation.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import platform
import secrets
import sys
import time
import warnings
import weakref
from multiprocessing import shared_memory
from typing import Mapping

import numpy as np

SHM_DIR = "/dev/shm"
SLOT_ARRAYS = ("seq", "uses", "uses_seq", "written_ns", "lease")
LEASE_TIMEOUT_NS = 1_000_000_000  # a lease older than this (its reader died or gave up) no longer holds a slot
BASE_COUNTERS = ("produced", "busy_ns", "started_ns", "heartbeat_ns", "steps")
KEY_FIELDS = ("index", "label")  # every payload's lookup keys (int64 scalars)
SEGMENT_PREFIX = "onlineaug_"
WEAK_MEMORY_ORDER_ENV = "ONLINEAUG_ALLOW_WEAK_MEMORY_ORDER"
_ALIGN = 64


@dataclasses.dataclass(frozen=True)
class Field:
    """One per-sample payload field: its shape (without the batch dimension) and NumPy dtype."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """Everything a process needs to attach to a pool (picklable)."""

    data_name: str
    control_name: str
    num_slots: int
    num_producers: int
    max_reuse: int
    fields: tuple[tuple[str, Field], ...]
    counter_names: tuple[str, ...] = BASE_COUNTERS
    backpressure: bool = True

    @property
    def layout(self) -> dict[str, tuple[int, Field]]:
        """Field name -> (byte offset inside a slot, field)."""
        offsets, offset = {}, 0
        for name, field in self.fields:
            offsets[name] = (offset, field)
            offset += -(-field.nbytes // 8) * 8  # keep every field 8-byte aligned
        return offsets

    @property
    def slot_bytes(self) -> int:
        used = sum(-(-f.nbytes // 8) * 8 for _, f in self.fields)
        return -(-used // _ALIGN) * _ALIGN

    @property
    def data_bytes(self) -> int:
        return self.slot_bytes * self.num_slots

    @property
    def control_bytes(self) -> int:
        return 8 * (len(SLOT_ARRAYS) * self.num_slots + len(self.counter_names) * self.num_producers)


def shm_free_bytes(path: str = SHM_DIR) -> int | None:
    """Bytes free in the shared-memory filesystem, or None where there is none to ask."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def _capacity_error(needed: int, free: int | None, *, num_slots: int, slot_bytes: int, path: str) -> MemoryError:
    has = f"has only {free:,} bytes free" if free is not None else "has no room for it"
    return MemoryError(
        f"the sample pool needs {needed:,} bytes of shared memory (pool_size={num_slots} slots x "
        f"{slot_bytes:,} bytes) but {path} {has}. Lower pool_size or image_size, "
        f"or give {path} more room: `docker run --shm-size=<bytes>` (or `--ipc=host`), or "
        f"`sudo mount -o remount,size=<bytes> {path}`."
    )


def check_shm_capacity(needed: int, *, num_slots: int, slot_bytes: int, path: str = SHM_DIR) -> None:
    free = shm_free_bytes(path)
    if free is not None and needed > free:
        raise _capacity_error(needed, free, num_slots=num_slots, slot_bytes=slot_bytes, path=path)


def _reserve(segment: shared_memory.SharedMemory, size: int) -> None:
    """Allocate the segment's pages now (``posix_fallocate``), so that writing them later cannot SIGBUS.

    Raises ``OSError`` (``ENOSPC`` when ``/dev/shm`` is full). Where the platform has no ``posix_fallocate``
    (macOS) or the segment no file descriptor (Windows), nothing is reserved.
    """
    fd = getattr(segment, "_fd", -1)  # the POSIX SharedMemory's descriptor of /dev/shm/<name>
    if size > 0 and fd >= 0 and hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)


def check_memory_order() -> None:
    """Refuse to run the lock-free pool where x86-64's memory ordering does not hold, unless opted in."""
    machine = platform.machine()
    if machine.lower() in ("x86_64", "amd64") or os.environ.get(WEAK_MEMORY_ORDER_ENV) == "1":
        return
    raise RuntimeError(
        f"the sample pool's lock-free slot protocol (a seqlock) needs x86-64's total store order: it issues no "
        f"memory fences, so on {machine or 'this machine'} (e.g. aarch64 GH200 nodes) the CPU may reorder a "
        f"producer's stores or the trainer's loads and a read that overlaps a write may go undetected, serving a "
        f"torn sample. Run the trainer and producers on x86-64, or set {WEAK_MEMORY_ORDER_ENV}=1 to run anyway "
        f"and accept that risk.")


def _untracked(name: str, *, create: bool = False, size: int = 0) -> shared_memory.SharedMemory:
    """Create or attach a segment without Python's resource tracker.

    The tracker is per process tree and knows nothing of our cleanup: before Python 3.13 an *attaching* producer
    that exits would unlink the trainer's pool, and a trainer killed by SIGKILL makes its tracker "clean up leaked
    shared_memory objects" that the producers have already removed (a warning per segment). Segments are removed
    instead by their owner (:meth:`SamplePool.close`, at exit or garbage collection), by the producers when the
    trainer dies, and, for a trainer killed while no producer ran, by :func:`sweep_stale_segments` at the next
    pool creation (segment names carry the creating process's pid).
    """
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, create=create, size=size, track=False)
    from multiprocessing import resource_tracker

    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return shared_memory.SharedMemory(name=name, create=create, size=size)
    finally:
        resource_tracker.register = register


def _attach_untracked(name: str) -> shared_memory.SharedMemory:
    return _untracked(name)


def segment_name(kind: str) -> str:
    """A fresh segment name: ``onlineaug_<pid>_<random>_<kind>`` (the pid lets a later run sweep debris)."""
    return f"{SEGMENT_PREFIX}{os.getpid()}_{secrets.token_hex(4)}_{kind}"


def sweep_stale_segments(directory: str = "/dev/shm") -> list[str]:
    """Remove onlineaug segments whose creating process is gone (a trainer killed while no producer ran)."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(SEGMENT_PREFIX):
            continue
        pid = name[len(SEGMENT_PREFIX):].split("_", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        _unlink_quietly(name)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: not ours to judge
    return True


def _unlink_quietly(name: str) -> None:
    from _posixshmem import shm_unlink  # what SharedMemory.unlink calls, without the resource tracker

    try:
        shm_unlink("/" + name)
    except FileNotFoundError:
        pass


def unlink_segments(spec: PoolSpec) -> None:
    """Remove the pool's segments from /dev/shm (idempotent; used by producers when the trainer dies)."""
    _unlink_quietly(spec.data_name)
    _unlink_quietly(spec.control_name)


class SamplePool:
    """A view of the pool's shared memory. Create with :meth:`create` (trainer) or :meth:`attach`."""

    def __init__(self, spec: PoolSpec, data: shared_memory.SharedMemory, control: shared_memory.SharedMemory,
                 *, owner: bool):
        self.spec = spec
        self.owner = owner
        self._data, self._control = data, control
        n, p = spec.num_slots, spec.num_producers
        words = np.ndarray((spec.control_bytes // 8,), dtype=np.int64, buffer=control.buf)
        self.seq, self.uses, self.uses_seq, self.written_ns, self.lease = (
            words[i * n:(i + 1) * n] for i in range(len(SLOT_ARRAYS)))
        base = len(SLOT_ARRAYS) * n
        self.counters: dict[str, np.ndarray] = {
            name: words[base + i * p:base + (i + 1) * p] for i, name in enumerate(spec.counter_names)}
        self.produced, self.busy_ns = self.counters["produced"], self.counters["busy_ns"]
        self.started_ns, self.heartbeat_ns = self.counters["started_ns"], self.counters["heartbeat_ns"]
        raw = np.ndarray((n, spec.slot_bytes), dtype=np.uint8, buffer=data.buf)
        self.fields: dict[str, np.ndarray] = {}
        for name, (offset, field) in spec.layout.items():
            view = raw[:, offset:offset + field.nbytes].view(np.dtype(field.dtype))
            self.fields[name] = view.reshape((n, *field.shape))
        self.torn = 0  # reads discarded because a write overlapped them
        self.overwritten_uses = 0  # serves of the write the last successful write() replaced
        if owner:
            self._finalizer = weakref.finalize(self, _release, data, control, True)
        else:
            self._finalizer = weakref.finalize(self, _release, data, control, False)

    # ----------------------------------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, fields: Mapping[str, Field], *, num_slots: int, num_producers: int, max_reuse: int,
               counter_names: tuple[str, ...] = (), backpressure: bool = True) -> "SamplePool":
        if num_slots < 1:
            raise ValueError(f"pool_size must be >= 1, got {num_slots}")
        if num_producers < 1:
            raise ValueError(f"a pool needs at least one producer, got {num_producers}")
        if num_slots < num_producers:
            raise ValueError(
                f"pool_size={num_slots} is smaller than the number of producers ({num_producers}): each "
                f"producer needs at least one slot; raise pool_size or use fewer generator_devices"
            )
        if max_reuse < 1:
            raise ValueError(f"max_reuse must be >= 1 (each generated sample served at most that often), got {max_reuse}")
        check_memory_order()
        if platform.machine().lower() not in ("x86_64", "amd64"):
            warnings.warn(f"{WEAK_MEMORY_ORDER_ENV}=1: the sample pool runs on {platform.machine()} without the "
                          f"memory ordering its slot protocol relies on; a torn sample may be served",
                          RuntimeWarning, stacklevel=2)
        token = segment_name("pool")
        for key in KEY_FIELDS:
            if fields.get(key) != Field((), "int64"):
                raise ValueError(f"a pool payload needs the int64 scalar field {key!r} (the lookup keys "
                                 f"{KEY_FIELDS}), got {fields.get(key)}")
        counters = BASE_COUNTERS + tuple(name for name in counter_names if name not in BASE_COUNTERS)
        spec = PoolSpec(f"{token}_data", f"{token}_ctl", num_slots, num_producers, max_reuse,
                        tuple((name, field) for name, field in fields.items()), counters, backpressure)
        check_shm_capacity(spec.data_bytes + spec.control_bytes, num_slots=num_slots, slot_bytes=spec.slot_bytes)
        sweep_stale_segments()
        data = _untracked(spec.data_name, create=True, size=max(spec.data_bytes, 1))
        control = None
        try:
            control = _untracked(spec.control_name, create=True, size=spec.control_bytes)
            _reserve(data, spec.data_bytes)
            _reserve(control, spec.control_bytes)
        except BaseException as error:
            for segment in (data, control):
                if segment is not None:
                    segment.close()
                    _unlink_quietly(segment.name.lstrip("/"))
            if isinstance(error, OSError) and error.errno == errno.ENOSPC:
                raise _capacity_error(spec.data_bytes + spec.control_bytes, shm_free_bytes(), num_slots=num_slots,
                                      slot_bytes=spec.slot_bytes, path=SHM_DIR) from error
            raise
        np.ndarray((spec.control_bytes // 8,), dtype=np.int64, buffer=control.buf)[:] = 0
        return cls(spec, data, control, owner=True)

    @classmethod
    def attach(cls, spec: PoolSpec) -> "SamplePool":
        check_memory_order()
        data = _attach_untracked(spec.data_name)
        control = _attach_untracked(spec.control_name)
        return cls(spec, data, control, owner=False)

    def close(self) -> None:
        """Detach; the creating process also unlinks the segments. Idempotent."""
        self.fields, self.counters = {}, {}
        self.seq = self.uses = self.uses_seq = self.written_ns = self.lease = None
        self.produced = self.busy_ns = self.started_ns = self.heartbeat_ns = None
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    # ------------------------------------------------------------------------------------------ producer
    def slots_of(self, rank: int) -> np.ndarray:
        return np.arange(rank, self.spec.num_slots, self.spec.num_producers)

    def _effective_uses(self, seq: np.ndarray, slots: np.ndarray) -> np.ndarray:
        return np.where(self.uses_seq[slots] == seq, self.uses[slots], 0)

    def _writable(self, slots: np.ndarray, seq: np.ndarray, uses: np.ndarray) -> np.ndarray:
        unusable = (seq == 0) | (seq % 2 == 1)
        free = ~self._leased(slots)
        if not self.spec.backpressure:
            return free
        return free & (unusable | (uses >= 1))

    def _leased(self, slots):
        lease = self.lease[slots]
        return (lease != 0) & (time.monotonic_ns() - lease < LEASE_TIMEOUT_NS)

    def writable_count(self, rank: int) -> int:
        """How many of this producer's slots may be overwritten now (see backpressure in the module doc)."""
        slots = self.slots_of(rank)
        seq = self.seq[slots].copy()
        return int(np.count_nonzero(self._writable(slots, seq, self._effective_uses(seq, slots))))

    def choose_slots_to_write(self, rank: int, count: int) -> np.ndarray:
        """Up to ``count`` of this producer's writable slots, best to overwrite first."""
        slots = self.slots_of(rank)
        seq = self.seq[slots].copy()
        uses = self._effective_uses(seq, slots)
        writable = self._writable(slots, seq, uses)
        slots, seq, uses = slots[writable], seq[writable], uses[writable]
        unusable = (seq == 0) | (seq % 2 == 1)
        exhausted = uses >= self.spec.max_reuse
        # np.lexsort: last key is primary. Unusable, then exhausted, then most used, then oldest.
        order = np.lexsort((self.written_ns[slots], -uses, ~exhausted, ~unusable))
        return slots[order[:count]]

    def write(self, slot: int, payload: Mapping[str, np.ndarray], *, served: int = 0) -> bool:
        """Write one sample into ``slot`` (which must belong to the calling producer).

        ``payload`` holds exactly the pool's fields, each of its declared shape and dtype: nothing is cast.
        ``served``: serves this sample already had in this run (a stored sample loaded again, so that
        ``max_reuse`` counts across the run).
        Returns False, writing nothing, when the trainer leased the slot since it was chosen: choose again.
        """
        missing = set(self.fields) - set(payload)
        if missing:
            raise KeyError(f"payload is missing pool fields {sorted(missing)}; expected {sorted(self.fields)}")
        unknown = set(payload) - set(self.fields)
        if unknown:
            raise KeyError(f"payload has fields {sorted(unknown)} that the pool does not hold; expected "
                           f"{sorted(self.fields)} (the recipe's pool_fields)")
        values = {}
        for name, array in payload.items():
            value = np.asarray(array)
            target = self.fields[name]
            if value.shape != target.shape[1:]:
                raise ValueError(f"payload field {name!r} has shape {value.shape}, the pool expects "
                                 f"{target.shape[1:]}")
            if value.dtype != target.dtype:  # never cast: a float image in [0, 1] would become zeros, 3.9 -> 3
                raise TypeError(f"payload field {name!r} has dtype {value.dtype}, the pool expects {target.dtype}; "
                                f"convert it where it is made (images are uint8 in [0, 255])")
            values[name] = value
        start = self.seq[slot]
        writing = start + 1 if start % 2 == 0 else start
        self.seq[slot] = writing  # odd: being written, never served
        if self._leased(slot):
            # The trainer took this slot after it was chosen: give it back untouched (the reader, which sets its
            # lease before checking ``seq``, sees either the old even value or this odd one and backs off).
            self.seq[slot] = start
            return False
        # serves of the write being replaced (no read can begin now that seq is odd), for StoreFeeder's counts
        self.overwritten_uses = int(self.uses[slot]) if self.uses_seq[slot] == start and start % 2 == 0 else 0
        for name, target in self.fields.items():
            target[slot] = values[name]
        self.written_ns[slot] = time.monotonic_ns()
        if served:  # before the slot is ready: no reader counts serves of this write yet
            self.uses[slot] = served
            self.uses_seq[slot] = writing + 1
        self.seq[slot] = writing + 1  # even and larger than before: ready
        return True

    # ------------------------------------------------------------------------------------------- trainer
    def _ready(self, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slots ready to serve (complete, serves left, source allowed): ``(slots, seq, uses)``."""
        seq = self.seq.copy()
        uses = self._effective_uses(seq, np.arange(self.spec.num_slots))
        ready = (seq > 0) & (seq % 2 == 0) & (uses < self.spec.max_reuse)
        if allowed is not None:
            index = self.fields["index"]
            inside = (index >= 0) & (index < len(allowed))
            ready &= (index < 0) | (inside & allowed[np.where(inside, index, 0)])
        slots = np.flatnonzero(ready)
        return slots, seq[slots], uses[slots]

    def ready_count(self, allowed: np.ndarray | None = None) -> int:
        """Slots that hold a complete sample with serves left (and, with ``allowed``, an allowed source)."""
        return len(self._ready(allowed)[0])

    def _serve_order(self, slots: np.ndarray, uses: np.ndarray) -> np.ndarray:
        # fewest serves first, then the newest: producers overwrite the most used and the oldest
        return np.lexsort((-self.written_ns[slots], uses))

    def acquire(self, count: int, allowed: np.ndarray | None = None) -> list[tuple[int, int]]:
        """Pick up to ``count`` ready slots, fewest serves first, then newest. Returns ``(slot, seq)``.

        ``allowed``: a bool array over dataset indices; a slot whose source ``index`` is outside it (a sample
        from a held-out split, another rank's shard) is never picked. Sources of index -1 are always allowed.
        """
        if count <= 0:
            return []
        slots, seq, uses = self._ready(allowed)
        order = self._serve_order(slots, uses)[:count]
        self.lease[slots[order]] = time.monotonic_ns()  # held until read (or LEASE_TIMEOUT_NS)
        return [(int(slots[i]), int(seq[i])) for i in order]

    def acquire_matching(self, keys: np.ndarray, by: str, allowed: np.ndarray | None = None
                         ) -> list[tuple[int, int] | None]:
        """For each key, a distinct ready slot whose field ``by`` (``"index"`` or ``"label"``) equals it, or None."""
        if by not in KEY_FIELDS:
            raise ValueError(f"acquire_matching looks slots up by one of {KEY_FIELDS}, got {by!r}")
        slots, seq, uses = self._ready(allowed)
        order = self._serve_order(slots, uses)
        by_key: dict[int, list[int]] = {}
        values = self.fields[by][slots]
        for i in order[::-1]:  # each list ends with its best slot: pop() takes it
            by_key.setdefault(int(values[i]), []).append(int(i))
        chosen: list[tuple[int, int] | None] = []
        for key in np.asarray(keys).tolist():
            candidates = by_key.get(int(key))
            chosen.append((int(slots[i := candidates.pop()]), int(seq[i])) if candidates else None)
        taken = [slot for slot, _ in filter(None, chosen)]
        self.lease[taken] = time.monotonic_ns()  # held until read (or LEASE_TIMEOUT_NS)
        return chosen

    def peek(self, count: int) -> list[dict[str, np.ndarray]]:
        """Copies of up to ``count`` ready samples, for previews; serves are not counted."""
        samples = []
        for slot, seq in self.acquire(count):
            copy = {name: array[slot].copy() for name, array in self.fields.items()}
            if self.seq[slot] == seq:
                samples.append(copy)
            self.lease[slot] = 0
        return samples

    def read(self, slot: int, seq: int, out: Mapping[str, np.ndarray]) -> int | None:
        """Copy ``slot`` (as of write ``seq``) into ``out`` field arrays and count one serve.

        Returns how many times this write was served before (0: a fresh sample), or None, counting nothing,
        when the producer started overwriting the slot meanwhile: the copy may be torn and must be discarded.
        """
        self.lease[slot] = time.monotonic_ns()  # (acquire leased it already; a direct read leases it here)
        try:
            if self.seq[slot] != seq:  # a producer began overwriting it before it saw the lease: skip it
                self.torn += 1
                return None
            for name, target in out.items():
                np.copyto(target, self.fields[name][slot])
            if self.seq[slot] != seq:
                self.torn += 1
                return None
            uses = int(self.uses[slot]) if self.uses_seq[slot] == seq else 0
            if uses >= self.spec.max_reuse:  # only reachable if a caller reads a slot twice without acquire
                return None
            # counted while the lease still holds the slot: a producer that overwrites it next sees this serve
            self.uses[slot] = uses + 1
            self.uses_seq[slot] = seq
            return uses
        finally:
            self.lease[slot] = 0


def _release(data: shared_memory.SharedMemory, control: shared_memory.SharedMemory, unlink: bool) -> None:
    for segment in (data, control):
        try:
            segment.close()
        except BufferError:
            pass  # a NumPy view is still alive somewhere; the mapping goes with the process
        if unlink:
            _unlink_quietly(segment.name.lstrip("/"))
