"""DP-SGD training through Opacus: Poisson sampling, logical batches split into physical ones
by ``BatchMemoryManager``, per-sample clipping, Gaussian noise and privacy accounting.

Used by :func:`memlens.train.loop.train` when the config has a ``dp`` section. The recorded
training loss is computed on the private data and is not itself differentially private.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from opacus.accountants import create_accountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, TensorDataset

from memlens.config import TrainConfig
from memlens.dp.accounting import epsilon_for, epsilon_of_history, plan
from memlens.dp.engine import GhostClipper
from memlens.dp.optimizer import FusedDPOptimizer
from memlens.errors import MemlensError
from memlens.train.loop import Prepared, Stepper, derive_seed, generator
from memlens.train.objectives import Objective


def _register_opacus_samplers() -> None:
    """Teach Opacus's hook mode the per-sample gradients of memlens's token modules."""
    from opacus.grad_sample import GradSampleModule

    from memlens.dp.engine import TOKEN_MODULES

    for cls in TOKEN_MODULES:
        GradSampleModule.GRAD_SAMPLERS.setdefault(
            cls,
            lambda layer, activations, backprops, _c=cls: _c.per_sample_grads(layer, tuple(activations), backprops))


class DPStepper(Stepper):
    """One epoch of DP-SGD = ``int(1 / q)`` logical steps on Poisson-sampled batches."""

    def __init__(self, config: TrainConfig, objective: Objective, optimizer: torch.optim.Optimizer,
                 prepared: Prepared):
        super().__init__(config, objective, optimizer, prepared)
        why = objective.why_not_dp()
        if why:
            raise MemlensError(f"framework '{config.framework}' cannot be trained with DP-SGD: {why}")
        dp = config.dp
        n = len(prepared.rows)
        self.dp = dp
        self.plan = plan(dp, n=n, batch_size=config.batch_size, epochs=config.epochs)
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.accountant = create_accountant(mechanism=dp.accountant)
        self.steps_taken = 0
        self._eps_cache: tuple | None = None
        self.budget_exhausted = False
        self.budget_message = ""
        if dp.noise_seed == "random":
            self.noise_seed = int.from_bytes(os.urandom(8), "little") >> 1
        elif dp.noise_seed is None:
            self.noise_seed = derive_seed(config.seed, "dp-noise")
        else:
            self.noise_seed = int(dp.noise_seed)
        self.noise_gen = torch.Generator()
        self.sample_gen = torch.Generator()
        common = dict(noise_multiplier=self.plan.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                      expected_batch_size=self.plan.expected_batch_size, loss_reduction="mean",
                      generator=self.noise_gen)
        if dp.grad_mode == "ghost-bk":
            self.clipper = GhostClipper(objective)
            self.dp_optimizer = FusedDPOptimizer(optimizer, **common)
        else:
            from opacus.grad_sample import GradSampleModule

            _register_opacus_samplers()
            self.clipper = None
            self.gsm = GradSampleModule(objective, batch_first=True, loss_reduction="sum", strict=False)
            self.dp_optimizer = DPOptimizer(optimizer, **common)
        self.dp_optimizer.attach_step_hook(self._on_logical_step)
        index = TensorDataset(torch.arange(n))
        if dp.poisson:
            self.loader = DPDataLoader(index, sample_rate=self.plan.sample_rate, generator=self.sample_gen)
        else:
            self.loader = DataLoader(index, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                     generator=self.sample_gen)
        self.physical = dp.physical_batch_size or max(config.batch_size, 1)

    @property
    def total_steps(self) -> int:
        return self.plan.planned_steps

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

    def run_epoch(self, epoch: int, step: int):
        p, obj = self.prepared, self.objective
        g = generator(self.config.seed, "epoch", epoch)
        self.sample_gen.manual_seed(derive_seed(self.config.seed, "dp-sample", epoch))
        self.noise_gen.manual_seed(derive_seed(self.noise_seed, "dp-noise", epoch))
        losses, seen = [], 0
        start = self.steps_taken
        with BatchMemoryManager(data_loader=self.loader, max_physical_batch_size=self.physical,
                                optimizer=self.dp_optimizer) as loader:
            for (idx,) in loader:
                if self.steps_taken >= self.plan.max_steps:
                    # The last logical step ended the budget: any further batch starts a new one.
                    self.budget_exhausted = True
                    self.budget_message = (f"privacy budget reached: epsilon {self.epsilon():.3f} of "
                                           f"{self.plan.target_epsilon:g} after {self.steps_taken} steps; training "
                                           f"stopped in epoch {epoch + 1} and the last checkpoint is kept")
                    break
                self.set_lr(self.steps_taken)
                rows = torch.from_numpy(p.rows[idx.numpy()]) if len(idx) else torch.zeros(0, dtype=torch.long)
                self.dp_optimizer.zero_grad(set_to_none=True)
                if len(rows):
                    images = p.images[rows]
                    labels = p.labels[rows] if p.labels is not None else None
                    if self.clipper is not None:
                        with self.clipper.capture():
                            per_example = obj.losses(images, labels, g)
                            per_example.sum().backward()
                        self.clipper.accumulate_clipped(max_grad_norm=self.dp.max_grad_norm)
                    else:
                        per_example = obj.losses(images, labels, g)
                        per_example.sum().backward()
                    if not torch.isfinite(per_example).all():
                        raise MemlensError(f"training diverged at epoch {epoch + 1}; lower optim.lr")
                    losses.append(per_example.detach().mean().item())
                    seen += len(rows)
                else:
                    self._empty_batch()
                self.dp_optimizer.step()
                obj.after_step(self.steps_taken / self.total_steps)
        return losses, seen, self.steps_taken - start, {"epsilon": round(self.epsilon(), 4)}

    def _empty_batch(self) -> None:
        if self.clipper is not None:
            self.clipper.zero_fill()
        else:
            for prm in self.dp_optimizer.params:
                prm.grad_sample = torch.zeros((0, *prm.shape))

    # ------------------------------------------------------------------ resume and record

    def loop_state(self) -> dict[str, Any]:
        state = {"accountant_history": [list(h) for h in self.accountant.history], "steps_taken": self.steps_taken}
        if self.dp.noise_seed == "random":
            state["noise_seed"] = self.noise_seed  # lives only in the checkpoint, deleted when training ends
        return state

    def restore_loop_state(self, state: dict[str, Any]) -> None:
        self.accountant.history = [tuple(h) for h in state.get("accountant_history", [])]
        self.steps_taken = int(state.get("steps_taken", 0))
        if "noise_seed" in state:
            self.noise_seed = int(state["noise_seed"])

    def plan_record(self) -> dict[str, Any]:
        spent = self.epsilon()
        return {
            **self.plan.to_dict(),
            "epsilon_spent": round(spent, 6),
            "steps_taken": self.steps_taken,
            "accountant_history": [list(h) for h in self.accountant.history],
            "grad_mode": self.dp.grad_mode,
            "physical_batch_size": self.physical,
            "noise_seed": "random (not recorded)" if self.dp.noise_seed == "random" else self.noise_seed,
            "notes": ("the recorded training loss is computed on the private data and is not itself "
                      "differentially private"),
        }
