"""Tensor-parallel groups: rank, size and the collectives the layers use (all-reduce, all-gather).

Each engine owns its own group, made from a TCPStore of its own (rank 0 binds port 0, so two
engines on one host never collide) and a c10d backend built directly on it: NCCL on CUDA, gloo on
the CPU. No torch.distributed default group is involved, so one process can hold several engines.

The layers read their group while the model is built: `building_model(group)` makes it the
current one (and refuses nesting); each layer keeps it and calls its collectives. With no group
being built the rank is 0 of 1 and the collectives are identities, so the layer classes read the
same either way.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# How long a collective (and the start-up rendezvous) may wait for a peer. Ranks only wait on
# each other inside a step, so this bounds a hung worker, not an idle engine.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


class WorkerError(RuntimeError):
    """A tensor-parallel worker died or failed."""


@dataclass(eq=False)
class TPGroup:
    """One rank's view of its engine's tensor-parallel group."""

    rank: int = 0
    size: int = 1
    backend: Any = None  # ProcessGroupGloo / ProcessGroupNCCL; None on one device
    store: Any = None  # the TCPStore the group was made from (kept alive with it)
    # How long a collective may wait on the host (gloo); the runner shortens it to the step
    # timeout once start-up is over. NCCL collectives do not block the host.
    timeout: datetime.timedelta = COLLECTIVE_TIMEOUT

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.size > 1:
            self.backend.allreduce([x]).wait(self.timeout)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's shard of the last dimension, in rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.backend.allgather([parts], [x]).wait(self.timeout)
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest `value` over ranks (every rank must call it)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.backend.allreduce([t], opts).wait(self.timeout)
        return int(t.item())


SINGLE_DEVICE = TPGroup()

_building: TPGroup | None = None


@contextlib.contextmanager
def building_model(group: TPGroup) -> Iterator[None]:
    """Make `group` the one layers pick up while a model is constructed."""
    global _building
    if _building is not None:
        raise RuntimeError("building_model is already active (models are built one at a time)")
    _building = group
    try:
        yield
    finally:
        _building = None


def get_tp_group() -> TPGroup:
    return _building if _building is not None else SINGLE_DEVICE


def get_tp_rank() -> int:
    return get_tp_group().rank


def get_tp_size() -> int:
    return get_tp_group().size


def create_store(world_size: int) -> dist.TCPStore:
    """Rank 0's store on 127.0.0.1 at a free port the OS picks (read it back as `store.port`)."""
    return dist.TCPStore(
        "127.0.0.1",
        0,
        world_size,
        is_master=True,
        timeout=COLLECTIVE_TIMEOUT,
        wait_for_workers=False,
    )


def connect_store(port: int, world_size: int) -> dist.TCPStore:
    """A worker's client of rank 0's store."""
    return dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=COLLECTIVE_TIMEOUT)


def create_group(store: dist.TCPStore, rank: int, size: int, device: torch.device) -> TPGroup:
    """Join the group (blocks until every rank has joined): NCCL on CUDA, gloo on the CPU."""
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = COLLECTIVE_TIMEOUT
        backend = dist.ProcessGroupNCCL(store, rank, size, opts)
    else:
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = COLLECTIVE_TIMEOUT
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        backend = dist.ProcessGroupGloo(store, rank, size, opts)
    return TPGroup(rank=rank, size=size, backend=backend, store=store)
