"""Averaging the weights of the last epochs: a recipe change that lowers the training-seed noise of
per-image scores.

Stochastic weight averaging (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
Generalization", UAI 2018) replaces the final weights by the uniform mean of the weights at the end
of each of the last N epochs. What the average removes is the last steps' optimisation noise, the
part of a per-image score that changes with the training seed without saying anything about the
image. The average is a function of weights the run produced anyway: under DP-SGD it is
post-processing, and the guarantee is unchanged.

Floating-point tensors of the whole objective (encoder and heads) are averaged, buffers included
(BatchNorm's running statistics averaged like ``torch.optim.swa_utils.AveragedModel(...,
use_buffers=True)`` does, rather than recomputed on the data); integer buffers keep their last
value. The running mean lives in the resumable checkpoint, so an interrupted run ends with the
same average.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class WeightAverage:
    """Uniform running mean of a module's floating-point state over the epochs it is fed."""

    PREFIX = "average."

    def __init__(self, epochs: int, total_epochs: int):
        self.first = max(total_epochs - epochs, 0)  # the first epoch (0-based) whose end is averaged
        self.count = 0
        self.mean: dict[str, torch.Tensor] = {}

    def wants(self, epoch: int) -> bool:
        """Whether the weights at the end of ``epoch`` (0-based) join the average."""
        return epoch >= self.first

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.count += 1
        for name, value in module.state_dict().items():
            if not value.is_floating_point():
                continue
            if name not in self.mean:
                self.mean[name] = value.detach().clone().double()
            else:
                self.mean[name] += (value.detach().double() - self.mean[name]) / self.count

    @torch.no_grad()
    def apply(self, module: nn.Module) -> None:
        """Load the average into ``module`` (nothing when no epoch was averaged)."""
        if not self.count:
            return
        state = module.state_dict()
        for name, value in self.mean.items():
            state[name].copy_(value.to(state[name].dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {self.PREFIX + k: v for k, v in self.mean.items()}

    def state(self) -> dict:
        return {"count": self.count, "first": self.first}

    def restore(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.count = int(state.get("count", 0))
        self.mean = {k.removeprefix(self.PREFIX): v.double() for k, v in tensors.items() if k.startswith(self.PREFIX)}
