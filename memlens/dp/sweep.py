"""Epsilon sweeps: one recipe, f and g trained at each privacy level (``memlens sweep``).

Layout: ``SWEEP_DIR/sweep.json`` and ``SWEEP_DIR/eps-<value>/{f,g}[-seedN]/`` run directories,
``eps-inf`` being the non-private baseline. Re-running a sweep skips finished runs and resumes
interrupted ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
from memlens.dp import check_feasible, train
from memlens.errors import MemlensError
from memlens.io import read_json
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
              on_epoch: Callable[[EpochInfo], None] | None = None) -> list[tuple[SweepRun, str]]:
    """Train every run of the sweep that is not finished yet.

    Args:
        dataset: the already-loaded data of ``config.train.data`` (skips loading it again).
        on_run: called before each run that trains, with "training" or "resuming".
        on_epoch: called after every epoch of every run.

    Returns:
        (run, what happened) pairs: "trained", "resumed" or "skipped (finished)".
    """
    out = Path(out_dir)
    if dataset is None:
        dataset = load(config.train.data, cache_dir=cache_dir, collective=D.active())
    runs = plan_runs(config, out)
    check_sweep(runs, dataset=dataset, cache_dir=cache_dir)
    if D.is_main():
        claim_resumable_dir(out, marker=SWEEP_FILE, config=config, what="sweep", force=force)
    D.barrier()
    done = []
    for run in runs:
        status = None
        if (run.run_dir / RUN_FILE).is_file():
            status = read_run(run.run_dir).status
        if status in ("complete", "stopped_budget"):
            what = "skipped (finished)"
        else:
            what = "resumed" if status else "trained"
            if on_run:  # before the run starts: what is about to happen
                on_run(run, "resuming" if status else "training")
            train(run.config, run.run_dir, resume=status is not None, dataset=dataset, on_epoch=on_epoch)
        done.append((run, what))
    return done


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
