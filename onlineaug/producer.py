"""Producer processes: dataset -> diffusion pipeline -> shared-memory pool.

One process per generator device (a fresh interpreter, as CUDA requires). Each one loads its pipeline, draws
source samples from the dataset with its own seeded generator, runs them through ``recipe.produce`` in
batches and writes the payloads into its own slots of the pool.

Failure handling, in the trainer (:class:`ProducerGroup`):

* an exception in a producer is sent to the trainer with the producer's traceback and re-raised there as
  :class:`ProducerError` (as ``ExceptionWrapper`` does for DataLoader workers);
* a producer that dies without one (killed, OOM-killed, segfault) is restarted, up to ``max_restarts``
  times in total, while the trainer keeps serving batches; a slot it left half-written is never served;
* a producer exits, and removes the pool's segments, when its parent (the trainer) dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
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

import numpy as np

from onlineaug.pool import PoolSpec, unlink_segments

EXIT_REPORTED_ERROR = 3
PRODUCER_ENV = "ONLINEAUG_PRODUCER"  # set in producer processes


class ProducerError(RuntimeError):
    """An exception raised inside a producer process, re-raised in the trainer with its traceback."""

    def __init__(self, rank: int, device: str, remote_traceback: str):
        self.rank, self.device, self.remote_traceback = rank, device, remote_traceback
        super().__init__(f"producer {rank} (generator device {device}) failed:\n\n{remote_traceback}")


@dataclasses.dataclass
class ProducerConfig:
    """Everything a producer process needs (pickled into the spawned process)."""

    rank: int
    device: str
    generator: str
    recipe: object  # a Recipe (picklable)
    dataset: object  # the user's map-style dataset (must be picklable, as for DataLoader workers)
    num_classes: int
    image_size: int
    batch_size: int
    seed: int
    trainer_rank: int = 0  # in distributed training: producers of different trainers draw different sources
    compile_unet: bool = False
    num_threads: int | None = None


def _watch_parent(stdin, spec: PoolSpec, parent_pid: int) -> None:
    """Exit the process (after removing the pool's segments) once the trainer is gone.

    The trainer holds the write end of this process's stdin, so reading it returns EOF when the trainer
    exits, however it exits (SIGKILL included). Processes forked from the trainer (DataLoader workers)
    inherit that write end too, so the parent pid is also watched: it changes when the trainer dies.
    """
    try:
        while os.getppid() == parent_pid:
            readable, _, _ = select.select([stdin], [], [], 0.5)
            if readable and not os.read(stdin.fileno(), 65536):
                break
        unlink_segments(spec)
    finally:
        os._exit(0)  # whatever happened above, never outlive the trainer


def subprocess_main() -> None:
    """Entry point of a producer process (see :meth:`ProducerGroup._start`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the trainer's to handle; it stops the producers
    os.environ[PRODUCER_ENV] = "1"
    stdin = sys.stdin.buffer
    size = int.from_bytes(stdin.read(8), "little")
    launch = pickle.loads(stdin.read(size))  # only the standard library is needed to read the launch record
    try:
        sys.path[:] = launch["sys_path"]
        sys.argv[:] = launch["argv"]  # as multiprocessing's spawn does: the user's script may read it
        if launch["main_path"]:  # the config refers to classes defined in the user's script: import it, as spawn does
            import runpy

            main = runpy.run_path(launch["main_path"], run_name="__mp_main__")
            module = types.ModuleType("__mp_main__")
            module.__dict__.update(main)
            sys.modules["__main__"] = sys.modules["__mp_main__"] = module
        config, spec = pickle.loads(launch["config"])
        # the trainer's pid from the trainer itself: a trainer killed before this process even started is
        # then seen as gone at once (getppid() here would already name its successor)
        threading.Thread(target=_watch_parent, args=(stdin, spec, launch["trainer_pid"]), daemon=True,
                         name="onlineaug-parent-watch").start()
        _produce_forever(config, spec, launch["generation"])
    except BaseException:  # noqa: BLE001 - every failure, start-up included, must reach the trainer
        with open(launch["error_path"], "w", encoding="utf-8") as report:
            report.write(traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_REPORTED_ERROR)


def _produce_forever(config: ProducerConfig, spec: PoolSpec, generation: int) -> None:
    import torch

    from onlineaug.generators import load_pipeline
    from onlineaug.images import load_image, resize_uint8
    from onlineaug.pool import SamplePool
    from onlineaug.recipes.base import SourceBatch
    from onlineaug.seeding import numpy_generator, torch_generator

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    pool = SamplePool.attach(spec)
    recipe = config.recipe
    pipeline = load_pipeline(config.generator, recipe.generator_task, device=config.device,
                             compile_unet=config.compile_unet, seed=config.seed)
    role = f"trainer{config.trainer_rank}/producer"  # streams differ by trainer, producer rank and restart
    generator = torch_generator(config.seed, role, config.rank, generation, device=device)
    recipe.prepare(pipeline, config.dataset, device=device, generator=generator)
    sources_rng = numpy_generator(config.seed, f"{role}/sources", config.rank, generation)
    rank = config.rank
    if pool.started_ns[rank] == 0:  # the first start: a restarted producer adds to the same counters
        pool.started_ns[rank] = time.monotonic_ns()
    while True:
        start = time.monotonic_ns()
        indices = sources_rng.integers(0, len(config.dataset), size=config.batch_size)
        items = [load_image(config.dataset, int(i), config.num_classes) for i in indices]
        sources = SourceBatch(
            images=torch.stack([resize_uint8(image, recipe.generation_size) for image, _ in items]).to(device),
            originals=torch.stack([resize_uint8(image, config.image_size) for image, _ in items]),
            labels=torch.tensor([label for _, label in items], dtype=torch.int64),
            indices=torch.from_numpy(indices.astype(np.int64)),
        )
        with torch.inference_mode():
            payload = recipe.produce(pipeline, sources, image_size=config.image_size, generator=generator)
        arrays = {name: value.detach().cpu().numpy() for name, value in payload.items()}
        slots = pool.choose_slots_to_write(rank, config.batch_size)
        for row, slot in enumerate(slots):
            pool.write(int(slot), {name: array[row] for name, array in arrays.items()})
        pool.produced[rank] += len(slots)
        pool.busy_ns[rank] += time.monotonic_ns() - start


def _send_launch_record(process: subprocess.Popen, launch: bytes) -> None:
    try:
        process.stdin.write(len(launch).to_bytes(8, "little") + launch)
        process.stdin.flush()  # stdin stays open: its EOF tells the producer that the trainer is gone
    except (BrokenPipeError, ValueError):
        pass  # the producer died first (its exit is handled by poll) or the group was stopped


def _references_main(payload: bytes) -> bool:
    """Whether a pickle refers to objects defined in ``__main__`` (the user's script)."""
    import pickletools

    return any(arg == "__main__" or (isinstance(arg, str) and arg.startswith("__main__ "))
               for _, arg, _ in pickletools.genops(payload))


class ProducerGroup:
    """Starts, watches and restarts the producer processes of one loader (trainer side).

    Producers are plain ``python -c`` subprocesses: the launch record (config, pool spec) arrives on stdin,
    which then stays open as the liveness signal. Unlike ``multiprocessing``'s spawn, the user's script is
    not re-run in the producer unless the config needs a class defined in it, so the README example works
    without an ``if __name__ == "__main__":`` guard.
    """

    def __init__(self, configs: list[ProducerConfig], spec: PoolSpec, *, max_restarts: int = 3):
        self.configs, self.spec, self.max_restarts = configs, spec, max_restarts
        self._processes: list[subprocess.Popen | None] = [None] * len(configs)
        self._generations = [0] * len(configs)
        self._report_dir = tempfile.mkdtemp(prefix="onlineaug-producers-")
        self.restarts = 0
        self._last_poll = 0.0
        self.failure: str | None = None  # set once the group has stopped after an error

    def start(self) -> None:
        for rank in range(len(self.configs)):
            self._start(rank)

    def _error_path(self, rank: int) -> str:
        return os.path.join(self._report_dir, f"producer-{rank}.traceback")

    def _start(self, rank: int) -> None:
        config = pickle.dumps((self.configs[rank], self.spec))
        main_path = None
        if _references_main(config):
            main_path = getattr(sys.modules["__main__"], "__file__", None)
            if main_path is None:
                raise TypeError("the dataset or recipe is defined in an interactive session (__main__ has no "
                                "file), so producer processes cannot import it; define it in a module")
        launch = pickle.dumps({"trainer_pid": os.getpid(), "sys_path": list(sys.path), "argv": list(sys.argv),
                               "main_path": main_path, "config": config,
                               "generation": self._generations[rank], "error_path": self._error_path(rank)})
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        bootstrap = (f"import sys; sys.path.insert(0, {package_root!r}); "
                     f"from onlineaug.producer import subprocess_main; subprocess_main()")
        process = subprocess.Popen([sys.executable, "-c", bootstrap], stdin=subprocess.PIPE, close_fds=True)
        self._processes[rank] = process
        # A large dataset makes a large record, and the pipe takes it only as fast as the new interpreter
        # reads it: write it from a thread so that a restart never stalls the training loop.
        threading.Thread(target=_send_launch_record, args=(process, launch), daemon=True,
                         name=f"onlineaug-launch-{rank}").start()

    @property
    def pids(self) -> list[int | None]:
        return [p.pid if p is not None else None for p in self._processes]

    def is_alive(self, rank: int) -> bool:
        process = self._processes[rank]
        return process is not None and process.poll() is None

    def poll(self, *, min_interval_s: float = 0.0) -> None:
        """Raise a producer's exception; restart producers that died without one."""
        if self.failure is not None:
            raise RuntimeError(f"the producers were stopped after an earlier error ({self.failure}); create a "
                               f"new loader")
        now = time.monotonic()
        if now - self._last_poll < min_interval_s:
            return
        self._last_poll = now
        for rank, process in enumerate(self._processes):
            if process is None or process.poll() is None:
                continue
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
            if process.returncode == EXIT_REPORTED_ERROR and os.path.exists(self._error_path(rank)):
                with open(self._error_path(rank), encoding="utf-8") as report:
                    remote_traceback = report.read()
                self.stop()
                self.failure = f"producer {rank} raised an exception"
                raise ProducerError(rank, self.configs[rank].device, remote_traceback)
            if self.restarts >= self.max_restarts:
                self.stop()
                self.failure = f"producer {rank} died and the restart limit ({self.max_restarts}) was used up"
                raise RuntimeError(
                    f"producer {rank} (device {self.configs[rank].device}) died with exit code {process.returncode} "
                    f"and the restart limit ({self.max_restarts}) is used up; look for out-of-memory kills "
                    f"(`dmesg`), or raise max_restarts")
            self.restarts += 1
            self._generations[rank] += 1
            self._start(rank)

    def stop(self, timeout: float = 5.0) -> None:
        for process in self._processes:
            if process is not None and process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout
        for process in self._processes:
            if process is None:
                continue
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
        self._processes = [None] * len(self.configs)
        shutil.rmtree(self._report_dir, ignore_errors=True)
