"""Propagation family: FullGrad, NormGrad and Layer-wise Relevance Propagation.

FullGrad (`fullgrad`)
    One forward + backward. For every Conv/Linear layer with a bias and every BatchNorm in eval mode
    (implicit bias `b = beta - mean * gamma / sqrt(var + eps)`) the bias-gradient `g_z * b` is
    collected with a forward hook on the layer output. Completeness
    `sum(grad_x * x) + sum_l sum(g_zl * b_l) == s_c(x)` holds for piecewise-linear nets (ReLU,
    max-pool, zero padding); the error is reported in `extras["completeness_error"]` and a
    `RuntimeWarning` is raised when it is large (ReLU6 saturation, SiLU/GELU, LayerNorm act as
    hidden biases). Map: `normalisation="official"` (default; |.|, per-sample min-max over the
    whole tensor, bilinear upsampling with align_corners=True, sum over channels and layers) or
    `"grad_cam_lib"` (|.|, min-max per channel, bilinear align_corners=False, sum; the variant of
    pytorch-grad-cam). Only spatial bias-gradients enter the map; all enter completeness. A series'
    or a volume's terms are upsampled linearly / trilinearly; a clip's frame-by-frame layer
    `[B*T,C,h,w]` gets its frames back on the time axis first.

NormGrad (`normgrad`)
    From the layer capture shared with the CAMs: activation `a(u)` and gradient `g(u)` per location.
    `variant="norm"` (NormGrad, virtual 1x1 conv + Frobenius norm): `||g(u)|| * ||a(u)||`;
    `"selective"`: `||ReLU(a(u) * g(u))||`; `"selective_outer"`: Frobenius norm of the positively
    clipped outer product `ReLU(g(u) a(u)^T)`; `"bias"`: `||g(u)||`; `"scaling_sum"`:
    `sum_c a(u) g(u)` (linear approximation; on a GAP + linear head equals CAM / (h w)).
    Several layers (`layer=[...]`): each map is upsampled (bilinear), min-max normalised and the
    maps are multiplied (`combine="product"`, the paper's multi-layer combination; "mean" also
    offered). `meta=True`: meta-saliency - one SGD step (lr `meta_lr`) on the cross-entropy of the
    target (the negative log-probability score) per example, NormGrad on the updated weights,
    weights restored bit-exactly (+1F+1B per example).

LRP (`lrp`)
    Own implementation of the rules (Zennit is used in the tests as the reference). Relevance is
    carried as `R = activation * modified_gradient`: each Conv/Linear layer keeps its forward value
    but its backward is replaced, through a forward hook, by the rule's
    `R_in = a * d/da [z'(a) * (R_out / stab(z'))]` (one autograd pass for the whole network;
    no module backward hooks). In this representation
      * ReLU / ReLU6 / LeakyReLU, max-pooling, concatenation, flatten, dropout pass relevance as the
        plain gradient does (ReLU6 drops the relevance of saturated units);
      * average pooling and additions - including torchvision ResNet's functional `out += identity`,
        which module hooks cannot see - receive the plain gradient, which in this representation is
        exactly the (unstabilised) Norm rule: each summand gets its share `x_k / sum`. No ResNet
        canonizer is needed; relevance is conserved through skips.
    BatchNorm layers that directly follow a Conv/Linear (found by a one-row probe pass) are merged
    into it for the duration (`merged_batchnorm`, restored bit-exactly after); unmerged BatchNorms
    (e.g. DenseNet's norm-relu-conv order) get the plain gradient (LRP-0 of an affine map whose
    shift absorbs relevance). Rules: epsilon / zero, gamma (generalised, for both input signs),
    alpha-beta, z-plus, flat and z-box (first layer only). Composites: "epsilon_plus_flat"
    (default), "epsilon_plus", "epsilon_alpha2beta1", "epsilon_gamma_box", and single-rule
    "epsilon", "zero", "gamma", "alpha_beta", "zplus"; `rules={layer_name: rule}` overrides.
    Layers for which LRP rules are not defined (LayerNorm, GroupNorm, GELU, SiLU, Hardswish,
    sigmoid gates, softmax/attention) raise `SaliencyError` unless `unsupported="gradient"`, which
    lets the plain gradient pass through them (no conservation; the error is in the extras), or,
    for element-wise activations only (Tanh, Sigmoid, GELU, SiLU, ...), `unsupported="identity"`,
    which passes their relevance through unchanged (Zennit's Pass rule; Captum's Tanh).
    Start relevance: the target score itself (`R_out = one_hot(c) * s_c`), so
    `sum(R_input) ~= s_c` when the rules conserve and there are no biases (for a Contrast,
    `+s_a` and `-s_b`; in general logits times the score's derivative w.r.t. them). The rule
    named for a layer in `rules` wins over the composite's first-layer rule.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import gradient_pass, upsample
from ..errors import SaliencyError
from ..hooks import GradientMask, model_lock, this_thread_only
from ..subject import channel_axis
from .base import ANY_LAYOUT, Method, register
from .cam import as_grid, map_size, normalize01, resolve_layers
from .lrp_rules import ELEMENTWISE, RULES, PassThrough, RuleHooks

RULE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# --------------------------------------------------------------------------------- helpers
def _minmax(t: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample min-max over all non-batch dims: (t - min) / (max - min + eps)."""
    flat = t.reshape(t.shape[0], -1)
    lo = flat.amin(1, keepdim=True)
    flat = flat - lo
    return (flat / (flat.amax(1, keepdim=True) + eps)).view_as(t)


