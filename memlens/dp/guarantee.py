"""What privacy guarantee a run has, or a config will have (``memlens privacy``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pydantic import BaseModel

from memlens.config import TrainConfig
from memlens.dp.accounting import REPRODUCIBLE_WARNING, PrivacyPlan, epsilon_of_history, privacy_plan
from memlens.errors import MemlensError
from memlens.train.loop import prepare
from memlens.train.run import read_run


class Guarantee(BaseModel):
    private: bool
    epsilon: float
    delta: float | None = None
    accountant: str | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    max_grad_norm: float | None = None
    poisson: bool | None = None
    training_points: int | None = None
    status: str | None = None
    randomness: str | None = None  # "secret" or "reproducible"

    def sentence(self) -> str:
        if not self.private:
            return "trained without differential privacy: no formal guarantee (epsilon = inf)"
        s = (f"({self.epsilon:.3f}, {self.delta:.3g})-differentially private with respect to each of its "
             f"{self.training_points} training images ({self.accountant.upper()} accounting of {self.steps} "
             f"DP-SGD steps; noise multiplier {self.noise_multiplier:.4f}, sample rate {self.sample_rate:.5f}, "
             f"clipping norm {self.max_grad_norm:g}, {'Poisson' if self.poisson else 'shuffled (not Poisson)'} "
             f"sampling)")
        if not self.poisson:
            s += "; the accountant assumes Poisson sampling, so this epsilon is not a formal bound"
        s += REPRODUCIBLE_WARNING if self.randomness == "reproducible" else (
            "; noise and sampling from secret randomness" if self.randomness == "secret" else "")
        return s


def run_guarantee(run_dir: str | Path, *, recompute: bool = True) -> Guarantee:
    """The guarantee of a trained run; epsilon is recomputed from the recorded accountant history."""
    record = read_run(run_dir)
    if record.dp is None:
        return Guarantee(private=False, epsilon=float("inf"), status=record.status)
    d = record.dp
    eps = epsilon_of_history(d["accountant_history"], delta=d["delta"], accountant=d["accountant"]) \
        if recompute else d["epsilon_spent"]
    return Guarantee(private=True, epsilon=eps, delta=d["delta"], accountant=d["accountant"],
                     noise_multiplier=d["noise_multiplier"], sample_rate=d["sample_rate"], steps=d["steps_taken"],
                     max_grad_norm=d["max_grad_norm"], poisson=d["poisson"], training_points=d["n"],
                     status=record.status, randomness=d.get("randomness", "reproducible"))


def planned_guarantee(config: TrainConfig, *, cache_dir=None) -> PrivacyPlan:
    """The guarantee a training config will give, computed before training."""

    if config.dp is None:
        raise MemlensError("this config has no dp section: it trains without differential privacy")
    prepared = prepare(config, cache_dir=cache_dir)

    out = privacy_plan(config.dp, n=len(prepared.rows), batch_size=config.batch_size, epochs=config.epochs)
    return dataclasses.replace(out, randomness="reproducible" if config.dp.reproducible else "secret")
