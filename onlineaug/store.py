"""The on-disk sample store: what producers generated, kept across runs (``cache_dir=``).

Format: webdataset-style tar shards. Each shard ``<writer>-<number>.tar`` holds, per sample ``<key>``, one
``<key>.<field>.npy`` per payload field (the recipe's ``pool_fields``: images as uint8 (3, S, S), ``index``,
``label`` and the recipe's metadata as int64/float32 scalars or arrays) and a ``<key>.json`` with the sample's
``index`` and ``label``. A shard opens with the standard library and NumPy alone::

    import io, json, tarfile, numpy as np
    with tarfile.open("shard.tar") as tar:
        for member in tar:
            data = tar.extractfile(member).read()
            value = json.loads(data) if member.name.endswith(".json") else np.load(io.BytesIO(data))

and streams unchanged through ``webdataset.WebDataset`` (samples are grouped by the key before the first dot).

Why tar of NPY + JSON rather than PNG or safetensors: NPY keeps every field exactly (any dtype and shape: the
uint8 images, and the float32/int64 metadata GenMix, DiffuseMix, De-DA carry, which PNG cannot hold) at the cost
of a memory copy, with no encoder on the producer's critical path; a tar shard can be *appended to* one sample at
a time as the producer writes it (a safetensors file needs its whole header, i.e. every tensor's size, before
the first byte), and it is the format webdataset, torchdata and the papers' "folder of images" users already
read. Compression is left out: generated pixels barely compress and the producer should not spend its time on it.

Layout under ``cache_dir``::

    samples/<recipe>-<key>/manifest.json     what the key stands for (recipe settings, models, size, dataset)
    samples/<recipe>-<key>/<writer>-000000.tar   complete shards (only these are ever read)
    samples/<recipe>-<key>/.<writer>-000001.tar.tmp  the shard a live producer is filling (never read)

The key (:func:`store_key`) hashes the recipe's name and settings (``recipe.describe()``: every option, which is
conservative: an option that only acts at batch time also starts a new store), every model role's description
and spec (``describe_model``), the image size, the payload's fields, the crop mode, and a fingerprint of the
dataset: a store made with other settings lives in another folder and is never mixed in.

Atomicity: a producer appends rows to a hidden temporary file; when it holds ``shard_size`` samples the tar is
closed, flushed, ``fsync``-ed and renamed to its visible name (``os.replace``, atomic on POSIX), and the folder is
``fsync``-ed. A producer killed at any instant leaves at most its hidden temporary file, which readers never
open and the next writer on the host removes once its process is gone. The rows of a shard being filled when
the loader stops are lost (at most ``shard_size - 1`` per producer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import secrets
import socket
import tarfile
import time
from typing import Iterator, Mapping

import numpy as np

from onlineaug.pool import Field

FORMAT = "onlineaug-samples/1"
MANIFEST = "manifest.json"
POLICIES = ("read", "write", "readwrite")
DEFAULT_SHARD_SIZE = 64
_TMP_SUFFIX = ".tar.tmp"


# ------------------------------------------------------------------------------------------------- key
def store_key(*, recipe, roles: Mapping, specs: Mapping, image_size: int, fields: Mapping[str, Field],
              resize: str, dataset_fingerprint: str) -> tuple[str, dict]:
    """``(key, manifest)``: the hex key of the store for these settings, and the readable record it hashes."""
    from onlineaug.models import describe_model

    manifest = {
        "format": FORMAT,
        "recipe": recipe.name,
        "recipe_settings": {k: repr(v) for k, v in sorted(recipe.describe().items())},
        "models": {role: {"description": describe_model(roles[role], spec),
                          "spec": {k: repr(v) for k, v in dataclasses.asdict(spec).items()}}
                   for role, spec in sorted(specs.items())},
        "image_size": int(image_size),
        "fields": {name: {"shape": list(f.shape), "dtype": f.dtype} for name, f in fields.items()},
        "resize": resize,
        "dataset": dataset_fingerprint,
    }
    text = json.dumps(manifest, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest(), manifest


def store_path(cache_dir: str, recipe_name: str, key: str) -> str:
    return os.path.join(cache_dir, "samples", f"{recipe_name}-{key}")


# ---------------------------------------------------------------------------------------------- store
class SampleStore:
    """One store folder: its manifest and complete shards (read side; any process)."""

    def __init__(self, path: str, fields: Mapping[str, Field]):
        self.path = path
        self.fields = dict(fields)

    @classmethod
    def open(cls, path: str, manifest: dict, *, create: bool) -> "SampleStore":
        """Open the store at ``path`` for ``manifest``; with ``create``, make it (and its manifest) if missing."""
        manifest_path = os.path.join(path, MANIFEST)
        if create:
            os.makedirs(path, exist_ok=True)
            if not os.path.exists(manifest_path):
                _write_atomically(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
        if os.path.exists(manifest_path):
            with open(manifest_path, encoding="utf-8") as handle:
                found = json.load(handle)
            if found != manifest:  # a key collision or a hand-edited folder: never mix
                raise ValueError(f"the sample store {path} was made with other settings than this loader's (its "
                                 f"{MANIFEST} differs); remove the folder or use another cache_dir")
        fields = {name: Field(tuple(f["shape"]), f["dtype"]) for name, f in manifest["fields"].items()}
        return cls(path, fields)

    def shards(self) -> list[str]:
        """The complete shards, oldest name first (temporary files of shards being filled are left out)."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        return sorted(os.path.join(self.path, n) for n in names if n.endswith(".tar") and not n.startswith("."))

    def read_shard(self, path: str) -> dict[str, np.ndarray]:
        """Every sample of one shard: field -> (n, ...) array, in the order written."""
        return read_shard(path, self.fields)

    def num_samples(self) -> int:
        return sum(shard_samples(shard) for shard in self.shards())

    def size_bytes(self) -> int:
        return sum(os.path.getsize(s) for s in self.shards())

    def iter_shards(self, rng: np.random.Generator | None = None) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        shards = self.shards()
        if rng is not None:
            shards = [shards[i] for i in rng.permutation(len(shards))]
        for shard in shards:
            yield shard, self.read_shard(shard)

    def load(self, limit: int, allowed: np.ndarray | None, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Up to ``limit`` stored samples whose source ``index`` is allowed (shards in a random order)."""
        parts, count = [], 0
        for _, rows in self.iter_shards(rng):
            keep = allowed_rows(rows["index"], allowed)
            if keep.any():
                parts.append({k: v[keep][:limit - count] for k, v in rows.items()})
                count += len(parts[-1]["index"])
            if count >= limit:
                break
        if not parts:
            return {name: np.zeros((0, *f.shape), dtype=f.dtype) for name, f in self.fields.items()}
        return {name: np.concatenate([p[name] for p in parts]) for name in self.fields}


def shard_samples(path: str) -> int:
    """The samples in one shard (its ``.json`` members; only the tar headers are read)."""
    with tarfile.open(path) as tar:
        return sum(1 for m in tar.getmembers() if m.name.endswith(".json"))


def allowed_rows(index: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """Which rows the sampler allows (as :meth:`SamplePool.acquire`: index -1, no source, always is)."""
    if allowed is None:
        return np.ones(len(index), dtype=bool)
    inside = (index >= 0) & (index < len(allowed))
    return (index < 0) | (inside & allowed[np.where(inside, index, 0)])


def read_shard(path: str, fields: Mapping[str, Field]) -> dict[str, np.ndarray]:
    samples: dict[str, dict[str, np.ndarray]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, rest = member.name.partition(".")
            if not rest.endswith(".npy"):
                continue
            name = rest[:-len(".npy")]
            if name in fields:
                samples.setdefault(key, {})[name] = np.load(io.BytesIO(tar.extractfile(member).read()))
    out = {}
    for name, field in fields.items():
        values = [s[name] for s in samples.values() if name in s]
        if len(values) != len(samples) or any(v.shape != field.shape for v in values):
            raise ValueError(f"shard {path} has samples without the field {name!r} of shape {field.shape}: not a "
                             f"shard of this store")
        out[name] = (np.stack(values) if values else np.zeros((0, *field.shape), dtype=field.dtype)).astype(
            field.dtype, copy=False)
    return out


# --------------------------------------------------------------------------------------------- writer
class ShardWriter:
    """Appends samples to shards of ``shard_size`` (one writer per producer process)."""

    def __init__(self, path: str, fields: Mapping[str, Field], shard_size: int = DEFAULT_SHARD_SIZE):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.path, self.fields, self.shard_size = path, dict(fields), shard_size
        os.makedirs(path, exist_ok=True)
        sweep_temporary(path)
        # host and pid let a later writer sweep what a dead one left; the token keeps restarts apart
        self.writer = f"{socket.gethostname()}_{os.getpid()}_{secrets.token_hex(3)}"
        self.sealed = 0  # shards made visible
        self.written = 0  # samples in them
        self._number = 0
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._count = 0

    def _temporary(self) -> str:
        return os.path.join(self.path, f".{self.writer}-{self._number:06d}{_TMP_SUFFIX}")

    def _final(self) -> str:
        return os.path.join(self.path, f"{self.writer}-{self._number:06d}.tar")

    def append(self, rows: Mapping[str, np.ndarray]) -> None:
        """Append each row (field -> (m, ...)) to the shard being filled, sealing it whenever it is full."""
        count = len(rows["index"]) if rows else 0
        for row in range(count):
            if self._tar is None:
                self._file = open(self._temporary(), "wb")
                self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
            key = f"{self.writer}-{self._number:06d}-{self._count:05d}"
            meta = {"index": int(rows["index"][row]), "label": int(rows["label"][row]), "time": time.time()}
            self._add(f"{key}.json", json.dumps(meta).encode())
            for name in self.fields:
                buffer = io.BytesIO()
                np.save(buffer, np.asarray(rows[name][row]), allow_pickle=False)  # (0-d stays 0-d)
                self._add(f"{key}.{name}.npy", buffer.getvalue())
            self._count += 1
            if self._count == self.shard_size:
                self.seal()

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def seal(self) -> str | None:
        """Make the shard being filled visible (even if not full); returns its path, None if it was empty."""
        if self._tar is None:
            return None
        self._tar.close()  # writes the end-of-archive blocks
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._final()
        os.replace(self._temporary(), final)
        _fsync_dir(self.path)
        self.sealed += 1
        self.written += self._count
        self._tar, self._file, self._count = None, None, 0
        self._number += 1
        return final

    def discard(self) -> None:
        """Drop the shard being filled (its rows are lost), leaving nothing behind."""
        if self._tar is not None:
            self._file.close()
            os.unlink(self._temporary())
            self._tar, self._file, self._count = None, None, 0


def sweep_temporary(path: str) -> list[str]:
    """Remove the temporary shards that dead writers on this host left (a killed producer's)."""
    host = socket.gethostname()
    removed = []
    for name in os.listdir(path):
        if not (name.startswith(".") and name.endswith(_TMP_SUFFIX)):
            continue
        parts = name[1:].rsplit("-", 1)[0].rsplit("_", 2)  # host_pid_token-NNNNNN.tar.tmp
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or _alive(int(parts[1])):
            continue
        try:
            os.unlink(os.path.join(path, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomically(path: str, data: bytes) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# --------------------------------------------------------------------------------------------- feeder
class StoreFeeder:
    """Refills the pool from the store on a trainer thread (``store_policy="read"``: there are no producers).

    It acts as the pool's only producer (rank 0): it overwrites the slots the pool's rules let a producer
    overwrite, with stored samples the sampler allows (``allowed()``, re-read each time), cycling through the
    store. ``max_reuse`` counts serves across the run: when a slot is overwritten the serves its sample had are
    kept, and a sample loaded again starts from them (:meth:`SamplePool.write` ``served``); a sample served
    ``max_reuse`` times is not loaded again. When every stored sample is used up the pool runs dry and the
    trainer keeps its real samples (misses), as with producers that are too slow.
    """

    def __init__(self, store: SampleStore, pool, allowed, *, max_reuse: int, seed: int = 0):
        import threading

        self.store, self.pool, self.allowed, self.max_reuse = store, pool, allowed, max_reuse
        self.loaded = 0  # samples written into the pool
        self.exhausted = False  # a whole pass over the store found nothing left to load
        self.error: BaseException | None = None
        self._rng = np.random.default_rng(seed)
        self._served: dict[tuple[str, int], int] = {}
        self._slot_row: dict[int, tuple[str, int]] = {}
        self._queue: list[tuple[str, int, int]] = []  # (shard, row, index), next one last
        self._cached: tuple[str | None, dict] = (None, {})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="onlineaug-store-feeder")

    def start(self) -> "StoreFeeder":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.fill() == 0:
                    self._stop.wait(0.01)
        except BaseException as error:  # noqa: BLE001 - re-raised on the training thread by the loader
            self.error = error

    def _eligible(self, row_id: tuple[str, int], index: int, in_pool: set) -> bool:
        if self._served.get(row_id, 0) >= self.max_reuse or row_id in in_pool:
            return False
        return bool(allowed_rows(np.array([index]), self.allowed())[0])

    def _refill_queue(self) -> None:
        """Queue the eligible samples of the next pass over the store (shards in a random order). Only their
        ids are kept: a pass over a store larger than memory holds one shard at a time."""
        in_pool = set(self._slot_row.values())
        for shard, rows in self.store.iter_shards(self._rng):
            for row, index in enumerate(rows["index"].tolist()):
                if self._eligible((shard, row), index, in_pool):
                    self._queue.append((shard, row, index))
        self._queue.reverse()  # pop() takes them in order

    def _payload(self, shard: str, row: int) -> dict[str, np.ndarray]:
        if self._cached[0] != shard:
            self._cached = (shard, self.store.read_shard(shard))
        return {k: v[row] for k, v in self._cached[1].items()}

    def fill(self) -> int:
        """Overwrite every slot the pool lets its producer overwrite now; returns how many were written."""
        pool = self.pool
        slots = pool.choose_slots_to_write(0, pool.spec.num_slots)
        written = 0
        for slot in slots.tolist():
            item = self._next()  # never a sample in the pool now (the one in this slot included)
            if item is None:
                self.exhausted = True
                break
            self.exhausted = False
            shard, row, _ = item
            if pool.write(slot, self._payload(shard, row), served=self._served.get((shard, row), 0)):
                previous = self._slot_row.get(slot)
                if previous is not None:  # its serves in this run (it was written with those it had before)
                    self._served[previous] = max(self._served.get(previous, 0), pool.overwritten_uses)
                self._slot_row[slot] = (shard, row)
                self.loaded += 1
                written += 1
            else:  # the trainer leased the slot meanwhile: try this sample again later
                self._queue.append(item)
        return written

    def _next(self) -> tuple[str, int, int] | None:
        in_pool = set(self._slot_row.values())
        while self._queue:
            shard, row, index = self._queue.pop()
            if self._eligible((shard, row), index, in_pool):
                return shard, row, index
        self._refill_queue()
        return self._queue.pop() if self._queue else None


__all__ = ["DEFAULT_SHARD_SIZE", "FORMAT", "POLICIES", "SampleStore", "ShardWriter", "StoreFeeder", "allowed_rows",
           "read_shard", "shard_samples", "store_key", "store_path", "sweep_temporary"]
