"""torch.distributed helpers: who am I, split work, gather results.

memlens does not launch processes: ``torchrun`` does (one node or many; NCCL on GPUs, Gloo on
CPUs). The command line initialises the process group from torchrun's environment; library code
only asks ``torch.distributed`` whether a group exists. Without one, every helper is the
single-process identity, so the same code runs in one process or many.
"""

from __future__ import annotations

import socket
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def backend() -> str | None:
    return dist.get_backend() if active() else None


def shard(positions: Sequence[int] | np.ndarray, *, rank_: int | None = None, world: int | None = None) -> np.ndarray:
    """This process's contiguous share of ``positions`` (all of them in a single process)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return np.array_split(np.asarray(positions), w)[r]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order ([obj] in a single process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum, max or min) on a tensor of the group's device."""
    if active():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def barrier() -> None:
    if active():
        dist.barrier()


def collective_device() -> torch.device:
    """Where tensors must live for collectives: the current CUDA device under NCCL, else the CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_world_size() -> int:
    """Processes of this job on this node (hostnames gathered once; 1 without a process group)."""
    global _LOCAL
    if not active():
        return 1
    if _LOCAL is None:

        hosts = all_gather_object(socket.gethostname())
        _LOCAL = sum(h == hosts[rank()] for h in hosts)
    return _LOCAL


_LOCAL: int | None = None
