"""Contrastive and group metrics: the four RFxG metrics (Elisha et al.) and
NormGrad's class sensitivity (Rebuffi et al. 2020).

RFxG masking: for alpha in 0.1..0.9 the top floor(alpha*HW) pixels of the map are replaced by
the substrate (black by default) and softmax probabilities are read; the metric is the
trapezoid area over alpha (x-range 0.8, not rescaled, as in the reference code). Per alpha:

    rfxg_ccs  (class a vs class b)      p_a(masked) - p_b(masked)                       lower = better
    rfxg_pgs  (group A)                 mean_{k in A} (p_k(orig) - p_k(masked))         higher = better
    rfxg_cgc  (class a vs its group A)  official:     (mean_A dp + dp_a) / 2            lower = better
                                        contrastive:  dp_a - mean_{A minus a} dp
    rfxg_cgs  (group A vs group B)      official:     (mean_A dp + mean_B dp) / 2       lower = better
                                        contrastive:  mean_A dp - mean_B dp

with dp_k = p_k(masked) - p_k(orig). The reference code's CGC and CGS *add* the two changes, which
rewards any map that lowers both sides; `variant="contrastive"` (the default) subtracts them, so
a map scores well only if it removes evidence for the first side more than for the second.
`variant="official"` reproduces the reference code.

The classes come from the evaluation target (`Contrast(a, vs=b)`, `Group(...)`,
`Contrast(Group(A), vs=Group(B))`) or from the parameters `vs`, `group`, `vs_group`.
"""
from __future__ import annotations

import torch

from ..engine import PassCounter
from ..errors import SaliencyError
from .base import EvalContext, Metric, per_example_passes, rank_maps, register, rerun_method, stack_maps

ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _indices(ctx: EvalContext, spec, what: str) -> list[int]:
    """A class set given as a label/index, a list of them, or a named group."""
    subject = ctx.subject
    k = ctx.logits.shape[1]
    if isinstance(spec, str) and spec.lower() in (getattr(subject, "groups", {}) or {}):
        return sorted(subject.groups[spec.lower()])
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise SaliencyError(f"{what}: empty class list")
        return sorted({subject.class_index(c, k) for c in spec})
    return [subject.class_index(spec, k)]


def _sides(ctx: EvalContext, metric: str, vs=None, group=None, vs_group=None):
    """Per-example (first classes, second classes) for the metric, from target and parameters."""
    B = ctx.batch
    t = ctx.target
    first = [list(s.indices) for s in t.pos]
    second = [None if s is None else list(s.indices) for s in t.neg]
    if metric == "rfxg_ccs":
        if vs is not None:
            second = [_indices(ctx, vs, metric)] * B
        if any(s is None for s in second):
            raise SaliencyError("rfxg_ccs compares two classes: it needs a second class (target=Contrast(a, vs=b) "
                                "or params={'rfxg_ccs': {'vs': b}})")
        if any(len(f) != 1 or len(s) != 1 for f, s in zip(first, second)):
            raise SaliencyError("rfxg_ccs compares two single classes; use rfxg_cgs for groups")
        return first, second
    if metric == "rfxg_pgs":
        if group is not None:
            first = [_indices(ctx, group, metric)] * B
        elif any(s.kind != "group" for s in t.pos):
            raise SaliencyError("rfxg_pgs scores a group of classes: it needs a group (target=Group(...) or "
                                "params={'rfxg_pgs': {'group': 'dog'}})")
        return first, None
    if metric == "rfxg_cgc":
        if any(len(f) != 1 for f in first):
            raise SaliencyError("rfxg_cgc needs a single class as the target's first side")
        if group is not None:
            second = [_indices(ctx, group, metric)] * B
        if any(s is None for s in second):
            raise SaliencyError("rfxg_cgc compares a class with its group: it needs the group "
                                "(params={'rfxg_cgc': {'group': 'dog'}} or target=Contrast(a, vs=Group(...)))")
        return first, second
    if metric == "rfxg_cgs":
        if group is not None:
            first = [_indices(ctx, group, metric)] * B
        if vs_group is not None:
            second = [_indices(ctx, vs_group, metric)] * B
        if any(s is None for s in second):
            raise SaliencyError("rfxg_cgs compares two groups: it needs a second group (target=Contrast(Group(A), "
                                "vs=Group(B)) or params={'rfxg_cgs': {'vs_group': ...}})")
        return first, second
    raise SaliencyError(f"unknown RFxG metric {metric!r}")


def _mean_over(p: torch.Tensor, sets: list[list[int]], rows: torch.Tensor) -> torch.Tensor:
    """p [N,K] -> [N]: mean of p over the class set of each row's example."""
    mask = torch.zeros(len(sets), p.shape[1], dtype=p.dtype, device=p.device)
    for b, s in enumerate(sets):
        mask[b, s] = 1.0
    m = mask[rows]
    return (p * m).sum(1) / m.sum(1).clamp_min(1)


