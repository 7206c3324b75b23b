"""Data parallelism over processes: rank / world size from the launcher, a shard per rank, barriers.

Works under ``torchrun --nproc_per_node=N`` and ``accelerate launch`` (both export RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT), and as a plain single process without any of them. The
process group uses gloo on CPU and nccl on CUDA; one already set up by the launcher is reused.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self, device: torch.device) -> None:
        if self.world > 1:
            if device.type == "cuda":
                dist.barrier(device_ids=[device.index or 0])
            else:
                dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """ "auto" -> cuda:LOCAL_RANK when CUDA is available, else cpu; a bare "cuda" also gets LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def setup(device_name: str) -> tuple[Dist, torch.device]:
    """Join the launcher's process group (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world == 1:
        return Dist(), device
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Ranks finish their shards at different times; the final barrier must outwait the slowest.
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=6))
        owns = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, owns_group=owns), device


def shard(groups: list[list], world: int, rank: int) -> list[list]:
    """Deterministic balanced split: each group (the questions of one video) goes whole to the least
    loaded rank so far, by question count; every rank computes the same split."""
    if world == 1:
        return groups
    load = [0] * world
    mine = []
    for group in groups:
        target = min(range(world), key=lambda r: (load[r], r))
        load[target] += len(group)
        if target == rank:
            mine.append(group)
    return mine
