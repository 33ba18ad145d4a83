"""Producer processes: one fresh interpreter per generator device, writing into the shared-memory pool.

Each process runs a :class:`~onlineaug.producer.Producer` (models loaded once) in a loop: wait while every slot it
owns holds a fresh, never-served sample (backpressure), make a batch, write the kept rows into its own slots,
update its counters and its heartbeat.

Failure handling, in the trainer (:class:`ProducerGroup`):

* an exception in a producer is sent to the trainer with the producer's traceback and re-raised there as
  :class:`ProducerError` (as ``ExceptionWrapper`` does for DataLoader workers);
* a producer that dies without one (killed, OOM-killed, segfault) is restarted while the trainer keeps serving
  batches, up to ``max_restarts`` restarts in any ``restart_window_s`` (a budget per time window, so three OOM
  kills over a multi-day run do not end it); a slot it left half-written is never served;
* a producer that stops beating (SIGSTOP, a stuck CUDA call) for ``heartbeat_timeout_s`` (``startup_timeout_s``
  while it loads and compiles its models, before its first batch) is reported with a warning, killed, restarted
  and counted in ``hangs``;
* a producer exits, and removes the pool's segments and its report folder, when its parent (the trainer) dies.

The settings (dataset, recipe, labels: possibly large) are pickled once per loader; a restart sends the same
bytes, from a thread, so it never stalls the training loop. The producers' environment drops the variables of
``torch.distributed`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...), so a user script re-imported in a producer
can never join the trainers' process group.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import pickle
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types

from onlineaug.pool import PoolSpec, unlink_segments

logger = logging.getLogger("onlineaug")

EXIT_REPORTED_ERROR = 3
PRODUCER_ENV = "ONLINEAUG_PRODUCER"  # set in producer processes
DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                   "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


class ProducerError(RuntimeError):
    """An exception raised inside a producer process, re-raised in the trainer with its traceback."""

    def __init__(self, rank: int, device: str, remote_traceback: str):
        self.rank, self.device, self.remote_traceback = rank, device, remote_traceback
        super().__init__(f"producer {rank} (generator device {device}) failed:\n\n{remote_traceback}")


@dataclasses.dataclass(frozen=True)
class Shared:
    """The segments and folder a producer process attaches to (and removes if the trainer dies)."""

    pool: PoolSpec
    sources_name: str
    sources_capacity: int
    report_dir: str


# ------------------------------------------------------------------------------------------ in the producer
def _watch_parent(stdin_fd: int, shared: Shared, trainer_pid: int, records: queue.Queue) -> None:
    """Hand the launch record on stdin to the main thread, then exit the process once the trainer is gone.

    This thread is the only reader of stdin, and it starts before the launch record has arrived (the segments'
    names come on the command line), so a trainer killed while it was still writing the record is noticed too. On
    exit it removes the pool's segments and the report folder. The trainer holds the write end of this process's
    stdin, so reading it returns EOF when the trainer exits, however it exits (SIGKILL included). Processes forked
    from the trainer (DataLoader workers) inherit that write end too, so the trainer's pid is also watched: this
    process's parent pid changes when the trainer dies.
    """
    received, delivered = bytearray(), False
    try:
        while os.getppid() == trainer_pid:
            readable, _, _ = select.select([stdin_fd], [], [], 0.5)
            if not readable:
                continue
            chunk = os.read(stdin_fd, 1 << 20)
            if not chunk:
                break
            if not delivered:
                received += chunk
                size = int.from_bytes(received[:8], "little") if len(received) >= 8 else None
                if size is not None and len(received) >= 8 + size:
                    records.put(bytes(received[8:8 + size]))
                    received, delivered = bytearray(), True
        from onlineaug.pool import _unlink_quietly

        unlink_segments(shared.pool)
        _unlink_quietly(shared.sources_name)
        shutil.rmtree(shared.report_dir, ignore_errors=True)
    finally:
        os._exit(0)  # whatever happened above, never outlive the trainer


def launch_header(shared: Shared, trainer_pid: int) -> str:
    """What a producer needs before its launch record arrives (to clean up if the trainer dies first), as hex."""
    return pickle.dumps((shared, trainer_pid)).hex()


def subprocess_main(header: str) -> None:
    """Entry point of a producer process (see :meth:`ProducerGroup._spawn`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the trainer's to handle; it stops the producers
    os.environ[PRODUCER_ENV] = "1"
    # the trainer's pid from the trainer itself: a trainer killed before this process even started is then seen
    # as gone at once (getppid() here would already name its successor)
    shared, trainer_pid = pickle.loads(bytes.fromhex(header))
    records: queue.Queue = queue.Queue(maxsize=1)
    threading.Thread(target=_watch_parent, args=(sys.stdin.fileno(), shared, trainer_pid, records), daemon=True,
                     name="onlineaug-parent-watch").start()
    launch = pickle.loads(records.get())  # if the trainer dies first, the watcher cleans up and exits the process
    try:
        sys.path[:] = launch["sys_path"]
        sys.argv[:] = launch["argv"]  # as multiprocessing's spawn does: the user's script may read it
        if launch["main_path"]:  # the settings refer to classes defined in the user's script: import it, as spawn does
            import runpy

            main = runpy.run_path(launch["main_path"], run_name="__mp_main__")
            module = types.ModuleType("__mp_main__")
            module.__dict__.update(main)
            sys.modules["__main__"] = sys.modules["__mp_main__"] = module
        settings = pickle.loads(launch["settings"])
        _produce_forever(settings, shared, launch["rank"], launch["device"], launch["generation"],
                         launch["num_threads"])
    except BaseException:  # noqa: BLE001 - every failure, start-up included, must reach the trainer
        with open(launch["error_path"], "w", encoding="utf-8") as report:
            report.write(traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_REPORTED_ERROR)


def _produce_forever(settings, shared: Shared, rank: int, device: str, generation: int, num_threads) -> None:
    import torch

    from onlineaug.pool import SamplePool
    from onlineaug.producer import Producer
    from onlineaug.sources import SharedSources

    if num_threads:
        torch.set_num_threads(num_threads)
    pool = SamplePool.attach(shared.pool)
    table = SharedSources.attach(shared.sources_name, shared.sources_capacity)

    def beat() -> None:
        pool.heartbeat_ns[rank] = time.monotonic_ns()

    beat()
    published = _wait_for_sources(table, beat)
    version, indices, weights = published
    from onlineaug.sources import SourceSet

    labels = settings.labels[indices] if settings.labels is not None else None
    producer = Producer(settings, rank=rank, device=device, generation=generation,
                        sources=SourceSet(indices, weights, labels), beat=beat)
    if pool.started_ns[rank] == 0:  # the first start: a restarted producer adds to the same counters
        pool.started_ns[rank] = time.monotonic_ns()
    owned = len(pool.slots_of(rank))
    written_counts = collections.Counter()
    store = None
    if settings.store_dir is not None:  # written here, in the producer, never on the training thread
        from onlineaug.store import ShardWriter

        store = ShardWriter(settings.store_dir, settings.pool_fields, settings.store_shard_size)
    while True:
        if table.version != version and (update := table.read()) is not None:
            version, indices, weights = update
            producer.set_sources(indices, weights)
        while pool.writable_count(rank) < min(settings.batch_size, owned):  # backpressure: nothing to overwrite
            beat()
            time.sleep(0.01)
        start = time.monotonic_ns()
        rows = producer.step()
        written = _write_rows(pool, rank, rows, beat)
        if store is not None:
            store.append(rows)
        pool.produced[rank] += written
        pool.counters["steps"][rank] += 1
        for name, total in producer.counts.items():  # counters are shared across restarts: add the deltas
            pool.counters[name][rank] += total - written_counts[name]
            written_counts[name] = total
        pool.busy_ns[rank] += time.monotonic_ns() - start
        beat()


def _wait_for_sources(table, beat):
    while (published := table.read()) is None:
        beat()
        time.sleep(0.01)
    return published


def _write_rows(pool, rank: int, rows: dict, beat) -> int:
    """Write every row into this producer's slots (a momentarily leased slot is waited for); return the count."""
    count = len(next(iter(rows.values()))) if rows else 0
    row = 0
    while row < count:
        slots = pool.choose_slots_to_write(rank, count - row)
        for slot in slots:
            if pool.write(int(slot), {name: array[row] for name, array in rows.items()}):
                row += 1
        if row < count:
            beat()
            time.sleep(0.001)
    return count


# -------------------------------------------------------------------------------------------- in the trainer
def _send_launch_record(process: subprocess.Popen, launch: bytes) -> None:
    try:
        process.stdin.write(len(launch).to_bytes(8, "little") + launch)
        process.stdin.flush()  # stdin stays open: its EOF tells the producer that the trainer is gone
    except (BrokenPipeError, ValueError, OSError):
        pass  # the producer died first (its exit is handled by poll) or the group was stopped


def _references_main(payload: bytes) -> bool:
    """Whether a pickle refers to objects defined in ``__main__`` (the user's script)."""
    import pickletools

    return any(arg == "__main__" or (isinstance(arg, str) and arg.startswith("__main__ "))
               for _, arg, _ in pickletools.genops(payload))


def _main_script() -> str:
    """The path of the user's script, for producers that need classes defined in it; a clear error otherwise."""
    main_path = getattr(sys.modules["__main__"], "__file__", None)
    if main_path is None or not os.path.isfile(main_path):
        interactive = main_path is None or main_path.startswith("<")  # None for -c and notebooks, "<stdin>" for -
        where = "an interactive session" if interactive else f"{main_path!r}, which is not a file"
        raise TypeError(f"the dataset or recipe is defined in {where} (e.g. `python -c`, `python - < script.py` or a "
                        f"notebook), so producer processes cannot import it; define it in a module, or run your "
                        f"script as a file (`python train.py`)")
    return os.path.abspath(main_path)


def producer_environment(num_threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env[PRODUCER_ENV] = "1"
    if num_threads:
        env["OMP_NUM_THREADS"] = str(num_threads)
    return env


class ProducerGroup:
    """Starts, watches and restarts the producer processes of one loader (trainer side).

    Producers are plain ``python -c`` subprocesses: the shared segments' names come on the command line, the
    launch record (settings) on stdin, which then stays open as the liveness signal. Unlike ``multiprocessing``'s spawn, the user's script is
    not re-run in the producer unless the settings need a class defined in it, so a script without an
    ``if __name__ == "__main__":`` guard works when its dataset comes from a module.
    """

    def __init__(self, settings, devices: list[str], shared: Shared, *, num_threads: list[int | None],
                 max_restarts: int = 3, restart_window_s: float = 3600.0, heartbeat_timeout_s: float = 300.0,
                 startup_timeout_s: float = 1800.0):
        self.devices, self.shared = list(devices), shared
        self.max_restarts, self.restart_window_s = max_restarts, restart_window_s
        self.heartbeat_timeout_s, self.startup_timeout_s = heartbeat_timeout_s, startup_timeout_s
        self._settings = pickle.dumps(settings)  # once: restarts reuse the bytes
        self._main_path = _main_script() if _references_main(self._settings) else None
        self._num_threads = list(num_threads)
        n = len(self.devices)
        self._processes: list[subprocess.Popen | None] = [None] * n
        self._generations = [0] * n
        self._launched_at = [0.0] * n
        self._steps_at_launch = [0] * n
        self._restart_times: collections.deque[float] = collections.deque()
        self._spawn_errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stopped = False
        self.restarts = 0
        self.hangs = 0
        self._last_poll = 0.0
        self.failure: str | None = None  # set once the group has stopped after an error
        self._pool = None  # the trainer's view of the pool, for heartbeats (set by attach_pool)

    def attach_pool(self, pool) -> None:
        self._pool = pool

    def start(self) -> None:
        for rank in range(len(self.devices)):
            self._spawn(rank)

    def _error_path(self, rank: int) -> str:
        return os.path.join(self.shared.report_dir, f"producer-{rank}.traceback")

    def _spawn(self, rank: int) -> None:
        launch = pickle.dumps({
            "sys_path": list(sys.path), "argv": list(sys.argv),
            "main_path": self._main_path, "settings": self._settings, "rank": rank,
            "device": self.devices[rank], "generation": self._generations[rank],
            "num_threads": self._num_threads[rank], "error_path": self._error_path(rank)})
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        bootstrap = (f"import sys; sys.path.insert(0, {package_root!r}); "
                     f"from onlineaug.producer_processes import subprocess_main; "
                     f"subprocess_main({launch_header(self.shared, os.getpid())!r})")
        process = subprocess.Popen([sys.executable, "-c", bootstrap], stdin=subprocess.PIPE, close_fds=True,
                                   env=producer_environment(self._num_threads[rank]))
        with self._lock:
            if self._stopped:  # stop() ran while this (background) restart was starting the process
                _kill(process)
                return
            self._processes[rank] = process
            self._launched_at[rank] = time.monotonic()
            self._steps_at_launch[rank] = int(self._pool.counters["steps"][rank]) if self._pool is not None else 0
        # A large dataset makes a large record, and the pipe takes it only as fast as the new interpreter reads
        # it: write it from a thread so that a restart never stalls the training loop.
        threading.Thread(target=_send_launch_record, args=(process, launch), daemon=True,
                         name=f"onlineaug-launch-{rank}").start()

    def _respawn_in_background(self, rank: int) -> None:
        def respawn():
            try:
                self._spawn(rank)
            except BaseException as error:  # noqa: BLE001 - reported by the next poll
                self._spawn_errors.append(error)

        with self._lock:
            self._processes[rank] = None  # being replaced
        threading.Thread(target=respawn, daemon=True, name=f"onlineaug-restart-{rank}").start()

    @property
    def pids(self) -> list[int | None]:
        return [p.pid if p is not None else None for p in self._processes]

    def is_alive(self, rank: int) -> bool:
        process = self._processes[rank]
        return process is not None and process.poll() is None

    def _use_restart_budget(self, rank: int, why: str) -> None:
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > self.restart_window_s:
            self._restart_times.popleft()
        if len(self._restart_times) >= self.max_restarts:
            self.stop()
            self.failure = f"producer {rank} {why} and the restart budget ({self.max_restarts} per " \
                           f"{self.restart_window_s:.0f} s) was used up"
            raise RuntimeError(
                f"producer {rank} (device {self.devices[rank]}) {why}, and {len(self._restart_times)} restarts in the "
                f"last {self.restart_window_s:.0f} s used up the budget (max_restarts={self.max_restarts} per "
                f"restart_window_s={self.restart_window_s:.0f}); look for out-of-memory kills (`dmesg`), or raise "
                f"max_restarts")
        self._restart_times.append(now)
        self.restarts += 1
        self._generations[rank] += 1
        self._respawn_in_background(rank)

    def _hung(self, rank: int) -> str | None:
        """Why producer ``rank`` counts as hung, or None."""
        if self._pool is None:
            return None
        now = time.monotonic()
        starting = int(self._pool.counters["steps"][rank]) == self._steps_at_launch[rank]
        limit = self.startup_timeout_s if starting else self.heartbeat_timeout_s
        beat_ns = int(self._pool.heartbeat_ns[rank])
        last = max(self._launched_at[rank], beat_ns / 1e9 if beat_ns else 0.0)
        if now - last <= limit:
            return None
        phase = "while starting (loading and compiling its models)" if starting else "while producing"
        return f"sent no heartbeat for {now - last:.0f} s {phase} (limit {limit:.0f} s)"

    def poll(self, *, min_interval_s: float = 0.0) -> None:
        """Raise a producer's exception; restart producers that died or hung."""
        if self.failure is not None:
            raise RuntimeError(f"the producers were stopped after an earlier error ({self.failure}); create a "
                               f"new loader")
        if self._spawn_errors:
            error = self._spawn_errors.pop()
            self.stop()
            self.failure = f"a producer could not be restarted: {error}"
            raise RuntimeError(self.failure) from error
        now = time.monotonic()
        if now - self._last_poll < min_interval_s:
            return
        self._last_poll = now
        for rank, process in enumerate(list(self._processes)):
            if process is None:
                continue  # being restarted
            if process.poll() is None:
                why = self._hung(rank)
                if why is None:
                    continue
                logger.warning("onlineaug: producer %d (device %s) %s: killing and restarting it", rank,
                               self.devices[rank], why)
                self.hangs += 1
                _kill(process)
                self._use_restart_budget(rank, f"hung ({why})")
                continue
            with contextlib.suppress(BrokenPipeError, OSError):
                process.stdin.close()
            if process.returncode == EXIT_REPORTED_ERROR and os.path.exists(self._error_path(rank)):
                with open(self._error_path(rank), encoding="utf-8") as report:
                    remote_traceback = report.read()
                self.stop()
                self.failure = f"producer {rank} raised an exception"
                raise ProducerError(rank, self.devices[rank], remote_traceback)
            self._use_restart_budget(rank, f"died with exit code {process.returncode}")

    def stop(self, timeout: float = 2.0) -> None:
        """Stop every producer: SIGTERM (and SIGCONT, so a stopped one handles it), then SIGKILL after ``timeout``."""
        with self._lock:
            self._stopped = True
            processes = [p for p in self._processes if p is not None]
            self._processes = [None] * len(self.devices)
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
                    os.kill(process.pid, signal.SIGCONT)
        deadline = time.monotonic() + timeout
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill(process)
            with contextlib.suppress(BrokenPipeError, OSError):
                process.stdin.close()


def _kill(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    process.wait()


def make_report_dir() -> str:
    return tempfile.mkdtemp(prefix="onlineaug-producers-")
