"""Data parallelism over processes: rank / world size from the launcher, a shard per rank, barriers.

Works under ``torchrun --nproc_per_node=N`` and ``accelerate launch`` (both export RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT), and as a plain single process without any of them. The
process group uses gloo on CPU and nccl on CUDA; one already set up by the launcher is reused.

A worker ends itself when its launcher dies (:func:`exit_with_launcher`): a launcher killed with SIGKILL
cannot stop its workers, which would otherwise go on writing into a run directory nobody owns any more.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..cli import USAGE_ERRORS
from ..devices import resolve_device
from .errors import RunFailed


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

    def share(self, value):
        """Rank 0's ``value`` on every rank (picklable; e.g. whether rank 0 could take the run's lock)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def first_error(self, error: Exception | None) -> Exception | None:
        """The first failing rank's error, on every rank: a collective, so no rank waits forever at a barrier
        for one that failed. That rank gets its own exception back; the others a ValueError (a request
        that cannot run) or RunFailed carrying its message, since not every exception survives pickling."""
        if self.world == 1:
            return error
        usage = isinstance(error, USAGE_ERRORS)
        text = None if error is None else str(error) if usage else f"{type(error).__name__}: {error}"
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, None if error is None else (usage, text))
        for rank, sent in enumerate(gathered):
            if sent is not None:
                if rank == self.rank:
                    return error
                return (ValueError if sent[0] else RunFailed)(f"rank {rank}: {sent[1]}")
        return None

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(device_name: str) -> tuple[Dist, torch.device]:
    """Join the launcher's process group (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world == 1:
        return Dist(), device
    exit_with_launcher()
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Ranks finish their shards at different times; the final barrier must outwait the slowest.
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=6))
        owns = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, owns_group=owns), device


def exit_with_launcher(poll_s: float = 0.5) -> threading.Thread:
    """Watch the parent process (the launcher) from a daemon thread; exit at once when it is gone.

    A launcher that dies without stopping its workers (SIGKILL, OOM killer) leaves them re-parented to
    init or a subreaper, so ``os.getppid()`` changes: that is the signal. Polling is used rather than
    ``prctl(PR_SET_PDEATHSIG)``, which fires when the launcher's *thread* that started the worker ends and
    exists on Linux only. Exiting with ``os._exit`` skips clean-up on purpose: records are durable line by
    line, a torn last line is repaired on resume, and the kernel frees the run's lock.
    """
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(poll_s)
        try:
            print(f"tokreduce eval: launcher (pid {launcher}) is gone; worker {os.getpid()} stops", file=sys.stderr)
        finally:
            os._exit(1)

    thread = threading.Thread(target=watch, name="launcher-watchdog", daemon=True)
    thread.start()
    return thread


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
