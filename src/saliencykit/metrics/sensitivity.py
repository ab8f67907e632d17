"""Sensitivity metrics: max- and average-sensitivity (Yeh et al. 2019).

The explanation's method is re-run (same parameters, layer, seed and target) on `n_samples`
copies of each input perturbed by uniform noise in the L-inf ball of radius `radius` (in the
model's normalised input space), all copies in one batched `explain` call.
"""
from __future__ import annotations

import torch

from ..engine import PassCounter
from ..errors import SaliencyError
from .base import EvalContext, Metric, per_example_passes, register, rerun_method


class _Sensitivity(Metric):
    family = "robustness"
    direction = "lower"
    needs = ("gradients",)
    randomized = True
    defaults = {"radius": 0.02, "n_samples": 10, "normalize": True}
    cost = "n_samples x the method's cost"
    reduce = "max"

    def compute_one(self, ctx: EvalContext, name, exp, radius=0.02, n_samples=10, normalize=True):
        maps = ctx.check_maps(exp)
        n = int(n_samples)
        if n < 1 or radius < 0:
            raise SaliencyError(f"{self.name}: need n_samples >= 1 and radius >= 0")
        B = ctx.batch
        rows = torch.arange(B, device=ctx.x.device).repeat_interleave(n)
        gen = ctx.generator(4)
        noise = (torch.rand((B * n,) + tuple(ctx.x.shape[1:]), generator=gen) * 2 - 1).to(ctx.x) * float(radius)
        counter = PassCounter()
        new = rerun_method(ctx, exp, ctx.x[rows] + noise, rows, counter)
        diff = (new - maps[rows]).reshape(B, n, -1).double().norm(dim=2)     # Frobenius norm per sample
        agg = diff.amax(1) if self.reduce == "max" else diff.mean(1)
        if normalize:
            den = maps.reshape(B, -1).double().norm(dim=1)
            agg = agg / torch.where(den > 0, den, torch.ones_like(den))
        return self.result(name, agg, passes=per_example_passes(counter, B),
                           extras={"radius": radius, "n_samples": n, "normalize": normalize,
                                   "per_sample": diff.tolist()})


@register
class MaxSensitivity(_Sensitivity):
    name = "max_sensitivity"
    reduce = "max"
    description = ("Max-sensitivity: max over uniform L-inf perturbations of radius r of ||Phi(y) - Phi(x)||_F, "
                   "divided once by ||Phi(x)||_F.")


@register
class AvgSensitivity(_Sensitivity):
    name = "avg_sensitivity"
    reduce = "mean"
    description = "Average sensitivity: like max_sensitivity with the mean over samples instead of the max."
