"""Faithfulness metrics: deletion / insertion AUC (RISE), SaCo, infidelity.

All perturbed inputs are built on the fly from rank maps and scored through the shared
perturbation runner (`engine.perturbed_scores`), every explanation of the batch in one run.
"""
from __future__ import annotations

import math

import torch

from ..engine import PassCounter
from ..errors import SaliencyError
from .base import (EvalContext, Metric, normalized_auc, per_example_passes, rank_maps, register, stack_maps)


class _Causal(Metric):
    family = "faithfulness"
    mode = "deletion"
    cost = ("n_steps-1 per map + 2 shared per image (n_steps = ceil(HW/step); 224 at 224x224; at most 100 on "
            "series, volumes and feature vectors)")

    def compute(self, ctx: EvalContext, exps, step=None, substrate=None, output="prob"):
        names, maps, image_of = stack_maps(ctx, exps)
        hw = maps[0].numel()
        # positions removed per step: a row of pixels on images; else about 1/100 of the map
        step = int(step or (maps.shape[-1] if ctx.layout == "BCHW" else math.ceil(hw / 100)))
        if step < 1:
            raise SaliencyError(f"{self.name}: step must be >= 1, got {step}")
        n = math.ceil(hw / step)
        sub_name = substrate or ("zero" if self.mode == "deletion" else "blur")
        sub = ctx.substrate(sub_name)
        ranks = rank_maps(maps, ctx.generator(1)).to(ctx.x.device)
        inner = n - 1
        counter = PassCounter()
        deletion = self.mode == "deletion"

        def masks(start, stop):
            idx = torch.arange(start, stop, device=ranks.device)
            m, i = idx // inner, idx % inner + 1
            k = (i * step).clamp(max=hw).view(-1, 1)
            keep = ranks[m] >= k if deletion else ranks[m] < k
            return image_of[m], ctx.input_mask(keep)

        mid = ctx.runner(sub, masks, maps.shape[0] * inner, counter, output=output,
                         desc=self.name).view(maps.shape[0], inner) if inner else maps.new_zeros(maps.shape[0], 0)
        clean = ctx.clean_scores(output)[image_of]
        base = ctx.substrate_scores(sub_name, output)[image_of]
        first, last = (clean, base) if deletion else (base, clean)
        curves = torch.cat([first.view(-1, 1), mid.to(first), last.view(-1, 1)], 1)
        auc = normalized_auc(curves.double())
        B = ctx.batch
        x_axis = (torch.arange(n + 1, dtype=torch.float64) * step).clamp(max=hw) / hw
        out = {}
        for e, name in enumerate(names):
            sl = slice(e * B, (e + 1) * B)
            out[name] = self.result(name, auc[sl], curves={"x": x_axis, "y": curves[sl].double().cpu(),
                                                           "xlabel": f"fraction of {ctx.positions} {'removed' if deletion else 'inserted'}",
                                                           "ylabel": output},
                                    passes=per_example_passes(counter, B, len(names)),
                                    extras={"substrate": sub_name if isinstance(sub_name, str) else "tensor",
                                            "step": step, "steps": n, "output": output})
        return out


@register
class Deletion(_Causal):
    name = "deletion"
    mode = "deletion"
    direction = "lower"
    defaults = {"step": None, "substrate": "zero", "output": "prob"}
    description = ("RISE deletion AUC: remove pixels most-salient first onto the substrate (zeros of the "
                   "normalised space = mean colour); normalised trapezoid AUC of the class probability.")


@register
class Insertion(_Causal):
    name = "insertion"
    mode = "insertion"
    direction = "higher"
    defaults = {"step": None, "substrate": "blur", "output": "prob"}
    description = ("RISE insertion AUC: put pixels most-salient first back onto a blurred copy (11x11, "
                   "sigma 5); normalised trapezoid AUC of the class probability.")


@register
class SaCo(Metric):
    name = "saco"
    family = "faithfulness"
    direction = "higher"
    defaults = {"groups": 10, "substrate": "mean", "output": "prob"}
    cost = "K per map + 0 (clean pass shared)"
    description = ("Salience-guided faithfulness coefficient (Wu et al. 2024): K rank groups; each pair's "
                   "saliency difference counts +/- by whether the groups' individual prediction drops agree; "
                   "F/T in [-1, 1].")

    def compute(self, ctx, exps, groups=10, substrate="mean", output="prob"):
        names, maps, image_of = stack_maps(ctx, exps)
        hw = maps[0].numel()
        K = int(groups)
        if not 2 <= K <= hw:
            raise SaliencyError(f"saco: groups must be between 2 and the number of {ctx.positions} ({hw}), got {groups}")
        ranks = rank_maps(maps, ctx.generator(2)).to(ctx.x.device)
        # equal-size groups; the remainder goes to the first groups
        sizes = torch.full((K,), hw // K, dtype=torch.long)
        sizes[: hw % K] += 1
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).to(ranks.device)
        group_of = torch.bucketize(ranks, bounds[1:], right=True)      # [M,HW] in 0..K-1
        sub = ctx.substrate(substrate)
        counter = PassCounter()

        def masks(start, stop):
            idx = torch.arange(start, stop, device=ranks.device)
            m, g = idx // K, idx % K
            keep = group_of[m] != g.view(-1, 1)
            return image_of[m], ctx.input_mask(keep)

        pert = ctx.runner(sub, masks, maps.shape[0] * K, counter, output=output, desc="saco").view(-1, K).double()
        drop = ctx.clean_scores(output)[image_of].double().view(-1, 1) - pert             # [M,K]
        flat = maps.reshape(maps.shape[0], -1).double()
        s = torch.zeros(maps.shape[0], K, dtype=torch.float64, device=flat.device)
        s.scatter_add_(1, group_of, flat)                                                  # signed sums
        scores = saco_from_groups(s, drop)
        B = ctx.batch
        return {name: self.result(name, scores[e * B:(e + 1) * B],
                                  passes=per_example_passes(counter, B, len(names)),
                                  extras={"groups": K, "substrate": substrate, "output": output,
                                          "group_saliency": s[e * B:(e + 1) * B].tolist(),
                                          "group_drop": drop[e * B:(e + 1) * B].tolist()})
                for e, name in enumerate(names)}


