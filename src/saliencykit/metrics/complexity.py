"""Map-only metrics: sparseness (Gini index), complexity (entropy), and agreement between the
maps that several methods give for the same image. No model passes."""
from __future__ import annotations

import math

import torch

from ..errors import SaliencyError
from .base import Metric, register, stack_maps


def gini(maps: torch.Tensor) -> torch.Tensor:
    """Gini index of |S| per map [M,H,W] -> [M] (Chalasani et al. 2020): 0 = uniform, ->1 = one pixel."""
    a = maps.reshape(maps.shape[0], -1).abs().double()
    a, _ = a.sort(1)
    n = a.shape[1]
    k = torch.arange(1, n + 1, dtype=torch.float64, device=a.device)
    total = a.sum(1)
    g = ((2 * k - n - 1) * a).sum(1) / (n * total.clamp_min(1e-300))
    return torch.where(total > 0, g, torch.full_like(g, float("nan")))


def entropy(maps: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of |S| / sum |S| per map; log(HW) for a uniform map."""
    a = maps.reshape(maps.shape[0], -1).abs().double()
    total = a.sum(1, keepdim=True)
    p = a / total.clamp_min(1e-300)
    h = -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(1)
    return torch.where(total.squeeze(1) > 0, h, torch.full_like(h, float("nan")))


@register
class Sparseness(Metric):
    name = "sparseness"
    family = "complexity"
    direction = "higher"
    defaults = {}
    cost = "0"
    description = "Gini index of the absolute map (Chalasani et al. 2020); higher = fewer, stronger features."

    def compute_one(self, ctx, name, exp):
        return self.result(name, gini(ctx.check_maps(exp)))


@register
class Complexity(Metric):
    name = "complexity"
    family = "complexity"
    direction = "lower"
    defaults = {}
    cost = "0"
    description = ("Entropy of the absolute map as a distribution (Bhatt et al. 2020), in nats; "
                   "log(H*W) for a uniform map; lower = simpler.")

    def compute_one(self, ctx, name, exp):
        return self.result(name, entropy(ctx.check_maps(exp)), extras={"max": math.log(exp.maps[0].numel())})


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per row of [M,N] (average ranks for ties)."""
    return pearson(_avg_ranks(a), _avg_ranks(b))


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.double() - a.double().mean(1, keepdim=True)
    b = b.double() - b.double().mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def _avg_ranks(a: torch.Tensor) -> torch.Tensor:
    from scipy.stats import rankdata

    return torch.from_numpy(rankdata(a.double().cpu().numpy(), axis=1)).to(a.device)


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """|top-k(a) & top-k(b)| / k per row."""
    ta = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    tb = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    return (ta & tb).sum(1).double() / k


@register
class Agreement(Metric):
    name = "agreement"
    family = "agreement"
    direction = None
    defaults = {"top_fraction": 0.1, "absolute": True, "exclude": ("random",)}
    cost = "0"
    description = ("How much the methods' maps of the same image agree: per method, the mean Spearman rank "
                   "correlation with every other method (score) and the pairwise Spearman and top-k overlap "
                   "matrices (extras). Neither direction is better.")

    def compute(self, ctx, exps, top_fraction=0.1, absolute=True, exclude=("random",)):
        names, maps, _ = stack_maps(ctx, exps)
        B = ctx.batch
        flat = maps.reshape(len(names), B, -1).double()
        if absolute:
            flat = flat.abs()
        n = flat.shape[-1]
        k = max(1, int(round(float(top_fraction) * n)))
        if not 0 < top_fraction <= 1:
            raise SaliencyError(f"agreement: top_fraction must be in (0, 1], got {top_fraction}")
        E = len(names)
        rho = torch.full((B, E, E), float("nan"), dtype=torch.float64)
        overlap = torch.full((B, E, E), float("nan"), dtype=torch.float64)
        for i in range(E):
            rho[:, i, i] = 1.0
            overlap[:, i, i] = 1.0
            for j in range(i + 1, E):
                r = spearman(flat[i], flat[j]).cpu()
                o = topk_overlap(flat[i], flat[j], k).cpu()
                rho[:, i, j] = rho[:, j, i] = r
                overlap[:, i, j] = overlap[:, j, i] = o
        keep = [j for j, nm in enumerate(names) if nm not in set(exclude or ())]
        out = {}
        for i, name in enumerate(names):
            others = [j for j in keep if j != i]
            score = rho[:, i, others].mean(1) if others else torch.full((B,), float("nan"), dtype=torch.float64)
            ov = overlap[:, i, others].mean(1) if others else torch.full((B,), float("nan"), dtype=torch.float64)
            out[name] = self.result(name, score, extras={
                "methods": names, "spearman": rho.tolist(), "topk_overlap": overlap.tolist(), "k": k,
                "mean_topk_overlap": ov.tolist(), "compared_with": [names[j] for j in others]})
        return out