def batchnorm_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as `y = k * x + b`: `k = gamma / sqrt(var + eps)`, `b = beta - mean * k`."""
    if bn.running_var is None or bn.running_mean is None:
        raise SaliencyError(f"{type(bn).__name__} without running statistics uses batch statistics even in "
                            "eval mode; it has no fixed affine form (FullGrad / LRP merging undefined)")
    k = 1.0 / torch.sqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        k = k * bn.weight
    b = -bn.running_mean * k
    if bn.bias is not None:
        b = b + bn.bias
    return k.detach(), b.detach()


def _channel_first(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A layer output with its feature axis at dim 1 (Linear layers keep features last)."""
    if isinstance(module, nn.Linear) and t.dim() > 2:
        return t.movedim(-1, 1)
    return t


# --------------------------------------------------------------------------------- FullGrad
def full_gradient(subject, x: torch.Tensor, target, counter=None) -> dict:
    """One forward + backward: input-gradient and bias-gradient terms of every biased layer.

    Returns dict(scores [B], input_term [B,C,H,W] = grad_x * x, bias_terms = list of
    (layer name, [B,C,...] tensor g_z * b with channels at dim 1, module), completeness_error [B]).
    Must be called inside `subject.explaining()`.
    """
    names = {m: n for n, m in subject.model.named_modules()}
    records: list[tuple[nn.Module, torch.Tensor]] = []

    def hook(module, _inp, out):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            records.append((module, out))
            # the model continues on a copy: an in-place op after the layer (ResNet's `out += identity`
            # on the BatchNorm output) must not turn the recorded tensor into a later one
            return out.clone()
        return None

    handles = []
    for m in subject.model.modules():
        if isinstance(m, RULE_LAYERS) and m.bias is not None:
            handles.append(m.register_forward_hook(this_thread_only(hook)))
        elif isinstance(m, BATCHNORMS):
            batchnorm_affine(m)  # raises for BN without running stats
            handles.append(m.register_forward_hook(this_thread_only(hook)))
    try:
        with torch.enable_grad():
            xin = x.detach().clone().requires_grad_(True)
            logits = subject.forward(xin)
            scores = target.score(logits)
            grads = torch.autograd.grad(scores.sum(), [xin] + [o for _, o in records], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    if counter is not None:
        counter.add(forward=x.shape[0], backward=x.shape[0])
    gx = grads[0] if grads[0] is not None else torch.zeros_like(xin)
    input_term = (gx * x).detach()
    total = input_term.flatten(1).sum(1)
    terms = []
    for (module, out), g in zip(records, grads[1:]):
        if g is None:
            continue
        g = _channel_first(g.detach(), module)
        if isinstance(module, BATCHNORMS):
            _, b = batchnorm_affine(module)
        else:
            b = module.bias.detach()
        b = b.to(g.dtype).view(1, -1, *([1] * (g.dim() - 2)))
        term = g * b
        # per example: a frame-by-frame layer's [B*T, ...] term holds T rows of each example
        total = total + term.reshape(x.shape[0], -1).sum(1)
        terms.append((names.get(module, type(module).__name__), term, module))
    scores = scores.detach()
    return {"scores": scores, "input_term": input_term, "bias_terms": terms,
            "completeness_error": (total - scores).abs(), "total": total}


def _term_grid(ctx, t: torch.Tensor) -> torch.Tensor | None:
    """A bias term `[B,C,...]` on the input's axes, or None when it has none (a Linear's `[B,F]`,
    tokens): a clip's frame-by-frame term `[B*T,C,h,w]` gets its frames back on a time axis."""
    x = ctx.x
    if ctx.layout == "BTCHW" and t.dim() == 4 and t.shape[0] == x.shape[0] * x.shape[1]:
        return as_grid(ctx, "", t)
    return t if t.dim() == x.dim() else None


@register
class FullGrad(Method):
    name = "fullgrad"
    aliases = ("full_grad",)
    family = "gradient"
    cost = "1F+1B"
    signed = False
    defaults = {"normalisation": "official", "tolerance": 1e-3}
    description = ("Full-gradient representation (Srinivas & Fleuret 2019): |input-gradient x input| plus "
                   "|bias-gradient x bias| of every conv/BatchNorm layer (BatchNorm's implicit bias included), "
                   "each min-max normalised, upsampled and summed. Completeness error reported in extras. "
                   "Series and volumes too: their layer terms are upsampled linearly / trilinearly.")
    # the terms have the layer's axes, whatever their number, upsampled linearly / trilinearly
    # (a clip's frame-by-frame layers get their frames back on a time axis, as for the CAMs)
    layouts = ("BCHW", "BCT", "BCDHW", "BTCHW")
    not_for = {"BF": "FullGrad sums bias-gradient maps upsampled to the input's axes, and a flat input has none"}

    def run(self, ctx, target, layer, normalisation="official", tolerance=1e-3):
        if normalisation not in ("official", "grad_cam_lib"):
            raise SaliencyError(f"unknown FullGrad normalisation {normalisation!r}; use 'official' or 'grad_cam_lib'")
        if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
            raise SaliencyError(f"tolerance must be a non-negative number, got {tolerance!r}")
        x = ctx.x
        fg = full_gradient(ctx.subject, x, target, ctx.counter)
        size = map_size(ctx)    # (H, W); a series' (T,), a volume's (D, H, W): linear / trilinear upsampling
        spatial = [(n, g) for n, t, _ in fg["bias_terms"] if (g := _term_grid(ctx, t)) is not None]
        # the input term with its channels at dim 1 (a clip's [B,T,C,H,W] -> [B,C,T,H,W])
        ca = channel_axis(ctx.layout)
        inp = fg["input_term"] if ca == 1 else fg["input_term"].movedim(ca, 1)
        if normalisation == "official":
            maps = _minmax(inp.abs(), 1e-6).sum(1)
            for _, t in spatial:
                # bilinear upsampling is linear: summing channels first gives the same map, C times cheaper
                maps = maps + upsample(_minmax(t.abs(), 1e-6).sum(1), size, align_corners=True).to(maps.dtype)
        else:
            def per_channel(t):
                b, c = t.shape[:2]
                return _minmax(t.abs().reshape(b * c, *t.shape[2:]), 1e-7).reshape(t.shape)
            maps = per_channel(inp).sum(1)
            for _, t in spatial:
                maps = maps + upsample(per_channel(t).sum(1), size, align_corners=False).to(maps.dtype)
        err = fg["completeness_error"]
        rel = err / fg["scores"].abs().clamp_min(1.0)
        if bool((rel > tolerance).any()):
            warnings.warn(
                f"FullGrad completeness fails: |sum of terms - score| = {err.max().item():.3g} "
                f"(relative {rel.max().item():.3g} > {tolerance}); the model has implicit biases that the "
                "decomposition does not see (saturating ReLU6, SiLU/GELU, LayerNorm, BatchNorm without "
                "running stats ...), or the target score is not linear in the logits (probabilities, groups)",
                RuntimeWarning, stacklevel=2)
        extras = {"completeness_error": err.tolist(), "completeness_relative": rel.tolist(),
                  "score": fg["scores"].tolist(), "bias_layers": len(fg["bias_terms"]),
                  "spatial_bias_layers": len(spatial), "normalisation": normalisation}
        return {"maps": maps.detach(), "attributions": fg["input_term"], "signed": False, "extras": extras}


# --------------------------------------------------------------------------------- NormGrad
NORMGRAD_VARIANTS = ("norm", "selective", "selective_outer", "bias", "scaling_sum")


def normgrad_map(A: torch.Tensor, G: torch.Tensor, variant: str = "norm") -> torch.Tensor:
    """Per-location aggregate of the virtual-layer gradient contribution, [B,C,h,w] -> [B,h,w]."""
    if variant == "norm":
        return G.norm(dim=1) * A.norm(dim=1)
    if variant == "selective":
        return (A * G).clamp_min(0).norm(dim=1)
    if variant == "selective_outer":
        # ||ReLU(g a^T)||_F^2 = sum over same-sign pairs g_i^2 a_j^2
        gp, gn = G.clamp_min(0).pow(2).sum(1), G.clamp_max(0).pow(2).sum(1)
        ap, an = A.clamp_min(0).pow(2).sum(1), A.clamp_max(0).pow(2).sum(1)
        return (gp * ap + gn * an).sqrt()
    if variant == "bias":
        return G.norm(dim=1)
    if variant == "scaling_sum":
        return (A * G).sum(1)
    raise SaliencyError(f"unknown NormGrad variant {variant!r}; use one of {', '.join(NORMGRAD_VARIANTS)}")


@contextlib.contextmanager
def _sgd_step(model: nn.Module, grads: list, params: list, lr: float) -> Iterator[None]:
    with model_lock(model)(exclusive=True):  # no other thread's call may run on the stepped weights
        yield from _sgd_step_held(grads, params, lr)


def _sgd_step_held(grads: list, params: list, lr: float) -> Iterator[None]:
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.sub_(lr * g)
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


@register
class NormGrad(Method):
    name = "normgrad"
    aliases = ("norm_grad",)
    family = "gradient"
    changes_model = True  # meta=True steps the weights for a moment
    cost = "1F+1B (meta: +1F+1B)"
    signed = False
    uses_layer = True
    defaults = {"variant": "norm", "combine": "product", "meta": False, "meta_lr": 1e-4, "meta_negate": False}
    description = ("NormGrad (Rebuffi et al. 2020): ||gradient|| x ||activation|| per location of a layer "
                   "(virtual 1x1 conv); 'selective' variant; several layers combined by product of min-max "
                   "normalised maps; optional meta-saliency (one SGD step on the target's cross-entropy). "
                   "Series, volumes and clips too (the layer map upsampled linearly / trilinearly).")
    # norms over the channel axis of a layer map: any number of axes after it (a clip's layer as
    # for the CAMs: a 3-D convolution's map or a frame-by-frame one with its frames put back)
    layouts = ("BCHW", "BCT", "BCDHW", "BTCHW")
    not_for = {"BF": "NormGrad takes norms per location of a layer map, and a flat input's layers have no axes"}

    def run(self, ctx, target, layer, variant="norm", combine="product", meta=False, meta_lr=1e-4,
            meta_negate=False):
        if variant not in NORMGRAD_VARIANTS:
            raise SaliencyError(f"unknown NormGrad variant {variant!r}; use one of {', '.join(NORMGRAD_VARIANTS)}")
        if combine not in ("product", "mean"):
            raise SaliencyError(f"unknown NormGrad layer combination {combine!r}; use 'product' or 'mean'")
        if not (isinstance(meta_lr, (int, float)) and meta_lr >= 0):
            raise SaliencyError(f"meta_lr must be a non-negative number, got {meta_lr!r}")
        names = resolve_layers(ctx, layer)
        if meta:
            acts, grads = self._meta_capture(ctx, target, names, float(meta_lr), bool(meta_negate))
        else:
            res = ctx.capture(names, target)
            acts, grads = res.activations, res.gradients
        raws = []
        for name in names:
            A = as_grid(ctx, name, acts[name]).to(ctx.x.dtype)
            G = as_grid(ctx, name, grads[name]).to(ctx.x.dtype)
            raws.append(normgrad_map(A, G, variant))
        size = map_size(ctx)    # a series' layer map upsampled linearly, a volume's or a clip's trilinearly
        if len(raws) == 1:
            maps = upsample(raws[0], size).to(ctx.x.dtype)
        else:
            ups = [normalize01(upsample(r, size)) for r in raws]
            maps = torch.stack(ups).prod(0) if combine == "product" else torch.stack(ups).mean(0)
        return {"maps": maps, "raw": raws[0] if len(raws) == 1 else None, "layer": ",".join(names),
                "signed": variant == "scaling_sum",
                "extras": {"layers": names, "combine": combine if len(raws) > 1 else None, "meta": bool(meta)}}

    @staticmethod
    def _meta_capture(ctx, target, names, lr, negate):
        """Per example: one SGD step on -log p(target), capture at the updated weights, restore."""
        subject, x = ctx.subject, ctx.x
        params = [p for p in subject.model.parameters() if p.is_floating_point()]
        flags = [p.requires_grad for p in params]
        acts: dict[str, list] = {n: [] for n in names}
        grads: dict[str, list] = {n: [] for n in names}
        try:
            for p in params:
                p.requires_grad_(True)
            for i in range(x.shape[0]):
                rows = torch.tensor([i], device=x.device)
                with torch.enable_grad():
                    logits = subject.forward(x[i:i + 1])
                    loss = -target.score(logits, rows=rows, output="log_prob").sum()
                    if negate:
                        loss = -loss
                    pg = torch.autograd.grad(loss, params, allow_unused=True)
                ctx.counter.add(forward=1, backward=1)
                with _sgd_step(subject.model, pg, params, lr):
                    res = gradient_pass(subject, x[i:i + 1], target, rows=rows, layers=names, input_grad=False,
                                        counter=ctx.counter)
                for n in names:
                    acts[n].append(res.activations[n])
                    grads[n].append(res.gradients[n])
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        return ({n: torch.cat(v) for n, v in acts.items()}, {n: torch.cat(v) for n, v in grads.items()})


# --------------------------------------------------------------------------------- LRP
# composite -> (first layer rule or None, conv rule, linear rule)
COMPOSITES = {
    "epsilon_plus_flat": ("flat", "zplus", "epsilon"),
    "epsilon_plus": (None, "zplus", "epsilon"),
    "epsilon_alpha2beta1": (None, "alpha_beta", "epsilon"),
    "epsilon_gamma_box": ("zbox", "gamma", "epsilon"),
    "epsilon": (None, "epsilon", "epsilon"),
    "zero": (None, "zero", "zero"),
    "gamma": (None, "gamma", "gamma"),
    "alpha_beta": (None, "alpha_beta", "alpha_beta"),
    "zplus": (None, "zplus", "zplus"),
}
UNSUPPORTED_MODES = ("raise", "gradient", "identity")
UNDEFINED_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                    nn.InstanceNorm3d,
                    nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.ELU, nn.SELU,
                    nn.CELU, nn.Mish, nn.Softplus, nn.Softmax, nn.MultiheadAttention)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "values"):
        return next((v for v in out.values() if isinstance(v, torch.Tensor)), None)
    return None


