"""Opacus's DP optimizer for externally clipped gradients, with its per-parameter loops fused.

``DPOptimizerFastGradientClipping`` receives the clipped per-batch gradient sums in ``p.grad``,
accumulates them over the physical batches of a logical batch, adds N(0, (sigma C)^2) noise and
divides by the expected batch size. Here the same three steps run as a handful of foreach
operations with one noise draw for all parameters, which matters for small models where
Python overhead per parameter dominates; the skip/step-hook logic (used for accounting and
``BatchMemoryManager``) is Opacus's own.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _mark_as_processed


class FusedDPOptimizer(DPOptimizerFastGradientClipping):
    def accumulate(self) -> None:
        params = self.params
        if not params:
            return
        if params[0].summed_grad is None:
            for p in params:
                p.summed_grad = p.grad.detach().clone()
        else:
            torch._foreach_add_([p.summed_grad for p in params], [p.grad for p in params])

    def add_noise(self) -> None:
        params = self.params
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = multiplier * self.max_grad_norm
        sizes = [p.numel() for p in params]
        if std > 0:
            flat = torch.normal(0.0, std, (sum(sizes),), generator=self.generator,
                                dtype=params[0].summed_grad.dtype)
            noisy = torch._foreach_add([p.summed_grad for p in params],
                                       [n.view_as(p) for n, p in zip(flat.split(sizes), params, strict=True)])
        else:
            noisy = [p.summed_grad.clone() for p in params]
        for p, g in zip(params, noisy, strict=True):
            p.grad = g
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            torch._foreach_div_([p.grad for p in self.params], self.expected_batch_size * self.accumulated_iterations)
