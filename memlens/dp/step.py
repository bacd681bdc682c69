"""The DP-SGD gradient step: Poisson sampling, per-example clipping, Gaussian noise and accounting.

Built on :class:`memlens.train.step.Step` and handed to the one training loop
(:func:`memlens.dp.training.train_encoder`). One epoch is ``int(1 / q)`` logical steps. Each step:

1. **Sampling.** Opacus's ``UniformWithReplacementSampler`` draws the logical batch: every
   training example independently with probability q = batch_size / N, from a generator seeded
   by (run seed, epoch). Every process draws the same global batch and keeps its share (rows
   ``rank::world``), so the global batch is a Poisson sample of the whole dataset at rate q
   whatever the number of processes: the accountant's sample rate is unchanged, and a run can
   resume with another world size.
2. **Clipping.** Each process splits its share into physical batches and clips every example's
   gradient to ``max_grad_norm`` with memlens's ghost engine (:mod:`memlens.dp.ghost_clipping`), or
   Opacus's hooks (``grad_mode: opacus-hooks``, single process, a reference).
3. **Noise and averaging** (:class:`memlens.dp.optimizer.FusedDPOptimizer`): noise of standard
   deviation sigma C added once, on process 0; one all-reduce of the sums; division by the
   global expected batch size q N.
4. **Accounting.** Opacus's PRV (or RDP) accountant records (sigma, q) per step; training stops
   before a step would exceed the target epsilon.

The recorded training loss is computed on the private data and is not itself private.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import torch
from opacus.accountants import create_accountant
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from memlens import distributed as D
from memlens.config import TrainConfig
from memlens.dp.accounting import epsilon_for, epsilon_of_history, privacy_plan
from memlens.dp.ghost_clipping import TOKEN_MODULES, GhostClipper
from memlens.dp.optimizer import FusedDPOptimizer
from memlens.dp.secrets import SecretStreams, key_id, new_key
from memlens.errors import MemlensError
from memlens.rng import derive_seed, generator
from memlens.train.step import Batch, Step, StepStats

RANDOMNESS_NOTES = {
    "secret": ("noise and Poisson sampling from a 256-bit OS key, re-keyed every step, not recorded; noise drawn as "
               "the sum of four Gaussians (Opacus's secure-mode construction)"),
    "reproducible": ("noise and sampling seeded from the run seed (reproducible: true): the guarantee holds only while "
                     "this run record stays private, since its seed regenerates both"),
}

ACCOUNTING_NOTE = ("the global batch of every step is a Poisson sample of the whole training set at rate q, whatever "
                   "the number of processes, and noise of standard deviation sigma C is added once per step: the "
                   "accounting equals that of a single-process run with the same global settings")


def register_opacus_samplers() -> None:
    """Teach Opacus's hook mode the per-sample gradients of memlens's token modules."""


    for cls in TOKEN_MODULES:
        GradSampleModule.GRAD_SAMPLERS.setdefault(
            cls,
            lambda layer, activations, backprops, _c=cls: _c.per_sample_grads(layer, tuple(activations), backprops))


def noise_seed_for(config: TrainConfig) -> int:
    """The seed of the DP noise of a reproducible run (see ``dp.coupling``)."""
    dp = config.dp
    if isinstance(dp.noise_seed, int):
        return int(dp.noise_seed)
    if dp.coupling == "independent":
        side = (f"reference-{config.reference.index}" if config.reference is not None else
                config.subsets if isinstance(config.subsets, str) else "+".join(config.subsets))
        return derive_seed(config.seed, "dp-noise", side)
    return derive_seed(config.seed, "dp-noise")


class DPStep(Step):
    """One logical DP-SGD step (see the module docstring)."""

    def __init__(self, config: TrainConfig, objective, optimizer: torch.optim.Optimizer, prepared, device, *,
                 key: bytes | None = None, coupled: bool = False):
        super().__init__(config, objective, optimizer, prepared, device)
        why = objective.why_not_dp()
        if why:
            raise MemlensError(f"framework '{config.framework}' cannot be trained with DP-SGD: {why}")
        dp = config.dp
        if dp.grad_mode == "opacus-hooks" and D.active():
            raise MemlensError("grad_mode opacus-hooks runs in one process (it is the reference); use ghost-bk "
                               "under torchrun")
        n = len(prepared.rows)
        self.dp = dp
        self.plan = privacy_plan(dp, n=n, batch_size=config.batch_size, epochs=config.epochs)
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.accountant = create_accountant(mechanism=dp.accountant)
        self.steps_taken = 0
        self._eps_cache: tuple | None = None
        self.epsilon_every = max(1, math.ceil(config.epochs / 25))
        # secret randomness by default (memlens.dp.secrets): a key from the OS (or the coupled
        # pair's), the same on every process; reproducible runs keep the seeded streams
        self.secret: SecretStreams | None = None
        if not dp.reproducible:  # process 0's key (its own, or the pair's), on every process
            self.secret = SecretStreams(D.broadcast_object(key or new_key() if D.is_main() else None))
        # what the run actually did: shared only with the pair's key handed over by a sweep or pipeline
        self.coupling = "shared" if (coupled or dp.reproducible) and dp.coupling == "shared" else "independent"
        self.noise_seed = noise_seed_for(config) if dp.reproducible else None
        self.noise_gen = torch.Generator(device=device)
        common = dict(noise_multiplier=self.plan.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                      expected_batch_size=self.plan.expected_batch_size, loss_reduction="mean",
                      generator=self.noise_gen)
        if dp.grad_mode == "ghost-bk":
            self.clipper: GhostClipper | None = GhostClipper(objective)
            self.dp_optimizer = FusedDPOptimizer(optimizer, **common)
            self.dp_optimizer.secure = self.secret is not None
        else:

            register_opacus_samplers()
            self.clipper = None
            self.gsm = GradSampleModule(objective, batch_first=True, loss_reduction="sum", strict=False)
            self.dp_optimizer = DPOptimizer(optimizer, **common, secure_mode=self.secret is not None)
        self.dp_optimizer.attach_step_hook(self._on_logical_step)
        self.physical = dp.physical_batch_size or max(config.batch_size, 1)

    @property
    def total_steps(self) -> int:
        return self.plan.planned_steps

    # ------------------------------------------------------------------ batches

    def plan_batches(self, epoch: int) -> Iterator[Batch]:
        p = self.prepared
        if self.secret is not None:
            yield from self._secret_batches(epoch)
            return
        if self.dp.poisson:
            sampler = UniformWithReplacementSampler(num_samples=len(p.rows), sample_rate=self.plan.sample_rate,
                                                    generator=generator(self.config.seed, "dp-sample", epoch))
            source = (np.asarray(idx, dtype=np.int64) for idx in sampler)
        else:
            g = generator(self.config.seed, "dp-sample", epoch)
            perm = torch.randperm(len(p.rows), generator=g).numpy()
            source = (perm[k * self.batch:(k + 1) * self.batch] for k in range(self.steps_per_epoch))
        for k, idx in enumerate(source):
            yield Batch(p.rows[idx], k)

    def _secret_batches(self, epoch: int) -> Iterator[Batch]:
        """Poisson sampling, every example of every step with probability q (as Opacus's
        ``UniformWithReplacementSampler``), each step from its own secretly keyed generator."""
        p = self.prepared
        n = len(p.rows)
        for k in range(self.steps_per_epoch):
            g = self.secret.generator("sample", epoch, k)
            if self.dp.poisson:
                idx = torch.nonzero(torch.rand(n, generator=g) < self.plan.sample_rate).reshape(-1).numpy()
            else:
                idx = torch.randperm(n, generator=g)[:self.batch].sort().values.numpy()
            yield Batch(p.rows[idx], k)

    def batches(self, epoch: int) -> Iterator[Batch]:
        if self.secret is None:
            self.noise_gen.manual_seed(derive_seed(self.noise_seed, "dp-noise", epoch))
        for batch in super().batches(epoch):
            if self.steps_taken >= self.plan.max_steps:
                # The last logical step ended the budget: any further batch starts a new one.
                self.budget_exhausted = True
                self.budget_message = (f"privacy budget reached: epsilon {self.epsilon():.3f} of "
                                       f"{self.plan.target_epsilon:g} after {self.steps_taken} steps; training "
                                       f"stopped in epoch {epoch + 1} and the last checkpoint is kept")
                return
            yield batch

    def units(self, batch: Batch) -> list[np.ndarray]:
        rows = self.local_rows(batch)
        return [rows[k:k + self.physical] for k in range(0, len(rows), self.physical)]

    # ------------------------------------------------------------------ the step

    def apply(self, batch: Batch, epoch: int, step: int) -> StepStats:
        obj = self.objective
        self.dp_optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        examples = 0
        chunks = self.units(batch)
        for c, chunk in enumerate(chunks):
            images, labels, draws = self.inputs(chunk, epoch, batch.index)
            examples += len(images)
            if self.clipper is not None:
                with self.clipper.capture(batch_size=len(images)):
                    per_example = obj.losses(images, labels, draws)
                    per_example.sum().backward()
                self.clipper.accumulate_clipped(max_grad_norm=self.dp.max_grad_norm)
            else:
                per_example = obj.losses(images, labels, draws)
                per_example.sum().backward()
                if c < len(chunks) - 1:  # Opacus clips and accumulates each physical batch
                    self.dp_optimizer.signal_skip_step(do_skip=True)
                    self.dp_optimizer.step()
            loss_sum += float(per_example.detach().sum())
        stats = self.global_stats(loss_sum, examples)
        self.check_finite(stats, epoch)
        if not examples:
            self._empty_batch()
        self.before_noise()
        if self.secret is not None:  # this step's noise, from its own secretly keyed generator
            self.dp_optimizer.generator = self.secret.generator("noise", epoch, batch.index, self.device)
        self.dp_optimizer.step()
        self.after_release()
        return stats

    def before_noise(self) -> None:
        """Called once the clipped sums are in ``p.grad``, before noise and averaging (an audit's hook)."""

    def after_release(self) -> None:
        """Called after the noisy, averaged gradient has been released to the optimizer."""

    def _empty_batch(self) -> None:
        if self.clipper is not None:
            self.clipper.zero_fill()
        else:
            for prm in self.dp_optimizer.params:
                prm.grad_sample = torch.zeros((0, *prm.shape), device=prm.device)

    def _on_logical_step(self, _opt) -> None:
        self.accountant.step(noise_multiplier=self.plan.noise_multiplier, sample_rate=self.plan.sample_rate)
        self.steps_taken += 1

    def epsilon(self) -> float:
        history = tuple(tuple(h) for h in self.accountant.history)
        if self._eps_cache is None or self._eps_cache[0] != history:
            if len(history) == 1:  # one (sigma, q) throughout: the cached single-mechanism form
                sigma, q, steps = history[0]
                eps = epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=self.plan.delta,
                                  accountant=self.plan.accountant)
            else:
                eps = epsilon_of_history(list(history), delta=self.plan.delta, accountant=self.plan.accountant)
            self._eps_cache = (history, eps)
        return self._eps_cache[1]

    def epoch_extra(self, *, epoch: int, last: bool) -> dict[str, Any]:
        # A PRV query costs ~0.1-0.2 s (discretisation and FFT composition), a lot against a
        # small model's epoch: the history shows epsilon on about 25 evenly spaced epochs and the
        # last one; every row has the step count it can be recomputed from.
        if last or epoch % self.epsilon_every == 0:
            return {"epsilon": round(self.epsilon(), 4)}
        return {}

    # ------------------------------------------------------------------ resume and record

    def loop_state(self) -> dict[str, Any]:
        state = {"accountant_history": [list(h) for h in self.accountant.history], "steps_taken": self.steps_taken}
        state["coupling"] = self.coupling
        if self.secret is not None:
            state["secret"] = self.secret.hex()  # lives only in the checkpoint (0600), deleted when training ends
        return state

    def restore_loop_state(self, state: dict[str, Any]) -> None:
        self.accountant.history = [tuple(h) for h in state.get("accountant_history", [])]
        self.steps_taken = int(state.get("steps_taken", 0))
        if "secret" in state and self.secret is not None:
            self.secret = SecretStreams(bytes.fromhex(state["secret"]))
        if "coupling" in state:
            self.coupling = state["coupling"]

    def record(self, *, exact: bool = False) -> dict[str, Any]:
        """The guarantee for the run record. ``epsilon_spent`` is the accountant's epsilon after
        ``epsilon_steps`` steps: the last one computed (see :meth:`epoch_extra`), brought up to
        ``steps_taken`` when ``exact`` or when training has ended (the last epoch always computes it)."""
        if exact or self._eps_cache is None:
            self.epsilon()
        history, spent = self._eps_cache
        return {
            **self.plan.to_dict(),
            "epsilon_spent": round(spent, 6),
            "epsilon_steps": int(sum(h[2] for h in history)),
            "steps_taken": self.steps_taken,
            "accountant_history": [list(h) for h in self.accountant.history],
            "grad_mode": self.dp.grad_mode,
            "physical_batch_size": self.physical,
            "coupling": self.coupling,
            **({"key_id": key_id(bytes.fromhex(self.secret.hex()))} if self.secret is not None else {}),
            "randomness": "secret" if self.secret is not None else "reproducible",
            "randomness_note": RANDOMNESS_NOTES["secret" if self.secret is not None else "reproducible"],
            **({"noise_seed": self.noise_seed} if self.secret is None else {}),
            "world_size": D.world_size(),
            "distributed_accounting": ACCOUNTING_NOTE,
            "notes": ("the recorded training loss is computed on the private data and is not itself "
                      "differentially private"),
        }