@contextlib.contextmanager
def merged_batchnorm(model: nn.Module, probe: torch.Tensor) -> Iterator[list[tuple[str, str]]]:
    """Merge every BatchNorm that directly consumes a Conv/Linear output into that layer.

    Pairs are found by running `probe` (one row is enough) and matching the BatchNorm's input
    tensor with the layer's output tensor (each module called once); the merged model's output on
    the probe is checked against the original (SaliencyError if it changed). While active:
    `W' = W * k` (output-channel axis), `b' = (b - mean) * k + beta` with `k = gamma/sqrt(var+eps)`
    (a zero bias is created if absent) and the BatchNorm is the identity (mean 0, var 1, gamma 1,
    beta 0, eps 0). Everything, including a missing bias, is restored bit-exactly on exit.
    Yields the merged (layer, batchnorm) name pairs.
    """
    with model_lock(model)(exclusive=True):  # no other thread's call may run on the merged weights
        yield from _merged_batchnorm_held(model, probe)


def _merged_batchnorm_held(model: nn.Module, probe: torch.Tensor) -> Iterator[list[tuple[str, str]]]:
    names = {m: n for n, m in model.named_modules()}
    outputs: dict[int, list] = {}
    calls: dict[nn.Module, int] = {}
    pairs = []

    def lin_hook(m, _i, out):
        calls[m] = calls.get(m, 0) + 1
        outputs[id(out)] = [m, out]

    def bn_hook(m, inp, _o):
        calls[m] = calls.get(m, 0) + 1
        src = outputs.get(id(inp[0]))
        if src is not None and src[1] is inp[0]:
            pairs.append((src[0], m, inp[0].dim()))

    handles = [m.register_forward_hook(this_thread_only(lin_hook)) for m in model.modules() if isinstance(m, RULE_LAYERS)]
    handles += [m.register_forward_hook(this_thread_only(bn_hook)) for m in model.modules()
                if isinstance(m, BATCHNORMS) and m.running_var is not None]
    try:
        with torch.no_grad():
            reference = _first_tensor(model(probe))
    finally:
        for h in handles:
            h.remove()

    def mergeable(lin, bn, out_dim):
        channels = lin.out_features if isinstance(lin, nn.Linear) else lin.out_channels
        # a Linear on [B, N, F] has its features last, where BatchNorm1d would normalise N
        linear_ok = not isinstance(lin, nn.Linear) or out_dim == 2
        return calls.get(lin) == 1 and calls.get(bn) == 1 and channels == bn.num_features and linear_ok

    pairs = [(lin, bn) for lin, bn, out_dim in pairs if mergeable(lin, bn, out_dim)]
    saved = []
    try:
        with torch.no_grad():
            for lin, bn in pairs:
                k, b = batchnorm_affine(bn)
                rec = {"lin": lin, "bn": bn, "weight": lin.weight.detach().clone(),
                       "bias": None if lin.bias is None else lin.bias.detach().clone(),
                       "bn_state": {key: t.detach().clone() for key, t in
                                    (("running_mean", bn.running_mean), ("running_var", bn.running_var),
                                     ("weight", bn.weight), ("bias", bn.bias)) if t is not None},
                       "eps": bn.eps}
                saved.append(rec)
                shape = [-1] + [1] * (lin.weight.dim() - 1)
                bias0 = lin.bias.detach() if lin.bias is not None else torch.zeros_like(k)
                lin.weight.mul_(k.to(lin.weight.dtype).view(shape))
                new_bias = (bias0 * k + b).to(lin.weight.dtype)
                if lin.bias is None:
                    lin.bias = nn.Parameter(new_bias, requires_grad=lin.weight.requires_grad)
                else:
                    lin.bias.copy_(new_bias)
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0)
                if bn.weight is not None:
                    bn.weight.fill_(1.0)
                if bn.bias is not None:
                    bn.bias.zero_()
                bn.eps = 0.0
        if pairs:
            # a layer output also used elsewhere (not only by its BatchNorm) would change: check
            with torch.no_grad():
                merged_out = _first_tensor(model(probe))
            tol = 1e-4 * max(1.0, reference.abs().max().item())
            if merged_out is not None and reference is not None and \
                    (merged_out.shape != reference.shape or (merged_out - reference).abs().max().item() > tol):
                raise SaliencyError("merging BatchNorm into the preceding layers changed the model's output (a layer "
                                    "output is used by more than its BatchNorm); use canonize=False")
        yield [(names.get(lin, "?"), names.get(bn, "?")) for lin, bn in pairs]
    finally:
        with torch.no_grad():
            for rec in reversed(saved):
                lin, bn = rec["lin"], rec["bn"]
                lin.weight.copy_(rec["weight"])
                if rec["bias"] is None:
                    lin.bias = None
                else:
                    lin.bias.copy_(rec["bias"])
                for key, t in rec["bn_state"].items():
                    getattr(bn, key).copy_(t)
                bn.eps = rec["eps"]


