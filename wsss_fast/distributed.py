"""Scale-out under ``torchrun``: rank discovery, static sharding and the device of each rank.

Offline labeling needs every image exactly once, so the sorted id list is split by stride
(``ids[rank::world]``): no padding and no duplicates (unlike ``DistributedSampler``), and a
restarted rank redoes exactly its own ids. No DDP: ranks only meet at the final barrier.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class RankContext:
    rank: int
    world: int
    device: torch.device
    distributed: bool      # a process group was initialized here

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def shard(ids: Sequence[T], rank: int, world: int) -> list[T]:
    """The ids of ``rank``: every ``world``-th of the sorted list, starting at ``rank``."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    return sorted(ids)[rank::world]


def resolve_device(device: Optional[str], local_rank: int = 0) -> torch.device:
    """``None``/"auto": this rank's GPU if there is one, else the CPU; "cuda" under torchrun:
    ``cuda:LOCAL_RANK`` (one GPU per rank)."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(resolved)
    return resolved


def init_ranks(device: Optional[str] = None) -> RankContext:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; with more than one rank, join a process
    group (NCCL on GPUs, gloo on CPUs) used only for the final barrier."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    resolved = resolve_device(device, local_rank)
    distributed = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=6))
        distributed = True
    return RankContext(rank=rank, world=world, device=resolved, distributed=distributed)


def barrier(context: RankContext) -> None:
    if dist.is_initialized():
        dist.barrier()


def close(context: RankContext) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()
