"""Processes and ranks: who am I, how many are we, and the few collectives we need.

Shared by batch segmentation / evaluation and the fine-tuning runner. A *rank* comes
from the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``); without them a run is rank 0 of 1. A process
group is only needed for collectives (barrier, all-reduce): ``init_process_group``
picks gloo on the CPU and NCCL on CUDA, and does nothing for a single process.

    info = dist_info()
    mine = shard(cases, info.rank, info.world)       # case i -> rank i % world
    torch.set_num_threads(threads_per_worker(info.local_world))
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Long enough for ranks that finish their share hours apart to meet at a barrier.
BARRIER_TIMEOUT = datetime.timedelta(hours=48)


@dataclass(frozen=True)
class DistInfo:
    """This process's place: global ``rank`` of ``world``; ``local_rank`` of
    ``local_world`` processes on this machine (1 when not given); ``rendezvous``:
    torchrun's MASTER_ADDR is set, so a process group can be formed."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    rendezvous: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes shared files (summaries, reports, checkpoints)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def dist_info(env: Mapping[str, str] | None = None) -> DistInfo:
    """Read the torchrun variables from ``env`` (default ``os.environ``).

    Raises ValueError for inconsistent values (a rank outside ``0..WORLD_SIZE-1``).
    """
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", 1))
    rank = int(env.get("RANK", 0))
    local_world = int(env.get("LOCAL_WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", 0))
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < max(local_world, 1):
        raise ValueError(
            f"bad torchrun environment RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local_rank} "
            f"LOCAL_WORLD_SIZE={local_world}: need 0 <= RANK < WORLD_SIZE"
        )
    return DistInfo(rank, world, local_rank, local_world, bool(env.get("MASTER_ADDR")))


def shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """Item ``i`` goes to worker ``i % count``: deterministic, no overlap, nothing left
    out, whatever has already been done (so ranks need not agree on progress)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"worker {index} of {count}: need 0 <= index < count")
    return [item for i, item in enumerate(items) if i % count == index]


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a Slurm allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_per_worker(workers_here: int, cores: int | None = None) -> int:
    """Torch intra-op threads for one of ``workers_here`` processes sharing this
    machine's cores: ``cores // workers``, at least 1 (more only oversubscribes)."""
    cores = cpu_cores() if cores is None else cores
    return max(1, cores // max(1, workers_here))


def worker_device(name: str, slot: int) -> str:
    """The device for local worker ``slot``: ``cuda``/``auto`` on a machine with several
    GPUs becomes ``cuda:<slot % count>``; anything else is returned unchanged."""
    import torch

    if name in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count > 1:
            return f"cuda:{slot % count}"
    return name


def init_process_group(
    device_type: str = "cpu", timeout: datetime.timedelta | None = None, required: bool = False
) -> bool:
    """Join torchrun's process group: NCCL for ``device_type == "cuda"``, else gloo.

    The one place a process group is formed (batch segmentation, evaluation, training).
    Returns True if a group exists afterwards (joined here or before), False for a
    single process or when no rendezvous address is set (ranks given by hand).
    ``required``: several ranks without a rendezvous are an InputError instead (DDP
    training cannot run that way). The rendezvous itself is torchrun's ``env://``.
    """
    import torch.distributed as dist

    info = dist_info()
    if not info.distributed:
        return False
    if not info.rendezvous or not dist.is_available():
        if required:
            from RobustMedSAMLib.errors import InputError

            raise InputError(
                f"WORLD_SIZE={info.world} but no process group can be formed (MASTER_ADDR "
                "unset or torch.distributed missing): launch with torchrun"
            )
        return False
    if dist.is_initialized():
        return True
    backend = "nccl" if device_type == "cuda" else "gloo"
    kwargs = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group(backend, **kwargs)
    log.info("rank %d of %d joined the %s process group", info.rank, info.world, backend)
    return True


def long_wait_group(timeout: datetime.timedelta = BARRIER_TIMEOUT):
    """A gloo group of every rank for waits of hours (one rank building a cache or
    finishing its share) while the main group keeps its short timeout, which is what
    catches a hung collective. Every rank must call this, in the same order."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=timeout)


def barrier(group=None) -> None:
    """Wait for every rank of ``group`` (default: the main group); no-op without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def destroy_process_group() -> None:
    """Leave the process group if this process is in one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