def saco_from_groups(s: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """SaCo from group saliency sums s [M,K] (most salient first) and prediction drops [M,K]."""
    K = s.shape[1]
    i, j = torch.triu_indices(K, K, offset=1)
    d = s[:, i] - s[:, j]
    sign = torch.where(drop[:, i] >= drop[:, j], 1.0, -1.0).to(d)
    w = sign * d
    F_, T = w.sum(1), w.abs().sum(1)
    return torch.where(T > 0, F_ / T.clamp_min(1e-300), torch.zeros_like(T))


# ------------------------------------------------------------------------------ infidelity
def _attribution(exp, ctx: EvalContext) -> torch.Tensor:
    """Input-space attribution (the shape of x): the explanation's own, else the map on every
    channel (then I^T Phi = sum over positions of the map times the channel sum of I)."""
    x = ctx.x
    if exp.attributions is not None and tuple(exp.attributions.shape) == tuple(x.shape):
        return exp.attributions.to(x)
    return ctx.to_input(exp.maps.to(x))


def infidelity_perturbations(x: torch.Tensor, rows: torch.Tensor, kind: str, sigma: float,
                             gen: torch.Generator, baseline: torch.Tensor | None = None) -> torch.Tensor:
    """Perturbations I for the example rows `rows` (the perturbed input is x - I).

    "noisy_baseline" (Yeh et al.'s Gaussian setting): x - I = baseline + sigma * N(0,1), i.e.
    I = x - baseline - sigma * eps. "gaussian": I = sigma * N(0,1) (small noise around x).
    """
    if kind not in ("noisy_baseline", "gaussian"):
        raise SaliencyError(f"unknown infidelity perturbation {kind!r}; use 'noisy_baseline' or 'gaussian'")
    # n copies of every input: in place where the arithmetic allows, the same operations in the
    # same order as the formula (a fused multiply-add would round differently)
    eps = torch.randn((rows.shape[0], *x.shape[1:]), generator=gen).to(x).mul_(sigma)
    if kind == "gaussian":
        return eps
    xr = x[rows]
    if baseline is not None:
        xr -= baseline[rows]
    return xr.sub_(eps)


@register
class Infidelity(Metric):
    name = "infidelity"
    family = "faithfulness"
    direction = "lower"
    randomized = True
    defaults = {"perturbation": "noisy_baseline", "sigma": 0.2, "n_perturb": 100, "normalize": True,
                "output": None}
    cost = "n_perturb per map"
    description = ("Infidelity (Yeh et al. 2019): E[(I^T Phi - (f(x) - f(x - I)))^2] over random I; "
                   "normalize=True rescales Phi by the optimal beta first (paper code).")

    def compute(self, ctx, exps, perturbation="noisy_baseline", sigma=0.2, n_perturb=100, normalize=True,
                output=None):
        names = list(exps)
        x = ctx.x
        B, n = ctx.batch, int(n_perturb)
        if n < 1:
            raise SaliencyError("infidelity: n_perturb must be >= 1")
        out_kind = output or ctx.target.output
        gen = ctx.generator(3)
        rows = torch.arange(B, device=x.device).repeat_interleave(n)
        # the same perturbations serve every explanation: one pass for f(x - I)
        I = infidelity_perturbations(x, rows, perturbation, float(sigma), gen)
        counter = PassCounter()
        ones = (1,) * (x.dim() - 1)
        pert = ctx.runner(torch.zeros_like(I), lambda a, b: (torch.arange(a, b, device=x.device),
                                                             torch.ones(b - a, *ones, device=x.device)),
                          B * n, counter, output=out_kind, x=x[rows] - I,
                          target=_rows_target(ctx.target, rows), desc="infidelity")
        clean = ctx.clean_scores(out_kind)
        df = (clean[rows] - pert).double().view(B, n)
        results = {}
        for name in names:
            exp = exps[name]
            ctx.check_maps(exp)
            phi = _attribution(exp, ctx)
            ip = (I.view(B, n, -1) * phi.reshape(B, 1, -1)).reshape(B * n, -1).sum(1).double().view(B, n)
            if normalize:
                den = (ip ** 2).mean(1)
                beta = torch.where(den > 0, (ip * df).mean(1) / den.clamp_min(1e-300), torch.zeros_like(den))
            else:
                beta = torch.ones(B, dtype=torch.float64, device=ip.device)
            infd = ((df - beta.view(-1, 1) * ip) ** 2).mean(1)
            results[name] = self.result(name, infd, passes=per_example_passes(counter, B, len(names)),
                                        extras={"perturbation": perturbation, "sigma": sigma, "n_perturb": n,
                                                "normalize": normalize, "beta": beta.tolist(),
                                                "output": out_kind})
        return results


def _rows_target(resolved, rows):
    """A ResolvedTarget whose example i is `resolved`'s example rows[i]."""
    from ..targets import ResolvedTarget

    rows = [int(r) for r in rows]
    return ResolvedTarget([resolved.pos[r] for r in rows], [resolved.neg[r] for r in rows], resolved.output,
                          resolved.kind)
