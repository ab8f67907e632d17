"""Cross-domain integrated gradients for series (`layout="BCT"`): IG whose features are the
series' frequency components, or its short-time Fourier coefficients, instead of its time steps.

A domain is an invertible linear map of the series, `X = T(x)` with `x = T⁻¹(X)` (the real FFT
`rfft`/`irfft`, or the STFT with a Hann window, `stft`/`istft`, which invert each other exactly for
a hop of at most half the window). IG in that domain, from the baseline's transform, follows the
straight path `X' + a (X - X')`; since `T⁻¹` is linear that path is the same straight path in time,
so the gradient averaged along it is the time-domain one, `ḡ` (`paths.path_gradient`), and the
domain's average gradient is its pull-back through `T⁻¹`: `ḡ_X = (∂T⁻¹/∂X)ᵀ ḡ` (one autograd
vector-Jacobian product). A complex coefficient is two real features, its real and imaginary
parts; a bin's attribution is `Re(ΔX)·Re(ḡ_X) + Im(ΔX)·Im(ḡ_X)`. The attributions of all bins add
up to those of all time steps, `Σ_k A_k = Σ_t Δx_t ḡ_t = s(x) − s(x')` (IG's completeness), which
the result reports as `extras["domain_sum_error"]`.

`Explanation.maps` is the time-domain IG map `[B,T]` (every method's maps are at input
resolution); the domain's attributions are `Explanation.raw`: `[B,C,F]` per frequency bin, or
`[B,C,F,frames]` per bin and frame; `extras["frequencies"]` in cycles per step.
"""
from __future__ import annotations

import math

import torch

from ..errors import SaliencyError, positive_int
from .base import Method, register
from .gradient import _check_reduce, _maps, make_baseline
from .paths import path_gradient, quadrature

DOMAINS = ("time", "frequency", "time_frequency")


