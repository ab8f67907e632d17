"""Path integrals of gradients, one file for the family:

- `integrated_gradients` Integrated Gradients (Sundararajan et al. 2017), with the quadrature rules
              every path method here uses (`quadrature`).
- `blur_ig`   Blur IG: integrated gradients along the Gaussian scale-space path (Xu et al. 2020).
- `guided_ig` Guided IG: adaptive path that moves low-|gradient| features first (Kapishnikov et al. 2021).
- `iia`       Iterated Integrated Attributions (Barkan et al. 2023): iterated integration over the
              input path and, for each input step, over a path of the internal representation.
- `dix`       Deep Integrated Explanations: integration of a layer representation with its
              gradients (experimental: the definition is not confirmed against the paper).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..engine import auto_batch, forward_logits, gradient_pass, graph_from_layer_ok, spans, upsample
from ..errors import SaliencyError, positive_int
from ..hooks import this_thread_only
from .base import ANY_LAYOUT, Method, register
from .cam import as_grid, map_size, resolve_layers
from ..filters import gaussian_blur, gaussian_kernels, separable, separable_axes
from .gradient import _check_reduce, _maps, make_baseline


# =========================================================================== IG
def quadrature(steps: int, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes alpha_k in [0,1] and weights w_k of the path integral."""
    steps = positive_int(steps, "steps")
    if rule == "gausslegendre":
        t, w = np.polynomial.legendre.leggauss(steps)
        return torch.tensor((t + 1) / 2), torch.tensor(w / 2)
    k = torch.arange(steps, dtype=torch.float64)
    if rule == "riemann_left":
        return k / steps, torch.full((steps,), 1 / steps, dtype=torch.float64)
    if rule == "riemann_right":
        return (k + 1) / steps, torch.full((steps,), 1 / steps, dtype=torch.float64)
    if rule == "riemann_middle":
        return (k + 0.5) / steps, torch.full((steps,), 1 / steps, dtype=torch.float64)
    if rule == "riemann_trapezoid":
        if steps < 2:
            raise SaliencyError("the trapezoid rule needs steps >= 2")
        a = k / (steps - 1)
        w = torch.full((steps,), 1 / (steps - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (steps - 1)
        return a, w
    raise SaliencyError(f"unknown integration rule {rule!r}; use gausslegendre or riemann_left/right/middle/trapezoid")


def integrated_gradients(ctx, target, x: torch.Tensor, baseline: torch.Tensor, steps: int, rule: str,
                         batch_size=None) -> torch.Tensor:
    """(x - x') * sum_k w_k grad s(x' + a_k (x - x')), all interpolants batched (step-major rows)."""
    total = path_gradient(ctx, target, x, baseline, steps, rule, batch_size)
    return ((x - baseline).double() * total).to(x.dtype)


def path_gradient(ctx, target, x: torch.Tensor, baseline: torch.Tensor, steps: int, rule: str,
                  batch_size=None) -> torch.Tensor:
    """sum_k w_k grad s(x' + a_k (x - x')) in float64: the gradient averaged along the straight
    path, which IG multiplies by (x - x') and the cross-domain IG maps to another domain."""
    steps = positive_int(steps, "steps")
    alphas, weights = quadrature(steps, rule)
    alphas = alphas.to(x.device, x.dtype)
    weights = weights.to(x.device, torch.float64)
    b = x.shape[0]
    diff = x - baseline
    rows = torch.arange(b, device=x.device).repeat(steps)
    total = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    bs = batch_size or ctx.batch_size or auto_batch(ctx.subject, ctx.x.shape, grad=True)
    # interpolants are made chunk by chunk: [steps*B] images never all in memory at once
    n = steps * b
    for start, stop in spans(n, bs):
        idx = torch.arange(start, stop, device=x.device)
        a = alphas[idx // b].view(-1, *[1] * (x.dim() - 1))
        ex = idx % b
        inputs = baseline[ex] + a * diff[ex]
        g = gradient_pass(ctx.subject, inputs, target, rows=rows[idx], counter=ctx.counter).input_grad
        total.index_add_(0, ex, g.double() * weights[idx // b].view(-1, *[1] * (x.dim() - 1)))
    return total


@register
class IntegratedGradients(Method):
    layouts = ANY_LAYOUT
    name = "integrated_gradients"
    aliases = ("ig",)
    family = "gradient"
    cost = "50F+50B"
    signed = True
    description = ("Path integral of gradients from a baseline (Sundararajan et al. 2017); Gauss-Legendre "
                   "quadrature; a list of baselines averages their maps; "
                   "extras['completeness_error'] = sum(attr) - (s(x) - mean s(baseline)).")
    defaults = {"steps": 50, "baseline": "black", "rule": "gausslegendre", "reduce": "sum", "batch_size": None}

    def run(self, ctx, target, layer, steps=50, baseline="black", rule="gausslegendre", reduce="sum",
            batch_size=None):
        _check_reduce(reduce)
        steps = positive_int(steps, "steps")
        quadrature(steps, rule)  # checks the rule before any pass
        x = ctx.x.detach()
        # several baselines (a list, e.g. ["black", "white"]) => the mean of their IG maps
        specs = list(baseline) if isinstance(baseline, list) else [baseline]
        if not specs:
            raise SaliencyError("baseline list is empty")
        bases = [make_baseline(ctx.subject, x, spec, ctx.seed) for spec in specs]
        attr = sum(integrated_gradients(ctx, target, x, base, steps, rule, batch_size).double()
                   for base in bases) / len(bases)
        attr = attr.to(x.dtype)
        # completeness check: sum(attr) vs s(x) - mean s(baseline). The shared clean logits are
        # float32; a float64 input is re-scored in its own precision so the check can reach 1e-12.
        if x.dtype == torch.float32:
            s_x = target.score(ctx.logits()).double()
            s_b = [target.score(forward_logits(ctx.subject, base, batch_size, ctx.counter)).double() for base in bases]
        else:
            s_x = target.score(_native_logits(ctx, x, batch_size)).double()
            s_b = [target.score(_native_logits(ctx, base, batch_size)).double() for base in bases]
        diff = s_x - sum(s_b) / len(s_b)
        err = attr.double().reshape(x.shape[0], -1).sum(1) - diff
        rel = err.abs() / diff.abs().clamp_min(1e-12)
        return {**_maps(attr, reduce, ctx.layout), "extras": {"completeness_error": err.tolist(),
                                                  "relative_completeness_error": rel.tolist(),
                                                  "score_difference": diff.tolist()}}


def _native_logits(ctx, x: torch.Tensor, batch_size=None) -> torch.Tensor:
    """Logits in the input's own floating-point precision (forward only, counted)."""
    bs = batch_size or ctx.batch_size or auto_batch(ctx.subject, ctx.x.shape, grad=True)
    outs = []
    with torch.inference_mode():
        for start, stop in spans(x.shape[0], bs):
            chunk = x[start:stop]
            outs.append(ctx.subject.forward(chunk))
            ctx.counter.add(forward=chunk.shape[0])
    return torch.cat(outs)


# --------------------------------------------------------------------------- modified backprop
def _completeness(ctx, target, attr, start, batch_size):
    """sum(attr) - (s(x) - s(start)): one extra forward of the path's start point."""
    s_x = target.score(ctx.logits())
    s_0 = target.score(forward_logits(ctx.subject, start, batch_size, ctx.counter))
    err = attr.reshape(attr.shape[0], -1).sum(1).double() - (s_x - s_0).double()
    return {"completeness_error": err.tolist(), "score_difference": (s_x - s_0).tolist()}


# =========================================================================== Blur IG
def blur_sigmas(max_sigma: float, steps: int, sqrt: bool = False) -> list[float]:
    """sigma_i = i * max_sigma / steps (i = 0..steps); sqrt=True uses sqrt(i * max_sigma / steps)."""
    sig = [i * max_sigma / steps for i in range(steps + 1)]
    return [math.sqrt(s) for s in sig] if sqrt else sig


def blur_derivative(x: torch.Tensor, sigma: float, grad_step: float | None, axes: int = 2) -> torch.Tensor:
    """d(G_sigma * x)/d sigma along the last `axes` axes (2: an image; 1: a series; 3: a volume):
    forward difference with step `grad_step`, or exact (None).

    Both blurs of the difference use the kernel radius of the larger sigma, so the difference
    never includes the jump of the truncation radius ceil(4 sigma) (a 1/grad_step spike).
    The exact form differentiates the normalised truncated kernel: G = k (x) k, dG = k' (x) k + k (x) k'
    (one term per axis).
    """
    if grad_step is None:
        if sigma <= 0:
            return torch.zeros_like(x)
        k, dk = gaussian_kernels(sigma, int(math.ceil(4 * sigma)), x.dtype, x.device)
        if axes == 2:
            return separable(x, dk, k) + separable(x, k, dk)
        return sum(separable_axes(x, [dk if a == i else k for a in range(axes)]) for i in range(axes))
    radius = int(math.ceil(4 * (sigma + grad_step)))
    k2, _ = gaussian_kernels(sigma + grad_step, radius, x.dtype, x.device)
    blurred2 = separable_axes(x, (k2,) * axes)
    if sigma <= 0:
        return (blurred2 - x) / grad_step
    k1, _ = gaussian_kernels(sigma, radius, x.dtype, x.device)
    return (blurred2 - separable_axes(x, (k1,) * axes)) / grad_step


#: the trailing axes Blur IG blurs along, per layout: the image's H, W; the series' T; the volume's
#: D, H, W; a clip's H, W (each frame blurred as an image, frames not mixed in time)
BLUR_AXES = {"BCHW": 2, "BCT": 1, "BCDHW": 3, "BTCHW": 2}


def blur_integrated_gradients(ctx, target, x: torch.Tensor, max_sigma: float, steps: int,
                              grad_step: float | None, sqrt: bool = False, batch_size=None) -> torch.Tensor:
    """attr = - sum_i (sigma_{i+1} - sigma_i) * dgamma/dsigma(sigma_i) * grad s(G_{sigma_i} x).

    dgamma/dsigma is the forward difference (G_{sigma+delta} x - G_sigma x) / delta with
    delta = grad_step, or the exact derivative when grad_step is None. Each step uses its own
    Delta sigma (also when `sqrt=True`). Rows are step-major; steps are chunked so that at most
    `batch_size` rows are in memory. The blur runs along the axes of the call's layout (`BLUR_AXES`).
    """
    sig = blur_sigmas(max_sigma, steps, sqrt)
    n = BLUR_AXES[ctx.layout]
    b = x.shape[0]
    bs = batch_size or ctx.batch_size or auto_batch(ctx.subject, ctx.x.shape, grad=True)
    per_chunk = max(1, bs // b)
    total = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    rows_one = torch.arange(b, device=x.device)
    for s0 in range(0, steps, per_chunk):
        idx = list(range(s0, min(steps, s0 + per_chunk)))
        pts = torch.cat([gaussian_blur(x, sig[i], axes=n) for i in idx])
        deriv = torch.cat([blur_derivative(x, sig[i], grad_step, n) * (sig[i + 1] - sig[i]) for i in idx])
        g = gradient_pass(ctx.subject, pts, target, rows=rows_one.repeat(len(idx)), counter=ctx.counter).input_grad
        total -= (g.double() * deriv.double()).view(len(idx), b, *x.shape[1:]).sum(0)
    return total.to(x.dtype)


@register
class BlurIG(Method):
    name = "blur_ig"
    aliases = ("blur_integrated_gradients",)
    family = "gradient"
    cost = "100F+100B"
    signed = True
    description = ("Integrated gradients along the Gaussian blur path from sigma=max_sigma to the image "
                   "(Xu et al. 2020); grad_step=None uses the exact d(blur)/d(sigma); "
                   "extras['completeness_error'] = sum(attr) - (s(x) - s(blurred x)). A series is blurred "
                   "along time, a volume along depth, height and width, a clip frame by frame (sigma in samples).")
    layouts = tuple(BLUR_AXES)
    not_for = {"BF": "a feature vector has no axes to blur along"}
    defaults = {"max_sigma": 50.0, "steps": 100, "grad_step": 0.01, "sqrt": False, "reduce": "sum",
                "batch_size": None}

    def run(self, ctx, target, layer, max_sigma=50.0, steps=100, grad_step=0.01, sqrt=False, reduce="sum",
            batch_size=None):
        _check_reduce(reduce)
        positive_int(steps, "steps")
        if not isinstance(max_sigma, (int, float)) or max_sigma < 0:
            raise SaliencyError(f"max_sigma must be a number >= 0, got {max_sigma!r}")
        if grad_step is not None and (not isinstance(grad_step, (int, float)) or grad_step <= 0):
            raise SaliencyError(f"grad_step must be > 0 (or None: exact derivative), got {grad_step!r}")
        x = ctx.x.detach()
        if max_sigma == 0:
            attr = torch.zeros_like(x)
            return {**_maps(attr, reduce, ctx.layout), "extras": {"completeness_error": [0.0] * x.shape[0]}}
        attr = blur_integrated_gradients(ctx, target, x, float(max_sigma), steps,
                                         None if grad_step is None else float(grad_step), sqrt,
                                         batch_size)
        extras = _completeness(ctx, target, attr, gaussian_blur(x, float(max_sigma), axes=BLUR_AXES[ctx.layout]),
                               batch_size)
        return {**_maps(attr, reduce, ctx.layout), "extras": extras}


# =========================================================================== Guided IG
_EPS = 1e-9


def _guided_ig_step(x_cur, x_in, x_base, grad, alpha, max_dist, l1_total, fraction):
    """One Guided IG step for one example (flat float64 tensors). Returns the new point and the
    attribution gained, sum of (x_new - x_old) * grad over the sub-moves of this step."""
    diff = x_in - x_base
    a_min, a_max = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
    lo = x_base + a_min * diff
    hi = x_base + a_max * diff
    l1_target = l1_total * (1.0 - alpha)
    attr = torch.zeros_like(x_cur)
    absg = grad.abs()
    moving = diff != 0
    while True:
        x_old = x_cur.clone()
        # features lagging behind the band are pulled to its lower edge
        a_cur = torch.where(moving, (x_cur - x_base) / torch.where(moving, diff, torch.ones_like(diff)),
                            torch.full_like(x_cur, a_max))
        lag = a_cur < a_min
        x_cur = torch.where(lag, lo, x_cur)
        l1_cur = (x_cur - x_in).abs().sum().item()
        if math.isclose(l1_target, l1_cur, rel_tol=_EPS, abs_tol=_EPS):
            attr += (x_cur - x_old) * grad
            break
        # among features not yet at the upper edge, select those with the smallest |gradient|
        free = x_cur != hi
        if not bool(free.any()):
            attr += (x_cur - x_old) * grad
            break
        g = torch.where(free, absg, torch.full_like(absg, math.inf))
        threshold = torch.quantile(g, fraction, interpolation="lower")
        sel = (g <= threshold) & free
        l1_sel = ((x_cur - hi).abs() * sel).sum().item()
        gamma = (l1_cur - l1_target) / l1_sel if l1_sel > 0 else math.inf
        if gamma > 1.0:
            x_cur = torch.where(sel, hi, x_cur)
        else:
            x_cur = torch.where(sel, x_cur + gamma * (hi - x_cur), x_cur)
        attr += (x_cur - x_old) * grad
        if gamma <= 1.0 or l1_sel == 0:
            break
    return x_cur, attr


def guided_integrated_gradients(ctx, target, x: torch.Tensor, baseline: torch.Tensor, steps: int,
                                fraction: float, max_dist: float) -> torch.Tensor:
    """The adaptive path of Guided IG in float64; one gradient of the whole batch per step."""
    b = x.shape[0]
    x_in = x.detach().double().reshape(b, -1)
    x_base = baseline.detach().double().reshape(b, -1)
    x_cur = x_base.clone()
    l1_total = (x_in - x_base).abs().sum(1)
    attr = torch.zeros_like(x_in)
    for step in range(steps):
        g = gradient_pass(ctx.subject, x_cur.view_as(x).to(x.dtype), target, counter=ctx.counter).input_grad
        g = g.double().reshape(b, -1)
        alpha = (step + 1) / steps
        for i in range(b):
            x_cur[i], a = _guided_ig_step(x_cur[i], x_in[i], x_base[i], g[i], alpha, max_dist,
                                          l1_total[i].item(), fraction)
            attr[i] += a
    return attr.view(x.shape).to(x.dtype)


@register
class GuidedIG(Method):
    name = "guided_ig"
    aliases = ("guided_integrated_gradients",)
    family = "gradient"
    cost = "200F+200B"
    signed = True
    description = ("Guided IG (Kapishnikov et al. 2021): path from the baseline that moves the features with "
                   "the smallest |gradient| first, within max_dist of the straight line; max_dist=0 is IG "
                   "(left Riemann rule). Sequential along the path, batched across images. Any layout: the "
                   "path moves features, whatever axes they sit on.")
    layouts = ANY_LAYOUT
    defaults = {"steps": 200, "fraction": 0.25, "max_dist": 0.02, "baseline": "black", "reduce": "sum",
                "batch_size": None}

    def run(self, ctx, target, layer, steps=200, fraction=0.25, max_dist=0.02, baseline="black", reduce="sum",
            batch_size=None):
        _check_reduce(reduce)
        positive_int(steps, "steps")
        if not 0 < fraction <= 1:
            raise SaliencyError(f"fraction must be in (0, 1], got {fraction!r}")
        if not 0 <= max_dist <= 1:
            raise SaliencyError(f"max_dist must be in [0, 1], got {max_dist!r}")
        x = ctx.x.detach()
        base = make_baseline(ctx.subject, x, baseline, ctx.seed)
        attr = guided_integrated_gradients(ctx, target, x, base, steps, float(fraction), float(max_dist))
        return {**_maps(attr, reduce, ctx.layout), "extras": _completeness(ctx, target, attr, base, batch_size)}


# =========================================================================== IIA / DIX
class _ReplaceOutput:
    """Forward hook replacing the output `a` of the module's `call`-th call in a forward pass by
    `base + beta * (a - base)` per row, as a leaf tensor whose gradient is then taken. `base` is
    zero ("zero") or the per-channel spatial minimum of `a` ("min"; over a token output's tokens,
    over a series', a volume's or a clip's layer axes when `along_axes`). With `frames` (a clip of
    that many frames), a frame-by-frame layer's `[rows*T,C,h,w]` output takes each row's beta on
    all its frames and its minimum over all of them."""

    def __init__(self, module, beta: torch.Tensor, base: str, call: int, along_axes: bool = False,
                 frames: int | None = None):
        self.module, self.beta, self.base, self.call = module, beta, base, call
        self.along_axes, self.frames = along_axes, frames
        self.calls = 0
        self.tensor: torch.Tensor | None = None

    def hook(self, _mod, _inp, out):
        self.calls += 1
        if self.calls - 1 != self.call:
            return None
        if not isinstance(out, torch.Tensor):
            raise SaliencyError("the chosen layer does not output a single tensor")
        a = out.detach()
        rows = self.beta.shape[0]
        folded = self.frames is not None and a.dim() == 4 and a.shape[0] == rows * self.frames
        if self.base == "zero":
            base = torch.zeros_like(a)
        elif folded:   # each row's channel minimum over its frames' positions
            per_row = a.reshape(rows, self.frames, *a.shape[1:]).amin(dim=(1, 3, 4), keepdim=True)
            base = per_row.expand(rows, self.frames, -1, 1, 1).reshape(rows * self.frames, -1, 1, 1)
        else:
            dims = tuple(range(2, a.dim())) if a.dim() == 4 or self.along_axes else (1,)
            base = a.amin(dim=dims, keepdim=True)
        beta = self.beta.repeat_interleave(self.frames) if folded else self.beta
        beta = beta.to(a.device, a.dtype).view(-1, *([1] * (a.dim() - 1)))
        self.tensor = (base + beta * (a - base)).requires_grad_(True)
        torch.set_grad_enabled(True)   # the graph starts here (this thread; the caller's no_grad restores it)
        return self.tensor

    def __enter__(self):
        self.handle = self.module.register_forward_hook(this_thread_only(self.hook))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _count_calls(ctx, name: str) -> int:
    """How many times layer `name` runs in one forward (one probe row, counted as a forward)."""
    with ctx.subject.capture([name]) as cap, torch.no_grad():
        ctx.subject.forward(ctx.x[:1])
    ctx.counter.add(forward=1)
    n = len(cap.records[name].outputs)
    if n == 0:
        raise SaliencyError(f"layer {name!r} was not called during the forward pass")
    return n


def representation_path(ctx, target, name: str, inputs: torch.Tensor, rows: torch.Tensor, betas: torch.Tensor,
                        weights: torch.Tensor, base: str, relu: bool, batch_size=None) -> torch.Tensor:
    """sum over rows of weight * [ReLU](dS/dr (.) r) summed over channels, at r = base + beta (a(input) - base),
    a = output of layer `name` (its last call when the module runs several times per forward, as in
    layer capture); accumulated per example -> [B,h,w]. Chunked F+B passes."""
    _, module = ctx.subject.find_layer(name)
    n_calls = _count_calls(ctx, name)
    bs = batch_size or ctx.batch_size or auto_batch(ctx.subject, ctx.x.shape, grad=True)
    before_layer_free = graph_from_layer_ok(ctx.subject)
    out = None
    for start, stop in spans(inputs.shape[0], bs):
        sl = slice(start, stop)
        frames = ctx.x.shape[1] if ctx.layout == "BTCHW" else None
        rep = _ReplaceOutput(module, betas[sl], base, n_calls - 1, along_axes=ctx.layout in ("BCT", "BCDHW", "BTCHW"),
                             frames=frames)
        # the part before the layer needs no graph: the gradient is taken w.r.t. the layer's
        # replaced output, which switches autograd on for the rest of the forward
        with (torch.no_grad() if before_layer_free else torch.enable_grad()), rep:
            logits = ctx.subject.forward(inputs[sl].detach())
        with torch.enable_grad():
            if rep.tensor is None:
                raise SaliencyError(f"layer {name!r} was not called during the forward pass")
            r = rep.tensor
            score = target.score(logits, rows=rows[sl])
            (g,) = torch.autograd.grad(score.sum(), r, allow_unused=True)
        ctx.counter.add(forward=inputs[sl].shape[0], backward=inputs[sl].shape[0])
        g = torch.zeros_like(r) if g is None else g
        e = g.detach() * r.detach()
        n = inputs[sl].shape[0]
        if frames is not None and e.dim() == 4 and e.shape[0] == n * frames:   # a clip's frame-by-frame layer
            e = e.reshape(n, frames, *e.shape[1:]).transpose(1, 2)
        e = as_grid(ctx, name, e).double()
        if relu:
            e = e.clamp_min(0)
        e = e.sum(1) * weights[sl].to(e.device, torch.float64).view(-1, *([1] * (e.dim() - 2)))
        if out is None:
            out = torch.zeros((ctx.batch, *e.shape[1:]), dtype=torch.float64, device=e.device)
        out.index_add_(0, rows[sl], e)
    return out


def _layer_name(ctx, layer):
    names = resolve_layers(ctx, layer)
    if len(names) != 1:
        raise SaliencyError("this method takes one layer")
    return names[0]


def _upsample_map(raw: torch.Tensor, size, mode: str, nonneg: bool) -> torch.Tensor:
    if mode not in ("bilinear", "bicubic"):
        raise SaliencyError(f"unknown upsampling {mode!r}; use 'bilinear' or 'bicubic'")
    up = upsample(raw.float(), size, mode=mode)
    # bicubic overshoot below zero is an interpolation artefact of a non-negative map
    return up.clamp_min(0) if nonneg else up


def _timm_attention(model) -> list | None:
    """The attention modules of a ViT whose blocks all use timm's Attention (softmax probabilities
    pass through `attn_drop`), in order; None when the model is not such a ViT."""
    from ..tokens import transformer_blocks

    blocks = transformer_blocks(model)
    if not blocks:
        return None
    modules = dict(model.named_modules())
    mods = [modules[a] for _, a in blocks]
    if not all(hasattr(m, "attn_drop") and hasattr(m, "fused_attn") for m in mods):
        return None
    return mods


def iia_attention(ctx, target, inputs: torch.Tensor, rows: torch.Tensor, betas: torch.Tensor,
                  weights: torch.Tensor, batch_size=None) -> torch.Tensor:
    """ViT form: for each row (input x_k, scale beta_j) run the model with the last block's attention
    probabilities replaced by beta_j * A^L(x_k), take the gradients of every block's attention and
    accumulate weight * ReLU(dS/dA^l * A^l) per example, block and head -> [L, B, heads, N, N].
    (For the last block dS/d(beta A) * beta A = dS/dA * A: the recorded A^L is the tensor scaled.)"""
    from ..tokens import AttentionTap

    last = _timm_attention(ctx.subject.model)[-1]
    bs = batch_size or ctx.batch_size or auto_batch(ctx.subject, ctx.x.shape, grad=True)
    acc = None
    for start, stop in spans(inputs.shape[0], bs):
        sl = slice(start, stop)
        beta = betas[sl]

        def scale(_m, _i, out, beta=beta):
            return out * beta.to(out.device, out.dtype).view(-1, 1, 1, 1)

        with AttentionTap(ctx.subject.model) as tap, torch.enable_grad():
            handle = last.attn_drop.register_forward_hook(this_thread_only(scale))  # runs after the tap's recording hook
            try:
                logits = ctx.subject.forward(inputs[sl].detach().clone().requires_grad_(True))
            finally:
                handle.remove()
            attn = list(tap.attn)
            score = target.score(logits, rows=rows[sl])
            grads = torch.autograd.grad(score.sum(), attn, allow_unused=True)
        n = inputs[sl].shape[0]
        ctx.counter.add(forward=n, backward=n)
        w = weights[sl].to(inputs.device, torch.float64).view(-1, 1, 1, 1)
        for i, (a, g) in enumerate(zip(attn, grads)):
            if g is None:
                continue
            e = (g.detach().double() * a.detach().double()).clamp_min(0) * w
            if acc is None:
                acc = torch.zeros((len(attn), ctx.batch, *a.shape[1:]), dtype=torch.float64, device=a.device)
            acc[i].index_add_(0, rows[sl], e)
    if acc is None:
        raise SaliencyError("the target score does not depend on any attention probabilities")
    return acc


def attention_rollout_of(E: torch.Tensor) -> torch.Tensor:
    """[L,B,heads,N,N] -> R = prod_l rownorm(mean_heads(E^l) + I) (block 1 applied first) [B,N,N]."""
    _, b, _, n, _ = E.shape
    eye = torch.eye(n, dtype=torch.float64, device=E.device).expand(b, n, n)
    R = eye.clone()
    for El in E:
        a = El.mean(1) + eye
        R = (a / a.sum(-1, keepdim=True)) @ R
    return R


@register
class IIA(Method):
    name = "iia"
    aliases = ("iterated_integrated_attributions",)
    family = "gradient"
    cost = "25F+25B"
    uses_layer = True
    description = ("Iterated Integrated Attributions (Barkan et al. 2023): integration over the input path "
                   "x_k = x' + alpha_k (x - x') and, for each x_k, over beta_j times an internal representation. "
                   "CNN form (path='representation'): ReLU(dS/dr * r) at r = beta_j a(x_k) of the layer, channel "
                   "sum. ViT form (path='attention', timm attention): last block's attention scaled by beta_j, "
                   "ReLU(dS/dA * A) of every block averaged, then rollout; CLS row on the patch grid.")
    defaults = {"steps": 5, "rule": "riemann_right", "baseline": "mean", "relu": True, "upsample": "bicubic",
                "path": "auto", "batch_size": None}
    # the representation path is per location of a layer map, any number of axes (a series', a
    # volume's or a clip's layer, upsampled linearly / trilinearly: torch has no 1-D / 3-D bicubic)
    layouts = ("BCHW", "BCT", "BCDHW", "BTCHW")
    not_for = {"BF": "IIA integrates a layer map and a flat input's layers have no axes to map"}

    def run(self, ctx, target, layer, steps=5, rule="riemann_right", baseline="mean", relu=True,
            upsample="bicubic", path="auto", batch_size=None):
        positive_int(steps, "steps")
        if path not in ("auto", "attention", "representation"):
            raise SaliencyError(f"iia path must be 'auto', 'attention' or 'representation', got {path!r}")
        vit = _timm_attention(ctx.subject.model) is not None
        if path == "attention" and not vit:
            raise SaliencyError("iia path='attention' needs a Vision Transformer with timm attention blocks")
        attention = path == "attention" or (path == "auto" and vit and layer in (None, "auto"))
        x = ctx.x.detach()
        b = x.shape[0]
        base = make_baseline(ctx.subject, x, baseline, ctx.seed)
        alphas, wa = quadrature(steps, rule)
        betas, wb = quadrature(steps, rule)
        # rows ordered (k, j, example): input step k, representation step j
        k_idx = torch.arange(steps).repeat_interleave(steps * b)
        j_idx = torch.arange(steps).repeat_interleave(b).repeat(steps)
        ex = torch.arange(b).repeat(steps * steps)
        a = alphas.to(x.device, x.dtype)[k_idx.to(x.device)].view(-1, *([1] * (x.dim() - 1)))
        inputs = base[ex] + a * (x[ex] - base[ex])
        weights = wa[k_idx] * wb[j_idx]
        if attention:
            from ..tokens import grid_of

            E = iia_attention(ctx, target, inputs, ex.to(x.device), betas[j_idx], weights, batch_size)
            R = attention_rollout_of(E)
            prefix, h, w = grid_of(ctx.subject, R.shape[-1], tuple(x.shape[-2:]), layer="attention")
            row = R[:, 0, prefix:] if prefix > 0 else R.mean(1)
            raw = row.reshape(b, h, w)
            return {"maps": _upsample_map(raw, x.shape[-2:], "bilinear", True), "raw": raw.float(), "layer": "attention",
                    "signed": False, "extras": {"path": "attention", "blocks": int(E.shape[0])}}
        name = _layer_name(ctx, layer)
        raw = representation_path(ctx, target, name, inputs, ex.to(x.device), betas[j_idx], weights,
                                  "zero", relu, batch_size)
        return {"maps": _upsample_map(raw, map_size(ctx), upsample, relu), "raw": raw.float(), "layer": name,
                "signed": not relu, "extras": {"path": "representation"}}


@register
class DIX(Method):
    name = "dix"
    aliases = ("deep_integrated_explanations",)
    family = "gradient"
    cost = "4F+4B"
    uses_layer = True
    experimental = True
    description = ("Deep Integrated Explanations (experimental, definition unconfirmed): mean over "
                   "a_t = a' + (t/T)(a - a'), t = 0..T, of ReLU(dS/da(a_t) * a_t) at one layer; channel sum.")
    defaults = {"steps": 4, "baseline": "zero", "relu": True, "upsample": "bicubic", "batch_size": None}
    layouts = IIA.layouts
    not_for = {"BF": "DIX integrates a layer map and a flat input's layers have no axes to map"}

    def run(self, ctx, target, layer, steps=4, baseline="zero", relu=True, upsample="bicubic", batch_size=None):
        positive_int(steps, "steps")
        if baseline not in ("zero", "min"):
            raise SaliencyError(f"dix baseline must be 'zero' or 'min' (per-channel minimum), got {baseline!r}")
        name = _layer_name(ctx, layer)
        x = ctx.x.detach()
        b = x.shape[0]
        t = torch.arange(steps + 1, dtype=torch.float64) / steps
        ex = torch.arange(b).repeat(steps + 1)
        betas = t.repeat_interleave(b)
        weights = torch.full((len(ex),), 1.0 / (steps + 1), dtype=torch.float64)
        if baseline == "zero":  # the t = 0 term is exactly zero: skip its pass
            keep = betas > 0
            ex, betas, weights = ex[keep], betas[keep], weights[keep]
        raw = representation_path(ctx, target, name, x[ex], ex.to(x.device), betas, weights, baseline, relu,
                                  batch_size)
        return {"maps": _upsample_map(raw, map_size(ctx), upsample, relu), "raw": raw.float(), "layer": name,
                "signed": not relu}
