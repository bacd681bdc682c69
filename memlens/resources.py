"""CPU threads and DataLoader workers, chosen so that processes, workers and threads share the cores.

The rule (``plan``): a node's usable cores C (the CPU affinity mask, lowered by a cgroup CPU quota
where one is set, e.g. ``docker run --cpus``) are shared by the P memlens processes of the node
(``torchrun --nproc_per_node P``; counted through ``torch.distributed``). Each process gets C / P
cores. Data read lazily (files, archives, shards, Arrow) is decoded by W DataLoader workers, each
with one intra-op thread; the process keeps the rest for its own tensor work:

    W = min(4, max(1, C / P // 2))     (workers: auto, lazy data; 0 for data held in memory)
    T = max(1, C / P - W)              (threads: auto, never above the current torch setting)

so P (T + W) <= C whenever C / P >= 2. "Never above the current setting" respects a limit set
from outside (``OMP_NUM_THREADS``, which ``torchrun`` sets to 1 by default, or a test harness);
explicit numbers override both. Oversubscription is what makes small models crawl on a busy
machine (measured: ``make demo`` 155 s alone, 2,143 s beside three other jobs each using a
thread per core): the choice is recorded in run.json and audit.json (``environment.resources``).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

MAX_AUTO_WORKERS = 4


def available_cores() -> int:
    """Cores this process may use: the affinity mask, lowered by a cgroup v2/v1 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if q > 0 and p > 0:
            return q / p
    except (OSError, ValueError):
        pass
    return None


@dataclass(frozen=True)
class ResourcePlan:
    """How one process uses the node's cores (see the module docstring)."""

    cores: int
    processes_per_node: int
    workers: int
    threads: int
    rule: str

    def to_dict(self) -> dict:
        return asdict(self)


def plan(*, lazy: bool, workers: int | str = "auto", threads: int | str = "auto",
         processes_per_node: int = 1, cores: int | None = None) -> ResourcePlan:
    """Workers and intra-op threads for one process (keyword-only: these are tuning parameters).

    Args:
        lazy: whether images are decoded from files while the job runs (workers help) or held in
            memory (they do not).
        workers: DataLoader workers, or ``auto``.
        threads: intra-op threads, or ``auto``.
        processes_per_node: memlens processes sharing this node's cores.
        cores: the node's usable cores (default: :func:`available_cores`).
    """
    c = cores or available_cores()
    share = max(1, c // max(1, processes_per_node))
    w = (min(MAX_AUTO_WORKERS, max(1, share // 2)) if lazy else 0) if workers == "auto" else int(workers)
    if threads == "auto":
        t = max(1, min(torch.get_num_threads(), share - w))
        rule = f"{c} cores / {processes_per_node} process(es) = {share} each: {w} decoding worker(s), {t} thread(s)"
    else:
        t = max(1, int(threads))
        rule = f"set: {t} thread(s), {w} worker(s)"
    return ResourcePlan(cores=c, processes_per_node=processes_per_node, workers=w, threads=t, rule=rule)


@contextlib.contextmanager
def using(p: ResourcePlan) -> Iterator[ResourcePlan]:
    """Run with ``p.threads`` intra-op threads, restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    if p.threads != before:
        torch.set_num_threads(p.threads)
    try:
        yield p
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def worker_init(_worker_id: int) -> None:
    """DataLoader worker start: one intra-op thread each (the workers are the parallelism)."""
    torch.set_num_threads(1)
