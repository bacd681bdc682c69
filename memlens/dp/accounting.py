"""Privacy accounting for DP-SGD with Poisson sampling (Opacus's PRV and RDP accountants).

A run's guarantee is planned before training: the sample rate q = batch_size / N, the number
of steps T = epochs * int(1 / q), and the noise multiplier sigma calibrated with Opacus's
``get_noise_multiplier`` so that the accountant's epsilon after T steps is at most the target.
With a fixed sigma instead, the plan caps T at the largest number of steps whose epsilon stays
within the target, and training stops there.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from memlens.config import DPConfig
from memlens.errors import MemlensError

REPRODUCIBLE_WARNING = ("; WARNING: trained with reproducible randomness (dp.reproducible: true), so the noise and "
                        "sampling follow from the seed in the run record: the guarantee holds only while that record "
                        "stays private")

EPSILON_TOLERANCE = 0.01


def _memoise_rdp_orders() -> None:
    """Cache the one-step RDP of the subsampled Gaussian, a pure function of (q, sigma, order).

    Opacus recomputes it for every order on every epsilon query (RDP directly, and PRV for its
    discretisation domain), although T steps only multiply it by T; at sigma ~4 one query spends
    about 0.8 s there, which made the per-epoch epsilon of a 300-epoch run cost minutes. The
    cache changes no number (tests/dp/test_dp.py compares with the uncached function); if Opacus
    moves the function, accounting simply runs uncached.
    """
    try:
        from opacus.accountants.analysis import rdp
    except ImportError:  # pragma: no cover
        return
    original = getattr(rdp, "_compute_rdp", None)
    if original is None or hasattr(original, "cache_info"):
        return
    rdp._compute_rdp = functools.lru_cache(maxsize=65536)(original)
    rdp._compute_rdp.uncached = original


_memoise_rdp_orders()


@contextmanager
def _quiet():
    # Opacus's RDP analysis (also used inside PRV for the domain size) warns when the best order is
    # at the edge of its grid; the bound stays valid, only possibly loose, so keep CLI output clean.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def default_delta(n: int) -> float:
    """1 / (10 N): an order of magnitude below 1/N."""
    return 1.0 / (10.0 * n)


def check_delta(delta: float, n: int) -> None:
    if delta >= 1.0 / n:
        raise MemlensError(
            f"dp delta {delta:g} is not below 1/N = 1/{n} = {1.0 / n:.3g}: a mechanism that publishes one random "
            f"training record in full already satisfies (0, 1/N)-DP, so the guarantee would be meaningless; "
            f"use a delta below {1.0 / n:.3g} (the default is 1/(10 N) = {default_delta(n):.3g})")


@functools.lru_cache(maxsize=256)
def epsilon_for(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    if steps <= 0:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with _quiet():
        return float(acc.get_epsilon(delta=delta))


def epsilon_of_history(history: list, *, delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(h) for h in history]
    with _quiet():
        return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class PrivacyPlan:
    """What a DP-SGD run will do and what it guarantees, fixed before the first step."""

    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    expected_batch_size: float
    steps_per_epoch: int
    planned_steps: int
    max_steps: int
    planned_epsilon: float
    max_grad_norm: float
    accountant: str
    poisson: bool
    n: int
    calibrated: bool
    randomness: str = "secret"

    def to_dict(self) -> dict:
        return asdict(self)

    def sentence(self) -> str:
        s = (f"this config gives epsilon = {self.planned_epsilon:.3f} at delta = {self.delta:.3g} "
             f"({self.accountant.upper()} accountant; noise multiplier {self.noise_multiplier:.4f}, sample rate "
             f"{self.sample_rate:.5f}, {self.planned_steps} steps, clipping norm {self.max_grad_norm:g})")
        if self.max_steps < self.planned_steps:
            s += (f"; with this noise the target epsilon {self.target_epsilon:g} is reached after {self.max_steps} "
                  f"steps and training will stop there")
        if self.randomness == "reproducible":
            s += REPRODUCIBLE_WARNING
        return s


def privacy_plan(dp: DPConfig, *, n: int, batch_size: int, epochs: int) -> PrivacyPlan:
    """Calibrate (or check) a DP-SGD run over ``epochs`` epochs of ``n`` points.

    Raises:
        MemlensError: delta not below 1/N, a batch larger than the data, or a budget that no
            noise level reaches.
    """
    if batch_size > n:
        raise MemlensError(f"batch_size {batch_size} exceeds the {n} training points")
    delta = dp.delta if dp.delta is not None else default_delta(n)
    check_delta(delta, n)
    q = batch_size / n
    steps_per_epoch = int(1 / q)
    steps = epochs * steps_per_epoch
    if dp.noise_multiplier is None:
        sigma = _calibrate(dp.epsilon, delta, q, steps, dp.accountant)
        max_steps = steps
        calibrated = True
    else:
        sigma = dp.noise_multiplier
        max_steps = _max_steps(sigma, q, delta, dp.epsilon, dp.accountant, upper=steps)
        calibrated = False
    eps = epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=min(steps, max_steps), delta=delta,
                      accountant=dp.accountant)
    if eps > dp.epsilon * (1 + 1e-9):
        raise MemlensError(f"planned epsilon {eps:.4f} exceeds the target {dp.epsilon:g}")
    return PrivacyPlan(target_epsilon=dp.epsilon, delta=delta, noise_multiplier=sigma, sample_rate=q,
                       expected_batch_size=q * n, steps_per_epoch=steps_per_epoch, planned_steps=steps,
                       max_steps=max_steps, planned_epsilon=eps, max_grad_norm=dp.max_grad_norm,
                       accountant=dp.accountant, poisson=dp.poisson, n=n, calibrated=calibrated)


@functools.lru_cache(maxsize=64)
def _calibrate(epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    """Opacus's binary search for the smallest sigma whose epsilon after ``steps`` is within target
    (cached: the f and g runs of a sweep share their plan)."""
    try:
        with _quiet():
            return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q, steps=steps,
                                              accountant=accountant, epsilon_tolerance=EPSILON_TOLERANCE))
    except ValueError as exc:
        raise MemlensError(f"no noise level reaches epsilon {epsilon:g} at delta {delta:g}: {exc}") from None


def _max_steps(sigma: float, q: float, delta: float, target: float, accountant: str, *, upper: int) -> int:
    """Largest number of steps (at most ``upper``) whose epsilon stays within ``target``."""
    if epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=upper, delta=delta, accountant=accountant) <= target:
        return upper
    lo, hi = 0, upper
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=mid, delta=delta, accountant=accountant) <= target:
            lo = mid
        else:
            hi = mid
    if lo == 0:
        raise MemlensError(f"noise multiplier {sigma:g} exceeds epsilon {target:g} in a single step; raise it")
    return lo