def _bound(value, subject, x, pixel):
    image, layout = _image_input(subject, x)
    if value is None and not image:
        # a series, a volume or a feature vector has no pixel range: the z-box spans the batch's values
        return (x.detach().amin() if pixel == 0.0 else x.detach().amax()).reshape((1,) * x.dim())
    if value is None and layout == "BTCHW":   # frames of images: the pixel range of every frame
        return subject.normalize_pixels(torch.full_like(x[:1], float(pixel)))
    if value is None:
        value = pixel
        mean = torch.tensor(subject.mean, dtype=x.dtype, device=x.device).view(1, -1, *([1] * (x.dim() - 2)))
        std = torch.tensor(subject.std, dtype=x.dtype, device=x.device).view(1, -1, *([1] * (x.dim() - 2)))
        if mean.shape[1] != x.shape[1]:
            return torch.full((1,) * x.dim(), float(value), dtype=x.dtype, device=x.device)
        return (value - mean) / std
    if isinstance(value, (int, float)):
        return torch.full((1,) * x.dim(), float(value), dtype=x.dtype, device=x.device)
    if isinstance(value, torch.Tensor):
        return value.to(x)
    raise SaliencyError(f"z-box bound must be a number, a tensor or None, got {type(value).__name__}")


def _image_input(subject, x) -> tuple[bool, str]:
    """Whether `x` is a normalised image (or a clip of them) for `subject`, and its layout: the
    z-box default bounds of an image are the pixel range 0..1 in the model's space."""
    from ..subject import LAYOUTS

    layout_for = getattr(subject, "layout_for", None)
    layout = layout_for(x) if callable(layout_for) else "BCHW"
    return LAYOUTS[layout][2], layout


