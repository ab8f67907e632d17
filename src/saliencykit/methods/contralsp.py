"""ContraLSP for series (`layout="BCT"`): contrastive and locally sparse perturbations (after Liu et
al., ICLR 2024, "Explaining Time Series via Contrastive and Locally Sparse Perturbations").

A mask m [B,C,T] in [0, 1], one value per example, channel and step, keeps the series where it is
1 and replaces it by a counterfactual series x_r where it is 0: `x_m = m x + (1 - m) x_r`. Three
parts are learned together with Adam, from a seeded start:

* the counterfactual x_r = P(x), a small convolutional network over time shared by the batch
  (`hidden` channels, kernels of `window` steps). It is trained only by a triplet loss that puts
  x_r near a series of another class and away from its own example:
  `relu(min_j d(x_r_i, r_j) - d(x_r_i, x_i) + margin min_j d(x_i, r_j))`, the margin a share (at most 1)
  of the example's distance to its references, plus `min_j d(x_r_i, r_j)` itself (a pull that
  keeps x_r among the data), with d the root mean squared difference over
  channels and steps divided by the batch's standard deviation. The references r_j are the `negatives=`
  series when given, else the other examples of the batch that the model puts in a class other
  than the one explained for example i; an example with none (a batch of one class, a batch of
  one) is pulled towards its own channel means, a flat series. Unlike a fixed blur or zeros, the
  replacement then lies among the data (the paper's answer to the distribution shift of
  perturbations); the keep term below does not train P, which would otherwise learn to copy x.
* sample-specific stochastic gates: z = clip(mu + eps, 0, 1), eps ~ N(0, sigma^2) drawn anew at
  every step (a Gaussian relaxation of Bernoulli gates), mu [B,C,T] starting at 0.5, with the
  l0-like penalty `P(z > 0) = Phi(mu / sigma)` (the Gaussian CDF) averaged over channels and steps:
  gates the score does not need close, channel by channel ("locally sparse"). After training
  eps = 0.
* smoothness: the gates are averaged over `window` steps and passed through a sigmoid of learned
  temperature tau (one per example and channel, the trend's sharpness), rescaled so that 0 stays 0
  and 1 stays 1: `m = (sigmoid(tau (z̄ - 1/2)) - sigmoid(-tau/2)) / (sigmoid(tau/2) - sigmoid(-tau/2))`.
  A large tau makes the mask nearly binary, a small one keeps it graded.

The mask minimises the score lost, `relu(s(x) - s(x_m))/|s(x)|` (exceeding the clean score earns
nothing: a mix of x and x_r can raise a logit past it, which would reward keeping x_r rather than
x), plus `l0 * mean Phi(mu/sigma)`, per example; P minimises `contrast` times the triplet loss.
Each Adam step is one gradient pass of the model through the engine (the model's gradient at
x_m, chained through m in the method's own small graph), counted.
`Explanation.attributions` is the mask [B,C,T]; the map [B,T] its channel reduction (`reduce`,
default "max_abs": a step matters when one of its channels does).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import SaliencyError, positive_float, positive_int
from .base import Method, register

REDUCTIONS = ("max_abs", "mean", "sum", "abs_sum", "l2")


def smooth_gates(z: torch.Tensor, tau: torch.Tensor, window: int) -> torch.Tensor:
    """The mask of gates `z` [B,C,T]: their moving average over `window` steps (replicate ends),
    through the sigmoid of temperature `tau` [B,C,1] rescaled to map 0 to 0 and 1 to 1."""
    if window > 1:
        left = (window - 1) // 2
        z = F.avg_pool1d(F.pad(z, (left, window - 1 - left), mode="replicate"), window, stride=1)
    low, high = torch.sigmoid(-tau / 2), torch.sigmoid(tau / 2)
    return (torch.sigmoid(tau * (z - 0.5)) - low) / (high - low)


class Counterfactual(torch.nn.Module):
    """x -> x_r: two 1-D convolutions over time (`window` steps each) with a tanh between, in the
    series' own units (each example and channel standardised on the way in, restored on the way out)."""

    def __init__(self, channels: int, hidden: int, window: int, generator: torch.Generator):
        super().__init__()
        k = window if window % 2 else window + 1      # odd: 'same' length with symmetric padding
        self.inner = torch.nn.Conv1d(channels, hidden, k, padding=k // 2).double()
        self.outer = torch.nn.Conv1d(hidden, channels, k, padding=k // 2).double()
        with torch.no_grad():                         # a seeded start (torch's own init draws globally)
            for conv in (self.inner, self.outer):
                bound = 1 / math.sqrt(conv.in_channels * k)
                conv.weight.copy_((torch.rand(conv.weight.shape, generator=generator, dtype=torch.float64) * 2 - 1)
                                  * bound)
                conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True).clamp_min(1e-6) if x.shape[-1] > 1 else torch.ones_like(mean)
        return mean + std * self.outer(torch.tanh(self.inner((x - mean) / std)))


def references(ctx, target, negatives) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The series the counterfactuals are pulled towards: a pool `[N,C,T]`, which of them each
    example may use (`[B,N]` bool), and where they came from: "negatives", "batch" (the other
    examples the model puts in a class other than the one explained) or "flat" (the example's
    channel means, for an example with no series of another class at hand)."""
    x = ctx.x.detach().double()
    B, C, T = x.shape
    if negatives is not None:
        if not isinstance(negatives, torch.Tensor) or not negatives.is_floating_point():
            got = negatives.dtype if isinstance(negatives, torch.Tensor) else type(negatives).__name__
            raise SaliencyError(f"negatives must be a float tensor [N,C,T] of series of other classes, got {got}")
        neg = negatives.detach()
        if neg.dim() == 2:
            neg = neg.unsqueeze(0)
        if neg.dim() != 3 or tuple(neg.shape[1:]) != (C, T) or neg.shape[0] == 0:
            raise SaliencyError(f"negatives must be series shaped [N,{C},{T}] like the input, "
                                f"got {tuple(negatives.shape)}")
        if not torch.isfinite(neg).all():
            raise SaliencyError("negatives contain NaN or infinite values")
        neg = neg.to(x.device, torch.float64)
        return neg, torch.ones(B, neg.shape[0], dtype=torch.bool, device=x.device), "negatives"
    allowed = torch.zeros(B, B, dtype=torch.bool)
    logits = ctx.logits()
    if isinstance(logits, torch.Tensor) and logits.dim() == 2:
        pred = logits.argmax(1).cpu()
        for i in range(min(B, len(target.pos))):
            try:
                explained = torch.as_tensor(target.pos[i].indices).flatten().cpu()
            except (AttributeError, TypeError, ValueError):   # a target that is not a class
                continue
            allowed[i] = ~torch.isin(pred, explained)
    allowed.fill_diagonal_(False)
    alone = ~allowed.any(1)                             # these pull towards their own flat series
    pool = torch.cat([x, x.mean(-1, keepdim=True).expand(B, C, T)])
    allowed = torch.cat([allowed, torch.diag(alone)], 1).to(x.device)
    return pool, allowed, "flat" if alone.all() else "batch"


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n,m] root mean squared differences of series a [n,C,T] and b [m,C,T] (never exactly 0,
    so the square root has a gradient everywhere)."""
    a, b = a.flatten(1), b.flatten(1)
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2 * a @ b.T
    return (sq.clamp_min(0) / a.shape[1] + 1e-12).sqrt()


def triplet(xr: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, allowed: torch.Tensor, margin: float,
            scale: float) -> torch.Tensor:
    """Per example, relu(distance to the nearest reference - distance to the example + margin x the
    example's distance to its nearest reference), with distances the root mean squared differences
    over channels and steps divided by `scale` and the references the `allowed` series of `pool`.
    By the triangle inequality the first difference is at least minus that distance, so a margin
    below 1 is met between the example and the reference (the loss is 0 once x_r is nearer the
    reference by that share of the way) and the counterfactual is never pushed past the reference
    (an inverted, larger series would win against a margin it cannot otherwise meet). Added: the
    distance to the nearest reference itself, a pull that keeps x_r among the data (the hinge is
    flat once met, and the network's weights drifted there to series ten times the data's size,
    which the model scored far above x)."""
    far = torch.tensor(float("inf"), dtype=xr.dtype, device=xr.device)
    near = torch.where(allowed, _distances(xr, pool), far).min(1).values / scale
    gap = torch.where(allowed, _distances(x, pool), far).min(1).values / scale
    away = ((xr - x) ** 2).mean((1, 2)).add(1e-12).sqrt() / scale
    return torch.relu(near - away + margin * gap) + near


@register
class ContraLSP(Method):
    layouts = ("BCT",)
    name = "contralsp"
    aliases = ("contra_lsp",)
    family = "perturbation"
    cost = "300F+300B"
    signed = False
    randomized = True
    description = ("Contrastive and locally sparse perturbations (Liu et al. 2024): a mask over channels and steps "
                   "learned to keep the score, x_m = m x + (1 - m) x_r, with x_r a counterfactual series from a "
                   "small network trained by a triplet loss (near series of other classes, away from x), "
                   "stochastic gates with an l0-like Gaussian-CDF penalty, and a sigmoid smoothing of learned "
                   "temperature; seeded. Maps: the mask reduced over channels; attributions: the mask [B,C,T].")
    defaults = {"steps": 300, "lr": 0.1, "l0": 1.0, "contrast": 1.0, "margin": 0.5, "sigma": 0.5, "window": 5,
                "hidden": 16, "negatives": None, "reduce": "max_abs"}

    def run(self, ctx, target, layer, steps=300, lr=0.1, l0=1.0, contrast=1.0, margin=0.5, sigma=0.5, window=5,
            hidden=16, negatives=None, reduce="max_abs"):
        from ..engine import Progress, gradient_pass, reduce_channels

        steps, window = positive_int(steps, "steps"), positive_int(window, "window")
        hidden = positive_int(hidden, "hidden")
        lr, sigma = positive_float(lr, "lr"), positive_float(sigma, "sigma")
        l0, contrast = positive_float(l0, "l0", allow_zero=True), positive_float(contrast, "contrast", allow_zero=True)
        margin = positive_float(margin, "margin", allow_zero=True)
        if margin > 1:
            raise SaliencyError(f"margin must be at most 1 (a share of the distance from the example to its "
                                f"references: no series is nearer the reference than the example by more), got {margin}")
        if reduce not in REDUCTIONS:
            raise SaliencyError(f"unknown channel reduction {reduce!r}; use one of {', '.join(REDUCTIONS)}")
        x = ctx.x.detach()
        B, C, T = x.shape
        if window > T:
            raise SaliencyError(f"window {window} is longer than the series ({T} steps): give a smaller window")
        pool, allowed, source = references(ctx, target, negatives)
        xd = x.double()
        spread = float(xd.std()) if xd.numel() > 1 else 1.0
        spread = spread if spread > 0 else 1.0
        g = torch.Generator(device="cpu").manual_seed(int(ctx.seed or 0))
        net = Counterfactual(C, hidden, window, g).to(x.device)
        mu = torch.full((B, C, T), 0.5, dtype=torch.float64, device=x.device, requires_grad=True)
        log_tau = torch.full((B, C, 1), math.log(4.0), dtype=torch.float64, device=x.device, requires_grad=True)
        opt = torch.optim.Adam([mu, log_tau, *net.parameters()], lr=lr)
        clean = target.score(ctx.logits()).detach().double()
        scale = clean.abs().clamp_min(1e-6).view(B, 1, 1)
        normal = torch.distributions.Normal(0.0, 1.0)
        kept = None
        with Progress(steps, "contralsp", enabled=ctx.progress, unit="step") as bar:
            for _ in range(steps):
                eps = (sigma * torch.randn(B, C, T, generator=g, dtype=torch.float64)).to(x.device)
                with torch.enable_grad():    # the method's own graph, also when the caller runs under no_grad
                    m = smooth_gates((mu + eps).clamp(0, 1), log_tau.exp(), window)
                    xr = net(xd)
                    inp = m * xd + (1 - m) * xr.detach()
                res = gradient_pass(ctx.subject, inp.detach().to(x.dtype), target, counter=ctx.counter)
                kept = res.scores.double() / scale.view(B)
                # the score lost, relu(s(x) - s(x_m))/|s(x)|: nothing is gained by exceeding the clean score
                # (a mix of x and x_r can raise a logit past it; that would reward keeping x_r, not x)
                short = (res.scores.double() < clean).double().view(B, 1, 1)
                opt.zero_grad()
                with torch.enable_grad():
                    # linearised at x_m: its gradient through m is the model's input gradient times (x - x_r)
                    keep = -(short * res.input_grad.double() * inp / scale).sum()
                    sparse = normal.cdf(mu / sigma).mean((1, 2)).sum()
                    loss = keep + l0 * sparse + contrast * triplet(xr, xd, pool, allowed, margin, spread).sum()
                    loss.backward()
                opt.step()
                bar.step()
        with torch.no_grad():
            mask = smooth_gates(mu.detach().clamp(0, 1), log_tau.detach().exp(), window)
            far = triplet(net(xd), xd, pool, allowed, margin, spread)
        attr = mask.to(x.dtype)
        return {"maps": reduce_channels(attr, reduce, "BCT"), "attributions": attr, "signed": False,
                "extras": {"steps": steps, "l0": l0, "contrast": contrast, "margin": margin, "sigma": sigma,
                           "window": window, "references": source,
                           "temperature": log_tau.detach().exp().flatten(1).tolist(),
                           "kept_score": kept.tolist(), "triplet_loss": far.tolist()}}


__all__ = ["ContraLSP", "Counterfactual", "smooth_gates", "references", "triplet"]
