"""Devices: parsing the ones users name (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``) with clear
errors, and sharing a node's GPUs among several trainer ranks (``torchrun``) without two ranks loading models on
the same generator GPU. The sharing rules are pure functions of counts and names, so they are tested without
GPUs; :mod:`onlineaug.distributed` feeds them what the process group knows."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def parse_device(value, what: str = "device") -> torch.device:
    """``value`` as a CPU or CUDA ``torch.device`` that exists here; ``"cuda"`` becomes ``cuda:<current>``.

    ``what`` names the argument in error messages (e.g. ``"generator_devices"``).
    """
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{what}={value!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}={value!r} asks for CUDA but torch.cuda.is_available() is False on this "
                             f"machine; use 'cpu'")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"{what}={value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"{what}={value!r}: only 'cpu' and CUDA devices are supported")
    return device


# ------------------------------------------------------------------------------------ several trainer ranks
def assign_generator_devices(num_gpus: int, local_rank: int, local_world_size: int, spec, *,
                             trainer_gpu: int | None = None, allow_shared: bool = False) -> list[str]:
    """The generator devices of local rank ``local_rank`` (of ``local_world_size`` trainer ranks on a node
    with ``num_gpus`` GPUs), from the user's ``generator_devices`` ``spec``.

    ``spec`` is one of:

    * ``"auto"``: the node's GPUs that no trainer uses (local rank ``i`` trains on ``cuda:i``, as under
      ``torchrun``, so ``cuda:L .. cuda:num_gpus-1`` are free), dealt round-robin: local rank ``i`` gets free
      GPUs ``i, i + L, i + 2L, ...``. Fewer free GPUs than local ranks is an error (a rank would have none),
      unless ``allow_shared``: rank ``i`` then shares free GPU ``i mod #free`` with other ranks.
    * a device or list of devices: the same list on every rank (the ranks of one node then overlap, which the
      loader refuses for GPUs unless ``allow_shared``, see :func:`shared_generator_gpus`);
    * a dict ``{local_rank: devices}`` or a callable ``local_rank -> devices``: a list per rank.

    ``trainer_gpu`` is the CUDA index this rank trains on (None: it trains on the CPU); with ``"auto"`` it must
    be one of the trainer GPUs ``0 .. L-1``, or ``"auto"`` would hand it to another rank's producers. The
    devices are returned as given (strings); the loader then checks that they exist.
    """
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"local rank {local_rank} is outside [0, {local_world_size}) (LOCAL_RANK and "
                         f"LOCAL_WORLD_SIZE disagree)")
    if isinstance(spec, str) and spec == "auto":
        return _auto_devices(num_gpus, local_rank, local_world_size, trainer_gpu, allow_shared)
    if isinstance(spec, Mapping):
        if local_rank not in spec:
            raise ValueError(f"generator_devices is a dict without local rank {local_rank} (it has "
                             f"{sorted(spec, key=str)}): give every local rank 0..{local_world_size - 1} its "
                             f"list of devices")
        devices, given = spec[local_rank], f"generator_devices[{local_rank}]={spec[local_rank]!r} is invalid"
    elif callable(spec):
        devices = spec(local_rank)
        given = f"generator_devices({local_rank}) returned {devices!r}"
    else:
        devices, given = spec, f"argument generator_devices={spec!r} is invalid"
    if isinstance(devices, (str, torch.device)):
        devices = [devices]
    if devices is None or isinstance(devices, bytes) or not isinstance(devices, Sequence):
        raise TypeError(f"{given}: expected a list of devices, e.g. ['cuda:1', 'cuda:2'] or ['cpu'] (or 'auto', a "
                        f"dict {{local_rank: [...]}} or a callable local_rank -> [...])")
    return [str(d) for d in devices]


def _auto_devices(num_gpus: int, local_rank: int, local_world_size: int, trainer_gpu: int | None,
                  allow_shared: bool) -> list[str]:
    trainers = f"cuda:0..cuda:{local_world_size - 1}" if local_world_size > 1 else "cuda:0"
    if trainer_gpu is not None and trainer_gpu >= local_world_size:
        raise ValueError(f"generator_devices='auto' assumes local rank i trains on cuda:i (the trainer GPUs are "
                         f"{trainers}), but this rank (local rank {local_rank}) trains on cuda:{trainer_gpu}; train "
                         f"on cuda:{local_rank} or list the generator devices yourself")
    free = list(range(local_world_size, num_gpus))
    if not free:
        raise ValueError(f"generator_devices='auto' found no GPU to generate on: this node has {num_gpus} GPU(s) "
                         f"and its {local_world_size} trainer rank(s) use {trainers}. Run fewer trainer ranks "
                         f"(torchrun --nproc_per_node), generate on the CPU (generator_devices=['cpu']), or share a "
                         f"trainer's GPU explicitly (generator_devices=lambda local_rank: [f'cuda:{{local_rank}}'])")
    if len(free) < local_world_size:
        if not allow_shared:
            spare = f"cuda:{free[0]}" + (f"..cuda:{free[-1]}" if len(free) > 1 else "")
            raise ValueError(f"generator_devices='auto': {len(free)} free GPU(s) ({spare}) "
                             f"for {local_world_size} trainer ranks, so some ranks would have none. Run at most "
                             f"{len(free)} trainer ranks per node, or pass allow_shared_generator_devices=True to "
                             f"let ranks share a generator GPU (each loads its own models on it)")
        return [f"cuda:{free[local_rank % len(free)]}"]
    return [f"cuda:{index}" for index in free[local_rank::local_world_size]]


def shared_generator_gpus(records: Sequence[Mapping]) -> list[str]:
    """The GPUs that two trainer ranks would both use while at least one of them generates on it.

    ``records`` has one entry per rank (as gathered from every rank): ``{"rank", "node", "trainer",
    "generators"}`` where ``node`` names the machine, ``trainer`` is the identity of the GPU the rank trains on
    (or None) and ``generators`` those of its generator GPUs (identities: a GPU's UUID, or ``cuda:N``). A rank
    may generate on its own trainer GPU (one GPU doing both); another rank may not. Returns one line per
    conflict, empty when every generator GPU belongs to one rank.
    """
    users: dict[tuple, dict[int, set[str]]] = {}
    for record in records:
        uses = [(record["trainer"], "trains")] if record["trainer"] is not None else []
        uses += [(gpu, "generates") for gpu in record["generators"]]
        for gpu, role in uses:
            users.setdefault((record["node"], gpu), {}).setdefault(int(record["rank"]), set()).add(role)
    conflicts = []
    for (node, gpu), by_rank in users.items():
        if len(by_rank) > 1 and any("generates" in roles for roles in by_rank.values()):
            who = ", ".join(f"rank {rank} {' and '.join(sorted(roles))}" for rank, roles in sorted(by_rank.items()))
            conflicts.append(f"{gpu} on node {node} ({who})")
    return sorted(conflicts)


def producer_threads(cpu_count: int, local_world_size: int, cpu_producers: int) -> int | None:
    """CPU threads for each CPU producer: the node's cores divided among its ``local_world_size`` trainer
    processes, then among each one's trainer and its ``cpu_producers`` CPU producers (None: no CPU producer)."""
    if cpu_producers == 0:
        return None
    per_process = max(1, cpu_count // max(1, local_world_size))
    return max(1, per_process // (cpu_producers + 1))