def lrp_relevance(subject, x, target, composite="epsilon_plus_flat", rules=None, epsilon=1e-6, gamma=0.25,
                  alpha=2.0, beta=1.0, low=None, high=None, canonize=True, unsupported="raise", counter=None,
                  condition=None):
    """Input relevance [B,C,H,W] and bookkeeping; must be called inside `subject.explaining()`.
    `condition=(layer, mask_fn or None)` multiplies the relevance passing `layer` by
    `mask_fn(activation)` (CRP) and returns the relevance that reached the layer
    (`"layer_relevance"`, the same shape as its output, before the mask) and the mask
    (`"layer_mask"`, broadcastable to it) and the layer's output (`"layer_output"`)."""
    if composite not in COMPOSITES:
        raise SaliencyError(f"unknown LRP composite {composite!r}; use one of {', '.join(COMPOSITES)}")
    if unsupported not in UNSUPPORTED_MODES:
        raise SaliencyError(f"unsupported must be 'raise', 'gradient' or 'identity', got {unsupported!r}")
    for name, val in (("epsilon", epsilon), ("gamma", gamma)):
        if not (isinstance(val, (int, float)) and val >= 0):
            raise SaliencyError(f"LRP {name} must be a non-negative number, got {val!r}")
    if not (isinstance(alpha, (int, float)) and isinstance(beta, (int, float)) and beta >= 0
            and abs(alpha - beta - 1) < 1e-9):
        raise SaliencyError(f"LRP alpha-beta needs alpha - beta = 1 and beta >= 0, got alpha={alpha}, beta={beta}")
    model = subject.model
    undefined = sorted({type(m).__name__ for m in model.modules() if isinstance(m, UNDEFINED_LAYERS)})
    undefined += sorted({f"{type(m).__name__} without running stats" for m in model.modules()
                         if isinstance(m, BATCHNORMS) and m.running_var is None})
    if undefined and unsupported == "raise":
        raise SaliencyError(f"LRP rules are not defined for {', '.join(undefined)} in {subject.name}; pass "
                            "unsupported='identity' to pass relevance unchanged through element-wise activations "
                            "(Tanh, Sigmoid, GELU, ...: Zennit's Pass rule), or unsupported='gradient' to let the "
                            "plain gradient pass through them (relevance is then not conserved), or use a gradient "
                            "method")
    passed = [m for m in model.modules() if isinstance(m, ELEMENTWISE)] if unsupported == "identity" else []
    if unsupported == "identity":
        other = sorted({u for u in undefined if u not in {type(m).__name__ for m in passed}})
        if other:
            raise SaliencyError(f"unsupported='identity' passes relevance through element-wise activations only; "
                                f"{', '.join(other)} in {subject.name} are not element-wise: use "
                                "unsupported='gradient' for them")
    first, conv_rule, lin_rule = COMPOSITES[composite]
    by_name = dict(model.named_modules())
    assign = {m: (lin_rule if isinstance(m, nn.Linear) else conv_rule) for m in model.modules()
              if isinstance(m, RULE_LAYERS)}
    user_set = []
    if rules is not None and not isinstance(rules, dict):
        raise SaliencyError(f"LRP rules must be a dict {{layer name: rule}}, got {type(rules).__name__}")
    for lname, rule in (rules or {}).items():
        if lname not in by_name or not isinstance(by_name[lname], RULE_LAYERS):
            raise SaliencyError(f"LRP rules: {lname!r} is not a Conv/Linear layer of {subject.name}")
        if rule not in RULES:
            raise SaliencyError(f"unknown LRP rule {rule!r} for {lname!r}; use one of {', '.join(RULES)}")
        assign[by_name[lname]] = rule
        user_set.append(by_name[lname])
    if not assign:
        raise SaliencyError(f"{subject.name} has no Conv/Linear layer: LRP has nothing to apply its rules to")
    lo, hi = _bound(low, subject, x, 0.0), _bound(high, subject, x, 1.0)
    merge = merged_batchnorm(model, x[:1]) if canonize else contextlib.nullcontext([])
    with merge as merged:
        if canonize and counter is not None:
            counter.add(forward=2 if merged else 1)  # the one-row probe (and its check after merging)
        with torch.enable_grad():
            xin = x.detach().clone().requires_grad_(True)
            cond = GradientMask(model, *condition) if condition is not None else contextlib.nullcontext()
            with RuleHooks(model, assign, first, xin, float(epsilon), float(gamma), float(alpha), float(beta),
                            lo, hi, user_set) as hooks, cond, PassThrough(passed):
                logits = subject.forward(xin)
            scores = target.score(logits)
            leaves = hooks.leaves
            tapped = []
            if condition is not None:
                if cond.out is None:
                    raise SaliencyError(f"layer {condition[0]!r} was not called by the forward")
                tapped = [cond.out]
            grads = torch.autograd.grad(scores.sum(), [xin] + leaves + tapped, allow_unused=True)
            if tapped:
                g = grads[-1] if grads[-1] is not None else torch.zeros_like(cond.out)
                layer_rel = (cond.out.detach() * g).detach()
                layer_mask = cond.mask.detach()
                grads = grads[:-1]
    if counter is not None:
        counter.add(forward=x.shape[0], backward=x.shape[0])
    # start relevance: logits times the score's derivative w.r.t. them (= the score for a class logit)
    with torch.enable_grad():
        lg = logits.detach().requires_grad_(True)
        dlg, = torch.autograd.grad(target.score(lg).sum(), lg)
    start = (lg.detach() * dlg).sum(1)
    rel = xin.detach() * (grads[0] if grads[0] is not None else torch.zeros_like(xin))
    for leaf, g in zip(leaves, grads[1:]):
        if g is not None:
            rel = rel + leaf.detach() * g
    out = {"relevance": rel.detach(), "scores": scores.detach(), "start": start.detach(), "logits": logits.detach(),
           "merged": merged, "undefined": undefined, "mode": unsupported}
    if condition is not None:
        out["layer_relevance"], out["layer_mask"], out["layer_output"] = layer_rel, layer_mask, cond.out.detach()
    return out