class _RFxG(Metric):
    family = "contrastive"
    direction = "lower"
    needs = ("second_class",)
    defaults = {"alphas": ALPHAS, "substrate": "black", "variant": "contrastive", "vs": None, "group": None,
                "vs_group": None}
    cost = "9 per map (+1 shared clean pass)"

    def compute(self, ctx: EvalContext, exps, alphas=ALPHAS, substrate="black", variant="contrastive", vs=None,
                group=None, vs_group=None):
        if variant not in ("contrastive", "official"):
            raise SaliencyError(f"{self.name}: variant must be 'contrastive' or 'official', got {variant!r}")
        first, second = _sides(ctx, self.name, vs, group, vs_group)
        alphas = [float(a) for a in alphas]
        if len(alphas) < 2 or any(not 0 < a < 1 for a in alphas):
            raise SaliencyError(f"{self.name}: alphas must be at least two fractions in (0, 1)")
        names, maps, image_of = stack_maps(ctx, exps)
        M, hw = maps.shape[0], maps[0].numel()
        L = len(alphas)
        ranks = rank_maps(maps, ctx.generator(6)).to(ctx.x.device)
        ks = torch.tensor([int(a * hw) for a in alphas], device=ranks.device)
        sub = ctx.substrate(substrate)
        counter = PassCounter()
        # one pass gives all classes' probabilities: score with a recorder that keeps them
        probs_chunks = []

        class _Recorder:
            def score(self, logits, rows=None, output=None):
                probs_chunks.append(logits.float().softmax(1))
                return torch.zeros(logits.shape[0], device=logits.device)

        def masks(start, stop):
            idx = torch.arange(start, stop, device=ranks.device)
            m, a = idx // L, idx % L
            keep = ranks[m] >= ks[a].view(-1, 1)
            return image_of[m], ctx.input_mask(keep)

        ctx.runner(sub, masks, M * L, counter, target=_Recorder(), desc=self.name)
        p = torch.cat(probs_chunks).double()                            # [M*L, K]
        rows = image_of.repeat_interleave(L)
        p0 = ctx.logits.double().softmax(1)[rows]                       # clean, per row
        dp = p - p0
        if self.name == "rfxg_ccs":
            a = torch.tensor([f[0] for f in first], device=p.device)[rows]
            b = torch.tensor([s[0] for s in second], device=p.device)[rows]
            y = p.gather(1, a.view(-1, 1)).squeeze(1) - p.gather(1, b.view(-1, 1)).squeeze(1)
        elif self.name == "rfxg_pgs":
            y = -_mean_over(dp, first, rows)
        elif self.name == "rfxg_cgc":
            a = torch.tensor([f[0] for f in first], device=p.device)[rows]
            dpa = dp.gather(1, a.view(-1, 1)).squeeze(1)
            if variant == "official":
                y = 0.5 * (_mean_over(dp, second, rows) + dpa)
            else:
                rest = [[k for k in s if k != f[0]] or s for f, s in zip(first, second)]
                y = dpa - _mean_over(dp, rest, rows)
        else:  # rfxg_cgs
            ma, mb = _mean_over(dp, first, rows), _mean_over(dp, second, rows)
            y = 0.5 * (ma + mb) if variant == "official" else ma - mb
        y = y.view(M, L).cpu()
        x_axis = torch.tensor(alphas, dtype=torch.float64)
        auc = torch.trapezoid(y, x_axis, dim=1)
        B = ctx.batch
        return {name: self.result(name, auc[e * B:(e + 1) * B],
                                  curves={"x": x_axis, "y": y[e * B:(e + 1) * B], "xlabel": "fraction masked",
                                          "ylabel": self.name},
                                  passes=per_example_passes(counter, B, len(names)),
                                  extras={"variant": variant, "substrate": substrate, "first": first,
                                          "second": second})
                for e, name in enumerate(names)}


@register
class RFxGCCS(_RFxG):
    name = "rfxg_ccs"
    description = "RFxG contrastive class score: AUC of p_a - p_b as the top of the (a vs b) map is masked."


@register
class RFxGPGS(_RFxG):
    name = "rfxg_pgs"
    direction = "higher"
    needs = ()   # a group of classes (from the target or `group=`), no second side
    description = "RFxG pointwise group score: AUC of the mean probability drop of the group's classes."


@register
class RFxGCGC(_RFxG):
    name = "rfxg_cgc"
    description = ("RFxG class-vs-group score: change of p_a against its group's change as the map is masked "
                   "(variant 'contrastive' subtracts, 'official' averages as in the reference code).")


@register
class RFxGCGS(_RFxG):
    name = "rfxg_cgs"
    description = ("RFxG group-vs-group score: mean change of group A against group B as the map is masked "
                   "(variant 'contrastive' subtracts, 'official' averages as in the reference code).")


@register
class ClassSensitivity(Metric):
    name = "class_sensitivity"
    family = "contrastive"
    direction = "lower"
    needs = ("gradients",)
    defaults = {"correlation": "pearson"}
    cost = "2 x the method's cost"
    description = ("NormGrad class sensitivity (Rebuffi et al. 2020): correlation between the maps the method "
                   "gives for the highest- and the lowest-scoring class; ~1 = ignores the class.")

    def compute_one(self, ctx, name, exp, correlation="pearson"):
        from ..targets import Class
        from .complexity import pearson, spearman

        if correlation not in ("pearson", "spearman"):
            raise SaliencyError(f"class_sensitivity: correlation must be 'pearson' or 'spearman', got {correlation!r}")
        ctx.check_maps(exp)
        B = ctx.batch
        hi = ctx.logits.argmax(1).tolist()
        lo = ctx.logits.argmin(1).tolist()
        counter = PassCounter()
        rows = torch.arange(B, device=ctx.x.device).repeat(2)
        x2 = torch.cat([ctx.x, ctx.x])
        maps = rerun_method(ctx, exp, x2, rows, counter, target=Class(hi + lo))
        f = maps.reshape(2, B, -1).double()
        corr = (pearson if correlation == "pearson" else spearman)(f[0], f[1])
        return self.result(name, corr, passes=per_example_passes(counter, B),
                           extras={"max_class": hi, "min_class": lo, "correlation": correlation})