def _stft_args(T: int, n_fft, hop):
    n_fft = positive_int(n_fft, "n_fft") if n_fft is not None else max(4, min(64, T // 4))
    hop = positive_int(hop, "hop") if hop is not None else max(1, n_fft // 4)
    if n_fft > T:
        raise SaliencyError(f"n_fft {n_fft} is longer than the series ({T} steps): give a shorter window")
    if hop > n_fft // 2:
        raise SaliencyError(f"hop {hop} is more than half of n_fft {n_fft}: the STFT would not invert exactly")
    return n_fft, hop


def to_domain(delta: torch.Tensor, domain: str, n_fft: int | None = None, hop: int | None = None):
    """(the domain's coefficients of `delta` [N,C,T] as a real tensor [..., 2], the inverse map
    from such a tensor back to [N,C,T])."""
    N, C, T = delta.shape
    if domain == "frequency":
        coef = torch.view_as_real(torch.fft.rfft(delta, dim=-1))                       # [N,C,F,2]

        def inverse(r):
            return torch.fft.irfft(torch.view_as_complex(r.contiguous()), n=T, dim=-1)
        return coef, inverse
    n_fft, hop = _stft_args(T, n_fft, hop)
    window = torch.hann_window(n_fft, dtype=delta.dtype, device=delta.device)
    flat = delta.reshape(N * C, T)
    coef = torch.view_as_real(torch.stft(flat, n_fft, hop, window=window, center=True, return_complex=True))

    def inverse(r):
        z = torch.view_as_complex(r.reshape(N * C, *r.shape[2:]).contiguous())
        return torch.istft(z, n_fft, hop, window=window, center=True, length=T).reshape(N, C, T)
    return coef.reshape(N, C, *coef.shape[1:]), inverse


def domain_attributions(delta: torch.Tensor, gbar: torch.Tensor, domain: str, n_fft=None, hop=None) -> torch.Tensor:
    """Per coefficient of the domain, Re(ΔX)·Re(ḡ_X) + Im(ΔX)·Im(ḡ_X), with ḡ_X the pull-back of
    the time-domain average gradient `gbar` through the inverse transform (see the module doc)."""
    coef, inverse = to_domain(delta, domain, n_fft, hop)
    leaf = coef.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        back = inverse(leaf)
        if not torch.allclose(back, delta, atol=1e-5 * float(delta.abs().max().clamp_min(1e-12)), rtol=0):
            raise SaliencyError(f"the {domain} transform does not invert this series exactly; use domain='frequency'")
        (pulled,) = torch.autograd.grad(back, leaf, grad_outputs=gbar.to(back.dtype))
    return (coef * pulled).sum(-1)


@register
class CrossDomainIG(Method):
    layouts = ("BCT",)
    name = "cross_domain_ig"
    aliases = ("frequency_ig", "integrated_gradients_frequency")
    family = "gradient"
    cost = "50F+50B"
    signed = True
    description = ("Integrated gradients of a series in the time, frequency (real FFT) or time-frequency "
                   "(STFT) domain: maps are the time-domain IG map, `raw` the domain's attributions "
                   "([B,C,F] or [B,C,F,frames]), which add up to the same score difference.")
    defaults = {"domain": "frequency", "steps": 50, "baseline": "black", "rule": "gausslegendre", "reduce": "sum",
                "n_fft": None, "hop": None, "batch_size": None}

    def run(self, ctx, target, layer, domain="frequency", steps=50, baseline="black", rule="gausslegendre",
            reduce="sum", n_fft=None, hop=None, batch_size=None):
        _check_reduce(reduce)
        if domain not in DOMAINS:
            raise SaliencyError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
        steps = positive_int(steps, "steps")
        quadrature(steps, rule)
        x = ctx.x.detach()
        if domain == "time_frequency":
            _stft_args(x.shape[-1], n_fft, hop)          # a bad window is refused before any pass
        base = make_baseline(ctx.subject, x, baseline, ctx.seed)
        gbar = path_gradient(ctx, target, x, base, steps, rule, batch_size)          # float64 [B,C,T]
        delta = (x - base).double()
        attr = delta * gbar
        extras = {"domain": domain, "steps": steps}
        if domain == "time":
            raw = attr
        else:
            raw = domain_attributions(delta, gbar, domain, n_fft, hop)
            T = x.shape[-1]
            extras["frequencies"] = (torch.fft.rfftfreq(T if domain == "frequency" else _stft_args(T, n_fft, hop)[0])
                                     .tolist())
            if domain == "time_frequency":
                extras["n_fft"], extras["hop"] = _stft_args(T, n_fft, hop)
        extras["domain_sum_error"] = (raw.reshape(x.shape[0], -1).sum(1) - attr.reshape(x.shape[0], -1).sum(1)).tolist()
        out = _maps(attr.to(x.dtype), reduce, ctx.layout)
        out["raw"] = raw.to(x.dtype)
        out["extras"] = extras
        return out


def blur_series(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur of every channel of a [B,C,T] series along time: the perturbation
    substrates' blur (radius ceil(3 sigma), replicate padding) as one band matrix of `filters`."""
    from ..filters import band, gaussian_kernels

    k, _ = gaussian_kernels(float(sigma), max(1, int(math.ceil(3 * sigma))), x.dtype, x.device)
    return x @ band(k, x.shape[-1], "replicate").T


@register
class LearnedMask(Method):
    layouts = ("BCT",)
    name = "learned_mask"
    aliases = ("dynamask",)
    family = "perturbation"
    cost = "300F+300B"
    signed = False
    randomized = True
    description = ("A mask over time steps learned to keep the score (Dynamask-style, Crabbé & van der Schaar "
                   "2021): x_m = m x + (1 - m) blur(x); minimise -s(x_m) + l1 mean(m) + tv mean|m_t+1 - m_t| "
                   "with Adam over a sigmoid-parametrised m, seeded start; the map is m. contrast=True keeps "
                   "the score with m and removes it with 1 - m (the contrastive variant).")
    defaults = {"steps": 300, "lr": 0.1, "l1": 1.0, "tv": 0.5, "sigma": 4.0, "contrast": False}

    def run(self, ctx, target, layer, steps=300, lr=0.1, l1=1.0, tv=0.5, sigma=4.0, contrast=False):
        from ..engine import gradient_pass
        from ..errors import positive_float

        steps = positive_int(steps, "steps")
        lr, sigma = positive_float(lr, "lr"), positive_float(sigma, "sigma")
        if l1 < 0 or tv < 0:
            raise SaliencyError(f"l1 and tv must be >= 0, got l1={l1}, tv={tv}")
        x = ctx.x.detach()
        B, C, T = x.shape
        base = blur_series(x, sigma)
        g = torch.Generator(device="cpu").manual_seed(int(ctx.seed or 0))
        logit = (0.1 * torch.randn(B, 1, T, generator=g, dtype=torch.float64)).to(x.device).requires_grad_(True)
        opt = torch.optim.Adam([logit], lr=lr)
        rows = torch.arange(B, device=x.device).repeat(2 if contrast else 1)
        scale = target.score(ctx.logits()).detach().abs().clamp_min(1e-6).double().view(B, 1, 1)
        for _ in range(steps):
            with torch.enable_grad():      # the mask's own graph, also when the caller runs under no_grad
                m = torch.sigmoid(logit)
            inp = (m * x + (1 - m) * base).to(x.dtype).detach()
            if contrast:     # the kept and the removed series in one pass: rows 0..B-1, then B..2B-1
                inp = torch.cat([inp, ((1 - m) * x + m * base).to(x.dtype).detach()])
            g = gradient_pass(ctx.subject, inp, target, rows=rows, counter=ctx.counter).input_grad.double()
            # d s(x_m) / d m = sum over channels of (x - base) * d s / d x_m; with the contrast, the
            # complement's score falls as m grows there too: d s(x_(1-m)) / d m = -(x - base) * d s / d x_(1-m)
            gs = g[:B] + g[B:] if contrast else g
            dm = ((x - base).double() * gs).sum(1, keepdim=True) / scale
            opt.zero_grad()
            with torch.enable_grad():
                penalty = l1 * m.mean() + tv * (m[..., 1:] - m[..., :-1]).abs().mean()
                (-(dm.detach() * m).sum() + penalty * B).backward()
            opt.step()
        mask = torch.sigmoid(logit).detach()[:, 0].to(x.dtype)
        return {"maps": mask, "signed": False, "extras": {"steps": steps, "l1": l1, "tv": tv, "sigma": sigma,
                                                         "contrast": bool(contrast)}}


__all__ = ["CrossDomainIG", "LearnedMask", "blur_series", "domain_attributions", "to_domain", "DOMAINS"]