@register
class LRP(Method):
    name = "lrp"
    family = "propagation"
    changes_model = True  # canonize=True merges batch norm into the weights for the call
    cost = "1F+1B (modified)"
    signed = True
    defaults = {"composite": "epsilon_plus_flat", "rules": None, "epsilon": 1e-6, "gamma": 0.25, "alpha": 2.0,
                "beta": 1.0, "low": None, "high": None, "canonize": True, "unsupported": "raise",
                "reduce": "sum"}
    description = ("Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019): epsilon, gamma, "
                   "alpha-beta, z-plus, flat and z-box rules in composites (default EpsilonPlusFlat), BatchNorm "
                   "merged into the preceding layer; skip additions split relevance by share (Norm rule). "
                   "Any layout: series and volumes (Conv1d/Conv3d, 1-D/3-D pooling), clips, feature vectors "
                   "(MLPs); the z-box bounds of a non-image input default to the batch's min and max.")
    layouts = ANY_LAYOUT

    def run(self, ctx, target, layer, composite="epsilon_plus_flat", rules=None, epsilon=1e-6, gamma=0.25,
            alpha=2.0, beta=1.0, low=None, high=None, canonize=True, unsupported="raise", reduce="sum"):
        from ..engine import reduce_channels

        out = lrp_relevance(ctx.subject, ctx.x, target, composite=composite, rules=rules, epsilon=epsilon,
                            gamma=gamma, alpha=alpha, beta=beta, low=low, high=high, canonize=canonize,
                            unsupported=unsupported, counter=ctx.counter)
        rel = out["relevance"]
        total = rel.flatten(1).sum(1)
        extras = {"relevance_sum": total.tolist(), "score": out["scores"].tolist(),
                  "start_relevance": out["start"].tolist(),
                  "conservation_error": (total - out["start"]).abs().tolist(),
                  "merged_batchnorm": [list(p) for p in out["merged"]], "composite": composite}
        if out["undefined"]:
            extras["identity_through" if out["mode"] == "identity" else "gradient_through"] = out["undefined"]
        return {"maps": reduce_channels(rel, reduce, ctx.layout), "attributions": rel,
                "signed": reduce in ("sum", "mean"), "extras": extras}
