"""Opacus's DP optimizer for externally clipped gradients, with its per-parameter loops fused and
the distributed semantics of Opacus's ``DistributedDPOptimizer``.

``DPOptimizerFastGradientClipping`` receives the clipped per-batch gradient sums in ``p.grad``,
accumulates them, adds N(0, (sigma C)^2) noise and divides by the expected batch size. Here the
same steps run as a handful of foreach operations with one noise draw for all parameters, which
matters for small models where Python overhead per parameter dominates; the skip/step-hook logic
(used for accounting) is Opacus's own.

Under ``torch.distributed`` (DPDDP semantics): every process holds the clipped sum of its share of
the logical batch; process 0 alone adds the noise, one all-reduce sums the noisy sum of process 0
with the others' sums, and the result is divided by the *global* expected batch size q N. The
released gradient is therefore exactly the single-process one: the sum over the whole Poisson
batch plus noise of standard deviation sigma C (not sqrt(world) times it), scaled by the same
constant, so the accountant's analysis is unchanged.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _mark_as_processed

from memlens import distributed as D
from memlens.dp.secrets import secure_normal


class FusedDPOptimizer(DPOptimizerFastGradientClipping):
    #: draw the noise with the floating-point-safe construction (memlens.dp.secrets.secure_normal)
    secure: bool = False

    def accumulate(self) -> None:
        params = self.params
        if not params:
            return
        if params[0].summed_grad is None:
            for p in params:
                p.summed_grad = p.grad.detach().clone()
        else:
            torch._foreach_add_([p.summed_grad for p in params], [p.grad for p in params])

    def noise_std(self) -> float:
        return getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm

    def add_noise(self) -> None:
        params = self.params
        std = self.noise_std()
        sizes = [p.numel() for p in params]
        if std > 0 and D.rank() == 0:
            kw = dict(generator=self.generator, dtype=params[0].summed_grad.dtype, device=params[0].summed_grad.device)
            flat = (secure_normal(std, sum(sizes), **kw) if self.secure else
                    torch.normal(0.0, std, (sum(sizes),), **kw))
            noisy = torch._foreach_add([p.summed_grad for p in params],
                                       [n.view_as(p) for n, p in zip(flat.split(sizes), params, strict=True)])
        else:
            noisy = [p.summed_grad.clone() for p in params]
        if D.active():
            # one collective for all parameters: the processes' clipped sums plus process 0's noise
            buf = torch.cat([g.reshape(-1) for g in noisy])
            D.all_reduce_(buf)
            noisy = [b.view_as(p) for b, p in zip(buf.split(sizes), params, strict=True)]
        for p, g in zip(params, noisy, strict=True):
            p.grad = g
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            torch._foreach_div_([p.grad for p in self.params], self.expected_batch_size * self.accumulated_iterations)
