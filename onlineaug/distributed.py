"""What the loader needs from ``torch.distributed`` when trainers run under ``torchrun``.

One node, ``L`` trainer processes (local ranks ``0..L-1``, global ranks ``0..W-1``):

* **sharding**: without a sampler each rank gets a ``DistributedSampler`` (built by the loader, as timm's
  ``create_loader`` does), so an epoch is ``N / W`` samples per rank and producers draw only from the rank's
  shard (:mod:`onlineaug.sources`);
* **generator GPUs**: :func:`layout` says which local rank this is and how many share the node, the pure rules
  in :mod:`onlineaug.devices` deal the GPUs, and :func:`agree_on_generator_devices` compares every rank's
  choice (one ``all_gather_object``) so two ranks never load models on one GPU unless the user allows it;
* **one voice per node**: progress bars and warnings come from local rank 0 only (:attr:`Layout.speaks`);
* **global counters**: :func:`sum_over_ranks` all-reduces a vector of counters.

Every function works without a process group (a world of one), so single-process code takes the same path.
The collectives here are collective: every rank must call them, in the same order (they run while the loader
is built, and in ``stats(reduce=True)``).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Sequence

import torch

from onlineaug.devices import shared_generator_gpus


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where this trainer process sits: global ``rank`` of ``world_size``, ``local_rank`` of ``local_world_size``
    on its node. ``initialized``: a ``torch.distributed`` process group is up."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    initialized: bool = False

    @property
    def distributed(self) -> bool:
        """Several trainer ranks share the data (a process group of more than one)."""
        return self.initialized and self.world_size > 1

    @property
    def speaks(self) -> bool:
        """Whether this process shows progress bars and warnings: local rank 0 (one voice per node)."""
        return self.local_rank == 0


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def node_name() -> str:
    """The machine this process runs on, as ranks compare it (hostname, and torchrun's node rank if set)."""
    group = os.environ.get("GROUP_RANK")
    return socket.gethostname() + (f"#{group}" if group is not None else "")


def layout() -> Layout:
    """This process's place among the trainers.

    With a process group: global rank and size from it; local rank and size from torchrun's ``LOCAL_RANK`` and
    ``LOCAL_WORLD_SIZE``, or, when a launcher sets neither (``mp.spawn``), from the ranks that share this node
    (one ``all_gather_object`` of :func:`node_name`). Without one: ``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` if set (a
    process of a torchrun job that has not initialised its group yet), else a world of one.
    """
    local_rank, local_size = os.environ.get("LOCAL_RANK"), os.environ.get("LOCAL_WORLD_SIZE")
    if not is_initialized():
        if local_rank is not None and local_size is not None:
            return Layout(local_rank=_env_int("LOCAL_RANK", local_rank), local_world_size=_env_int(
                "LOCAL_WORLD_SIZE", local_size, low=1))
        return Layout()
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if local_rank is not None and local_size is not None:
        local = _env_int("LOCAL_RANK", local_rank), _env_int("LOCAL_WORLD_SIZE", local_size, low=1)
    else:
        nodes = gather(node_name())
        mine = [r for r, node in enumerate(nodes) if node == nodes[rank]]
        local = mine.index(rank), len(mine)
    return Layout(rank=rank, world_size=world_size, local_rank=local[0], local_world_size=local[1], initialized=True)


def _env_int(name: str, value: str, low: int = 0) -> int:
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if number < low:
        raise ValueError(f"the environment variable {name}={value!r} is not an int >= {low} (set by torchrun; "
                         f"unset it or launch with torchrun)")
    return number


def gather(value) -> list:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` without a process group."""
    if not is_initialized():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """The element-wise sum of ``values`` over all ranks (one float64 ``all_reduce``); ``values`` alone without a
    process group. The tensor goes where the backend wants it: the current CUDA device for NCCL, the CPU else."""
    if not is_initialized():
        return [float(v) for v in values]
    device = torch.device("cpu")
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor.cpu().tolist()


def gpu_identity(device: torch.device) -> str:
    """A name for the physical GPU behind ``device`` that is the same in every process (its UUID), so ranks with
    different ``CUDA_VISIBLE_DEVICES`` are compared correctly; ``cuda:N`` where the UUID is not available."""
    try:
        return f"GPU-{torch.cuda.get_device_properties(device).uuid}"
    except (AttributeError, RuntimeError, AssertionError):
        return str(device)


def agree_on_generator_devices(layout_: Layout, trainer: torch.device, generators: Sequence[str],
                               failure: BaseException | None, *, allow_shared: bool = False) -> None:
    """Raise, on every rank alike, if a rank could not choose its generator devices (``failure``) or, unless
    ``allow_shared``, if two ranks of one node would load models on the same generator GPU.

    Gathers ``(node, trainer GPU, generator GPUs, error)`` from every rank (a collective: all ranks call it, so
    one rank's bad ``generator_devices`` entry stops them all instead of leaving the others waiting) and applies
    :func:`onlineaug.devices.shared_generator_gpus`. Without a process group only ``failure`` is raised.
    """
    if not layout_.distributed:
        if failure is not None:
            raise failure
        return
    mine = {"rank": layout_.rank, "node": node_name(),
            "trainer": gpu_identity(trainer) if trainer.type == "cuda" else None,
            "generators": sorted({gpu_identity(torch.device(d)) for d in generators if d.startswith("cuda")}),
            "error": None if failure is None else f"{type(failure).__name__}: {failure}"}
    records = gather(mine)
    if failure is not None:
        raise failure
    failed = [r for r in records if r["error"] is not None]
    if failed:
        raise ValueError(f"rank {failed[0]['rank']} could not choose its generator devices ({failed[0]['error']}); "
                         f"every rank stops with it")
    conflicts = [] if allow_shared else shared_generator_gpus(records)
    if conflicts:
        raise ValueError(
            "two trainer ranks would load models on the same generator GPU: " + "; ".join(conflicts) + ". Give "
            "each local rank its own GPUs (generator_devices='auto', a dict {local_rank: [...]} or "
            "lambda local_rank: [...]), or pass allow_shared_generator_devices=True if sharing is intended")
