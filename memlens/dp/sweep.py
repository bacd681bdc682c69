"""Epsilon sweeps: one recipe, f and g trained at each privacy level (``memlens sweep``).

Layout: ``SWEEP_DIR/sweep.json`` and ``SWEEP_DIR/eps-<value>/{f,g}[-seedN]/`` run directories,
``eps-inf`` being the non-private baseline. Re-running a sweep skips finished runs and resumes
interrupted ones.
"""

from __future__ import annotations

import math
import multiprocessing
import queue
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from memlens import distributed as D
from memlens.config import (
    DPConfig,
    ReferenceSpec,
    SweepConfig,
    TrainConfig,
    claim_resumable_dir,
    format_epsilon,
    validate,
)
from memlens.data import Dataset, load
from memlens.dp.secrets import create_pair_secret, delete_pair_secret, pair_of, pair_secret_path
from memlens.dp.training import check_feasible, train_encoder
from memlens.errors import MemlensError
from memlens.io import read_json
from memlens.progress import TrainingProgress
from memlens.resources import available_cores
from memlens.train.loop import EpochInfo, prepare
from memlens.train.run import RUN_FILE, read_run

SWEEP_FILE = "sweep.json"


@dataclass
class SweepRun:
    epsilon: float
    side: str
    seed: int
    run_dir: Path
    config: TrainConfig

    @property
    def name(self) -> str:
        return f"eps-{format_epsilon(self.epsilon)}/{self.run_dir.name}"


