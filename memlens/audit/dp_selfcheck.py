"""White-box self-check of memlens's DP-SGD: Dirac gradient canaries audited in one training run.

The strongest one-run test of the trainer's own clipping, sampling and noise (Nasr et al., "Tight
Auditing of Differentially Private Machine Learning", USENIX Security 2023; the one-run design of
Steinke, Nasr and Jagielski 2023). m gradient canaries are added to a real DP-SGD run of the
given config:

* canary i is an extra training example whose gradient is C e_i, a unit coordinate direction of a
  block of m extra parameters that the loss does not touch (so real examples contribute nothing
  there) scaled to the clipping norm C: clipping leaves it unchanged;
* each canary is in the training set independently with probability 1/2 (seeded), and an
  included canary is sampled into each step's batch with the sample rate q, exactly like a real
  example under Poisson sampling;
* the trainer's own optimizer adds its noise and scales by the expected batch size; the audit
  observes the released (noisy) gradient of the canary block at every step, and canary i's score
  is the sum over steps of its coordinate, in units of C.

An included canary's score is a Binomial(T, q) count plus N(0, T sigma^2) noise, an excluded
one's the noise alone: the one-run bound on these scores estimates how much the released
gradients leak. It must come out below the accountant's epsilon (else clipping, sampling, noise
or accounting is broken), and above 0 when epsilon is large.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from memlens import distributed as D
from memlens.audit.privacy import auc, epsilon_lower_bound
from memlens.config import TrainConfig
from memlens.dp.step import DPStep
from memlens.errors import MemlensError
from memlens.rng import derive_seed
from memlens.train.loop import train_loop


class CanaryDPStep(DPStep):
    """:class:`DPStep` with m Dirac gradient canaries (see the module docstring)."""

    def __init__(self, config: TrainConfig, objective, optimizer, prepared, device, *, m: int, seed: int):
        self.m = m
        self.canary_param = torch.nn.Parameter(torch.zeros(m, device=device))
        optimizer.add_param_group({"params": [self.canary_param], "weight_decay": 0.0})
        super().__init__(config, objective, optimizer, prepared, device)
        rng = np.random.default_rng(derive_seed(seed, "gradient-canaries") % 2**63)
        self.included = rng.random(m) < 0.5
        self.sample_rng = np.random.default_rng(derive_seed(seed, "gradient-canary-sampling") % 2**63)
        self.scores = np.zeros(m)

    def _canary_gradient(self) -> torch.Tensor:
        c = self.dp.max_grad_norm
        sampled = self.included & (self.sample_rng.random(self.m) < self.plan.sample_rate)
        grad = torch.zeros(self.m, device=self.device)
        if D.rank() == 0:  # each canary is one example: counted once, by one process
            coef = min(1.0, c / (c + 1e-6))  # the clipping rule applied to a gradient of norm C
            grad[torch.from_numpy(np.flatnonzero(sampled)).to(self.device)] = c * coef
        return grad

    def before_noise(self) -> None:
        # the canaries' clipped gradients join the clipped sum, as examples of this step would
        self.canary_param.grad = self._canary_gradient()

    def after_release(self) -> None:
        # the released gradient of the canary block, back in units of C before the averaging
        released = self.canary_param.grad.detach().double().cpu().numpy()
        self.scores += released * self.plan.expected_batch_size / self.dp.max_grad_norm


@dataclass
class SelfCheckResult:
    claimed_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    m: int
    n_in: int
    lower_bound: dict
    lower_bound_other: dict
    auc: float
    passed: bool
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def selfcheck(config: TrainConfig, *, m: int = 20000, seed: int = 0, out_dir: str | Path | None = None,
              dataset=None, cache_dir=None, confidence: float = 0.95) -> SelfCheckResult:
    """Train ``config`` (which must have a dp section) with m gradient canaries and audit them.

    Raises:
        MemlensError: a config without DP, or one DP-SGD cannot train.
    """

    if config.dp is None:
        raise MemlensError("the self-check audits DP-SGD: give a config with a dp section")
    if config.dp.grad_mode != "ghost-bk":
        raise MemlensError("the self-check instruments memlens's ghost-bk engine; set dp.grad_mode: ghost-bk")
    holder: dict = {}

    def factory(cfg, objective, optimizer, prepared, device):
        holder["step"] = CanaryDPStep(cfg, objective, optimizer, prepared, device, m=m, seed=seed)
        return holder["step"]

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(out_dir) if out_dir is not None else Path(tmp) / "run"
        rec = train_loop(config, out, force=True, step_factory=factory, dataset=dataset, cache_dir=cache_dir).record
    step: CanaryDPStep = holder["step"]
    claimed = float(rec.dp["epsilon_spent"])
    delta = float(rec.dp["delta"])
    s_in, s_out = step.scores[step.included], step.scores[~step.included]
    bound = epsilon_lower_bound(s_in, s_out, delta=delta, confidence=confidence, method="fdp")
    other = epsilon_lower_bound(s_in, s_out, delta=delta, confidence=confidence, method="one-run")
    best = max(bound.epsilon, other.epsilon)
    passed = best <= claimed
    msg = (f"empirical epsilon lower bound {best:.3f} (at {confidence:.0%} confidence, delta {delta:.2g}) is "
           + (f"below the accountant's epsilon {claimed:.3f}: consistent with the guarantee" if passed else
              f"ABOVE the accountant's epsilon {claimed:.3f}: the DP-SGD implementation leaks more than it "
              f"claims (clipping, sampling, noise or accounting is wrong)"))
    return SelfCheckResult(claimed_epsilon=claimed, delta=delta, noise_multiplier=float(rec.dp["noise_multiplier"]),
                           sample_rate=float(rec.dp["sample_rate"]), steps=int(rec.dp["steps_taken"]), m=m,
                           n_in=int(step.included.sum()), lower_bound=bound.to_dict(),
                           lower_bound_other=other.to_dict(), auc=auc(s_in, s_out), passed=passed, message=msg)