def plan_runs(config: SweepConfig, out_dir: str | Path) -> list[SweepRun]:
    """The runs of a sweep: per epsilon, f and g (per seed), or the K references ``ref-00`` ... whose
    pairs (2j, 2j+1) share the seed base + j (coupled as f and g of one seed are)."""
    out = Path(out_dir)
    runs = []
    base = config.train
    refs = config.references
    for eps in config.epsilons:
        dp = None if math.isinf(eps) else DPConfig(epsilon=eps, **config.dp.model_dump())
        where = out / f"eps-{format_epsilon(eps)}"
        if refs is not None:
            for i in range(refs.k):
                spec = ReferenceSpec(**refs.model_dump(), index=i)
                cfg = base.model_copy(update={"seed": base.seed + i // 2, "dp": dp, "reference": spec})
                runs.append(SweepRun(eps, f"ref-{i:02d}", cfg.seed, where / f"ref-{i:02d}", cfg))
            continue
        for side in ("f", "g"):
            for seed in [base.seed, *config.extra_seeds]:
                cfg = base.model_copy(update={"subsets": side, "seed": seed, "dp": dp})
                name = side if seed == base.seed else f"{side}-seed{seed}"
                runs.append(SweepRun(eps, side, seed, where / name, cfg))
    return runs


def run_sweep(config: SweepConfig, out_dir: str | Path, *, force: bool = False, cache_dir: str | Path | None = None,
              dataset: Dataset | None = None, on_run: Callable[[SweepRun, str], None] | None = None,
              on_epoch: Callable[[EpochInfo], None] | None = None, jobs: int = 1,
              sign_key: str | Path | None = None, log: Callable[[str], None] | None = None,
              log_detail: bool = True) -> list[tuple[SweepRun, str]]:
    """Train every run of the sweep that is not finished yet.

    Args:
        dataset: the already-loaded data of ``config.train.data`` (skips loading it again).
        on_run: called before each run that trains, with "training" or "resuming", and (with
            ``jobs`` > 1) after it, with "done".
        on_epoch: called after every epoch of every run (in this process only: not with ``jobs`` > 1).
        sign_key: an Ed25519 private key file signing every finished run record.
        log: receives progress lines (:class:`memlens.progress.TrainingProgress`): which runs train, wait
            and are done, each run's elapsed time and the time left (also with ``jobs`` > 1); with
            ``log_detail`` False only when each run starts and ends (CI logs).
        jobs: runs trained at once, each in its own process with its share of the CPU threads. The
            runs of a sweep are independent jobs (a coupled pair's DP key is a 0600 file this function
            creates before the pair trains and deletes once both sides have finished); several small
            models train faster side by side than one with every thread. Under torchrun every process
            already works on each run: jobs must be 1.

    Returns:
        (run, what happened) pairs, in the sweep's order: "trained", "resumed" or "skipped (finished)".
    """
    if jobs < 1:
        raise MemlensError(f"jobs must be at least 1, got {jobs}")
    if jobs > 1 and D.active():
        raise MemlensError("jobs > 1 trains runs in separate processes; under torchrun every process already "
                           "trains each run: use jobs 1")
    out = Path(out_dir)
    if dataset is None:
        dataset = load(config.train.data, cache_dir=cache_dir, collective=D.active())
    runs = plan_runs(config, out)
    check_sweep(runs, dataset=dataset, cache_dir=cache_dir)
    if D.is_main():
        claim_resumable_dir(out, marker=SWEEP_FILE, config=config, what="sweep", force=force)
    D.barrier()
    what: dict[str, str] = {}
    pending = []
    for run in runs:
        status = read_run(run.run_dir).status if (run.run_dir / RUN_FILE).is_file() else None
        if status in ("complete", "stopped_budget"):
            what[run.name] = "skipped (finished)"
        else:
            what[run.name] = "resumed" if status else "trained"
            pending.append((run, status is not None))
    keys = _pair_secrets(runs, [run for run, _ in pending], out, create=D.is_main())
    D.barrier()
    side_by_side = jobs > 1 and len(pending) > 1
    tracker = TrainingProgress({run.name: run.config.epochs for run, _ in pending}, jobs=jobs if side_by_side else 1,
                               log=log, quarters=log_detail) if log is not None and D.is_main() else None
    try:
        if side_by_side:
            _train_side_by_side(pending, jobs=jobs, cache_dir=cache_dir, on_run=on_run, keys=keys,
                                sign_key=None if sign_key is None else str(sign_key), tracker=tracker)
        else:
            for run, resume in pending:
                if on_run:  # before the run starts: what is about to happen
                    on_run(run, "resuming" if resume else "training")
                if tracker:
                    tracker.start(run.name)

                def epoch_done(info, run=run):
                    if tracker:
                        tracker.epoch(run.name, info.epoch, info.seconds)
                    if on_epoch:
                        on_epoch(info)

                train_encoder(run.config, run.run_dir, resume=resume, dataset=dataset, on_epoch=epoch_done,
                      pair_secret=keys.get(run.run_dir), sign_key=sign_key)
                if tracker:
                    tracker.finish(run.name)
    finally:
        if D.is_main():
            _forget_finished_pairs(runs, keys)
    return [(run, what[run.name]) for run in runs]


def _pair_secrets(runs: list[SweepRun], pending: list[SweepRun], out: Path, *, create: bool) -> dict[Path, Path]:
    """The key file of every coupled pair with a side still to train (:mod:`memlens.dp.secrets`): created
    now, right before the pair trains, or kept from an interrupted pair. Run directory -> key file."""

    by_pair: dict[str, list[SweepRun]] = {}
    for run in runs:
        pair = pair_of(run.config)
        if pair is not None:
            by_pair.setdefault(pair[0], []).append(run)
    todo = {run.run_dir for run in pending}
    keys: dict[Path, Path] = {}
    for pair_id, members in by_pair.items():
        if len(members) == 2 and any(r.run_dir in todo for r in members):
            path = create_pair_secret(out, pair_id) if create else pair_secret_path(out, pair_id)
            keys.update({r.run_dir: path for r in members})
    return keys


def _forget_finished_pairs(runs: list[SweepRun], keys: dict[Path, Path]) -> None:
    """Delete the key of every pair whose two runs have finished (an interrupted pair keeps it to resume)."""

    finished = {run.run_dir for run in runs if (run.run_dir / RUN_FILE).is_file()
                and read_run(run.run_dir).status in ("complete", "stopped_budget")}
    for path in set(keys.values()):
        members = [d for d, p in keys.items() if p == path]
        if all(d in finished for d in members):
            delete_pair_secret(path)


def _train_side_by_side(pending: list[tuple[SweepRun, bool]], *, jobs: int, cache_dir: str | Path | None,
                        on_run: Callable[[SweepRun, str], None] | None, keys: dict[Path, Path],
                        sign_key: str | None = None, tracker: TrainingProgress | None = None) -> None:
    """Train runs in ``jobs`` worker processes (spawned: no state of this process is shared); the first
    failure cancels what has not started and is raised here. Workers report their epochs through a queue,
    which ``tracker`` turns into progress lines."""


    threads = max(1, available_cores() // jobs)
    context = multiprocessing.get_context("spawn")
    manager = context.Manager() if tracker is not None else None
    events = manager.Queue() if manager is not None else None
    with ProcessPoolExecutor(max_workers=min(jobs, len(pending)), mp_context=context,
                             initializer=_worker_threads, initargs=(threads,)) as pool:
        futures = {}
        for run, resume in pending:
            if on_run:
                on_run(run, "resuming" if resume else "training")
            key = keys.get(run.run_dir)
            futures[pool.submit(_train_job, run.config.model_dump(mode="json"), str(run.run_dir), resume,
                                None if cache_dir is None else str(cache_dir),
                                None if key is None else str(key), sign_key, run.name, events)] = run
        left = set(futures)
        while left:
            finished, left = wait(left, timeout=1.0 if events is not None else None, return_when=FIRST_COMPLETED)
            starts = _drain(events, tracker)  # epochs now; starts after the finished runs (the order they came in)
            for fut in finished:
                exc = fut.exception()
                if exc is not None:
                    for other in left:
                        other.cancel()
                    if isinstance(exc, BrokenProcessPool):  # a worker killed (out of memory, a signal)
                        raise MemlensError(f"the process training {futures[fut].name} died ({exc}); re-run the "
                                           f"same command to resume the unfinished runs") from None
                    raise exc
                if tracker is not None:
                    tracker.finish(futures[fut].name)
                if on_run:
                    on_run(futures[fut], "done")
            for name in starts:
                tracker.start(name)
    if manager is not None:
        manager.shutdown()


def _drain(events, tracker: TrainingProgress | None) -> list[str]:
    """Hand the workers' queued epoch events to the tracker; return the runs that started meanwhile."""

    starts: list[str] = []
    while events is not None and tracker is not None:
        try:
            kind, name, epoch, seconds = events.get_nowait()
        except queue.Empty:
            break
        if kind == "start":
            starts.append(name)
        elif name in starts:  # started and already past an epoch: start it first
            starts.remove(name)
            tracker.start(name)
            tracker.epoch(name, epoch, seconds)
        else:
            tracker.epoch(name, epoch, seconds)
    return starts


def _worker_threads(threads: int) -> None:

    torch.set_num_threads(threads)


def _train_job(config: dict, run_dir: str, resume: bool, cache_dir: str | None, pair_secret: str | None,
               sign_key: str | None, name: str = "", events=None) -> None:
    """One run in a worker process (module-level: spawned workers import it by name); its start and epochs
    go to ``events`` (a manager queue) for the parent's progress lines."""
    if events is not None:
        events.put(("start", name, 0, 0.0))

    def on_epoch(info):
        if events is not None:
            events.put(("epoch", name, info.epoch, info.seconds))

    train_encoder(TrainConfig.model_validate(config), Path(run_dir), resume=resume, cache_dir=cache_dir,
          pair_secret=pair_secret, sign_key=sign_key, on_epoch=on_epoch)


def check_sweep(runs: list[SweepRun], *, dataset: Dataset, cache_dir: str | Path | None = None) -> None:
    """Check that every run of a sweep can train (DP feasibility of every epsilon: objective, model,
    delta, budget) before the first step of any: a refusal at epsilon 8 after the non-private pair
    has trained for an hour helps nobody.

    Raises:
        MemlensError: naming the run and the reason.
    """
    sizes: dict[str, int] = {}
    for run in runs:
        if run.config.dp is None:
            continue
        if run.side not in sizes:
            sizes[run.side] = len(prepare(run.config, cache_dir=cache_dir, dataset=dataset).rows)
        try:
            check_feasible(run.config, n=sizes[run.side])
        except MemlensError as exc:
            raise MemlensError(f"{run.name}: {exc}") from None


def sweep_runs(sweep_dir: str | Path) -> list[SweepRun]:
    """The runs of an existing sweep directory, read from its ``sweep.json``."""
    sweep_dir = Path(sweep_dir)
    raw = read_json(sweep_dir / SWEEP_FILE, what="sweep record")
    config = validate(SweepConfig, raw["config"], source=str(sweep_dir / SWEEP_FILE))
    return plan_runs(config, sweep_dir)
