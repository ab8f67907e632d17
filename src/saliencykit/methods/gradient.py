"""Gradient family: saliency, gradient x input, SmoothGrad / SmoothGrad^2 / VarGrad,
Integrated Gradients, guided backpropagation and DeconvNet.

Input-space methods keep the signed `[B,C,H,W]` attributions in `Explanation.attributions`
and reduce channels for the map (`reduce=`).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..engine import chunked_gradient, generator, reduce_channels
from ..errors import SaliencyError, positive_float, positive_int
from ..filters import gaussian_blur
from .base import ANY_LAYOUT, Method, register

SIGNED_REDUCTIONS = ("sum", "mean")


def _maps(attr: torch.Tensor, reduce: str, layout: str | None = None) -> dict:
    return {"maps": reduce_channels(attr, reduce, layout), "attributions": attr, "signed": reduce in SIGNED_REDUCTIONS}


def make_baseline(subject, x: torch.Tensor, baseline, seed=0) -> torch.Tensor:
    """A baseline in the model's input space: "black"/"zero" (pixel 0), "white", "mean"
    (zeros of the normalised space), "blur" (Gaussian blur of x), "noise" (uniform pixels),
    a number (a pixel value), a tensor broadcastable to x, or a callable `f(x) -> tensor`."""
    if callable(baseline) and not isinstance(baseline, (str, torch.Tensor, np.ndarray)):
        made = baseline(x)
        if not isinstance(made, (torch.Tensor, np.ndarray)):
            raise SaliencyError(f"a baseline function must return a tensor, got {type(made).__name__}")
        baseline = made
    if isinstance(baseline, np.ndarray):
        baseline = torch.from_numpy(baseline)
    if isinstance(baseline, torch.Tensor):
        if not baseline.is_floating_point():
            baseline = baseline.double()
        b = baseline.to(x.device, x.dtype)
        try:
            out = b.expand_as(x).clone()
        except RuntimeError:
            raise SaliencyError(f"baseline of shape {tuple(b.shape)} does not broadcast to the input "
                                f"{tuple(x.shape)}") from None
        if not torch.isfinite(out).all():
            raise SaliencyError("baseline contains NaN or infinite values")
        return out
    if isinstance(baseline, (int, float, np.integer, np.floating)) and not isinstance(baseline, bool):
        if not math.isfinite(float(baseline)):
            raise SaliencyError(f"baseline pixel value must be finite, got {baseline}")
        return subject.normalize_pixels(torch.full_like(x, float(baseline)))
    if not isinstance(baseline, str):
        raise SaliencyError(f"baseline must be a name, a pixel value or a tensor, got {type(baseline).__name__}")
    if baseline in ("black", "zero"):
        return subject.black(x)
    if baseline == "white":
        return subject.normalize_pixels(torch.ones_like(x))
    if baseline == "mean":
        return torch.zeros_like(x)
    if baseline == "blur":
        if x.dim() != 4:
            raise SaliencyError(f"the 'blur' baseline blurs an image [B,C,H,W]; the input has shape {tuple(x.shape)}: "
                                "use 'zero', 'mean', a value or a tensor")
        return gaussian_blur(x, sigma=max(x.shape[-1], x.shape[-2]) / 16)
    if baseline == "noise":
        g = generator(seed)
        return subject.normalize_pixels(torch.rand(x.shape, generator=g).to(x))
    raise SaliencyError(f"unknown baseline {baseline!r}; use 'black' ('zero'), 'white', 'mean', 'blur', "
                        "'noise', a pixel value or a tensor")


def _input_gradient(ctx, target, reuse_primed: bool = True) -> torch.Tensor:
    """Gradient of the target score w.r.t. the clean input, chunked to `ctx.batch_size` rows.

    `reuse_primed=False` forces a fresh forward: the primed graph was recorded with the plain
    ReLU backward, so a modified backward (guided backprop, DeconvNet) must not reuse it.
    """
    primed = ctx.input_gradient(target) if reuse_primed else None
    if primed is not None:
        return primed
    x = ctx.x
    rows = torch.arange(x.shape[0], device=x.device)
    return chunked_gradient(ctx.subject, x, target, rows, ctx.batch_size, ctx.counter)


def _check_reduce(reduce):
    if reduce not in ("sum", "abs_sum", "max_abs", "l2", "mean"):
        raise SaliencyError(f"unknown channel reduction {reduce!r}; use sum, abs_sum, max_abs, l2 or mean")


@register
class Saliency(Method):
    layouts = ANY_LAYOUT
    name = "saliency"
    aliases = ("vanilla_gradient", "gradient")
    family = "gradient"
    clean_pass = True
    cost = "1F+1B"
    description = "Gradient of the target score w.r.t. the input (Simonyan et al. 2014)."
    defaults = {"abs": False, "reduce": "max_abs"}

    def run(self, ctx, target, layer, abs=False, reduce="max_abs"):
        _check_reduce(reduce)
        g = _input_gradient(ctx, target)
        return _maps(g.abs() if abs else g, reduce, ctx.layout)


@register
class GradientXInput(Method):
    layouts = ANY_LAYOUT
    name = "gradxinput"
    aliases = ("gradient_x_input", "input_x_gradient")
    family = "gradient"
    clean_pass = True
    cost = "1F+1B"
    signed = True
    description = "Input times gradient (Shrikumar et al. 2016); sums to the score on bias-free ReLU nets."
    defaults = {"reduce": "sum"}

    def run(self, ctx, target, layer, reduce="sum"):
        _check_reduce(reduce)
        g = _input_gradient(ctx, target)
        return _maps(ctx.x.detach() * g, reduce, ctx.layout)


def noisy_gradients(ctx, target, samples: int, noise: float, noise_abs: float | None, base: str,
                    batch_size=None, layers=(), on_chunk=None):
    """Gradients at `samples` noisy copies of each input. Noise is drawn copy by copy (each copy
    one `randn` of the input's shape) so the draw does not depend on the batch size.

    `noise` is relative (sigma = noise x (max - min) of each example); `noise_abs`, when given,
    is an absolute sigma in the model's input space. `base` is "gradient" or "gradxinput"
    (the gradient times the noisy input). Every parameter is checked before any pass runs.
    Rows are copy-major: row r is copy r // B of example r % B.
    """
    samples = positive_int(samples, "samples")
    if base not in ("gradient", "gradxinput"):
        raise SaliencyError(f"unknown SmoothGrad base {base!r}; use 'gradient' or 'gradxinput'")
    x = ctx.x.detach()
    b = x.shape[0]
    if noise_abs is not None:
        sigma = torch.full((b, *[1] * (x.dim() - 1)), positive_float(noise_abs, "noise_abs", allow_zero=True),
                           device=x.device, dtype=x.dtype)
    else:
        flat = x.reshape(b, -1)
        sigma = (positive_float(noise, "noise", allow_zero=True) * (flat.amax(1) - flat.amin(1))).view(b, *[1] * (x.dim() - 1))
    g = generator(ctx.seed)
    noisy = torch.cat([x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
                       for _ in range(samples)])
    rows = torch.arange(b, device=x.device).repeat(samples)
    if on_chunk is not None:
        chunked_gradient(ctx.subject, noisy, target, rows, batch_size or ctx.batch_size, ctx.counter,
                         layers=layers, input_grad=not layers, reduce=on_chunk)
        return noisy, rows
    grads = chunked_gradient(ctx.subject, noisy, target, rows, batch_size or ctx.batch_size, ctx.counter)
    if base == "gradxinput":
        grads = grads * noisy
    return grads.view(samples, b, *x.shape[1:]), rows


class _SmoothGradFamily(Method):
    layouts = ANY_LAYOUT
    family = "gradient"
    randomized = True
    cost = "25F+25B"
    defaults = {"samples": 25, "noise": 0.15, "noise_abs": None, "base": "gradient", "reduce": None,
                "batch_size": None}
    kind = "smoothgrad"

    def run(self, ctx, target, layer, samples=25, noise=0.15, noise_abs=None, base="gradient", reduce=None,
            batch_size=None):
        if reduce is None:
            reduce = ("max_abs" if base == "gradient" else "sum") if self.kind == "smoothgrad" else "sum"
        _check_reduce(reduce)
        grads, _ = noisy_gradients(ctx, target, samples, noise, noise_abs, base, batch_size)
        if self.kind == "smoothgrad":
            return _maps(grads.mean(0), reduce, ctx.layout)
        if self.kind == "smoothgrad_sq":
            attr = grads.pow(2).mean(0)  # squared before any channel reduction
        else:
            # E[g^2] - E[g]^2, accumulated in float64; exact arithmetic is >= 0, the clamp removes rounding
            gd = grads.double()
            attr = (gd.pow(2).mean(0) - gd.mean(0).pow(2)).clamp_min(0).to(grads.dtype)
        out = _maps(attr, reduce, ctx.layout)
        out["signed"] = False  # squares and variances are never negative
        return out


@register
class SmoothGrad(_SmoothGradFamily):
    name = "smoothgrad"
    description = "Mean gradient over noisy copies (Smilkov et al. 2017); noise = 0.15 x input range."
    kind = "smoothgrad"


@register
class SmoothGradSq(_SmoothGradFamily):
    name = "smoothgrad_sq"
    description = "Mean squared gradient over noisy copies (SmoothGrad^2, Hooker et al. 2019)."
    kind = "smoothgrad_sq"


@register
class VarGrad(_SmoothGradFamily):
    name = "vargrad"
    description = "Variance of the gradient over noisy copies (Adebayo et al. 2018)."
    kind = "vargrad"


class _DeconvReLUBackward(torch.autograd.Function):
    """Identity on the activation's output; backward passes ReLU(grad_out) to the activation's
    input, whatever that input was: DeconvNet's rule (Zeiler & Fergus).

    The guided rule needs no such function: it is the activation's own backward applied to
    ReLU(grad_out), which a gradient hook on the output gives for free.
    """

    @staticmethod
    def forward(ctx, inp, out):
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out.clamp_min(0), None


def _clamp_min_zero(grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp_min(0)


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _relu_calls() -> dict:
    """How each ReLU-family call is read: function -> (parameter names, defaults, in place
    (None: its `inplace` argument says), arguments -> (lo, hi) or None when the call is no ReLU)."""
    def plain(_b):
        return 0.0, None

    def hardtanh(b):
        lo, hi = _number(b["min_val"]), _number(b["max_val"])
        return (0.0, float(hi)) if lo == 0 and hi is not None and hi > 0 else None

    def clamp(b):
        lo, hi = _number(b.get("min")), b.get("max")
        if lo != 0 or (hi is not None and (_number(hi) is None or hi <= 0)):
            return None  # a tensor bound, another floor or no floor: not a ReLU
        return 0.0, None if hi is None else float(hi)

    def threshold(b):
        return (0.0, None) if _number(b["threshold"]) == 0 and _number(b["value"]) == 0 else None

    T = torch.Tensor
    calls = {
        F.relu: (("input", "inplace"), {"inplace": False}, None, plain),
        F.relu6: (("input", "inplace"), {"inplace": False}, None, lambda _b: (0.0, 6.0)),
        F.hardtanh: (("input", "min_val", "max_val", "inplace"), {"min_val": -1.0, "max_val": 1.0, "inplace": False},
                     None, hardtanh),
        F.threshold: (("input", "threshold", "value", "inplace"), {"inplace": False}, None, threshold),
    }
    for fn, inplace in ((torch.relu, False), (T.relu, False), (torch.relu_, True), (T.relu_, True)):
        calls[fn] = (("input",), {}, inplace, plain)
    for fn, inplace in ((torch.clamp, False), (T.clamp, False), (torch.clip, False), (T.clip, False),
                        (torch.clamp_, True), (T.clamp_, True), (T.clip_, True)):
        calls[fn] = (("input", "min", "max"), {"min": None, "max": None}, inplace, clamp)
    for fn, inplace in ((torch.clamp_min, False), (T.clamp_min, False), (torch.clamp_min_, True), (T.clamp_min_, True)):
        calls[fn] = (("input", "min"), {"min": None}, inplace, clamp)
    for fn, inplace in ((torch.threshold, False), (torch.threshold_, True)):
        calls[fn] = (("input", "threshold", "value"), {}, inplace, threshold)
    return calls


RELU_CALLS = _relu_calls()
# activations the ReLU rules do not define: reached, they pass ordinary gradients (said in extras)
OTHER_ACTIVATIONS = {"silu", "gelu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "mish", "elu", "selu", "celu",
                     "leaky_relu", "softplus", "prelu", "rrelu", "logsigmoid", "softsign", "glu"}


class ModifiedReLURule(TorchFunctionMode):
    """The guided backprop or DeconvNet rule on every ReLU-family call of the forwards run inside it.

    A torch-function mode sees each call of `F.relu`, `torch.relu`, `Tensor.relu`, `F.relu_`,
    `F.relu6`, `F.hardtanh(x, 0, t)`, `clamp(min=0)` / `clamp(0, t)`, `clamp_min(0)` and
    `F.threshold(x, 0, 0)` (and so the `nn.ReLU`, `nn.ReLU6` and `nn.Hardtanh(0, t)` modules,
    which call them), computes it as usual and attaches the modified backward to its output.
    Torch keeps its stack of such modes per thread, so the rule reaches the forwards of this
    thread only: another thread's call on the same model meanwhile keeps the ordinary rule.
    Nothing is patched and no module is hooked. Code torch functions do not see (a TorchScript
    module's graph) is not reached; `modified` says how much was.

    `modified` counts the ReLU-family calls reached; `others` the calls of other activations
    (SiLU, GELU, sigmoid, ...) by name, which pass ordinary gradients.
    """

    def __init__(self, guided: bool):
        super().__init__()
        self.guided = guided
        self.modified = 0
        self.others: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        spec = RELU_CALLS.get(func)
        if spec is None:
            out = func(*args, **kwargs)
            name = getattr(func, "__name__", "").rstrip("_")
            if name in OTHER_ACTIVATIONS and isinstance(out, torch.Tensor) and out.requires_grad:
                self.others[name] = self.others.get(name, 0) + 1
            return out
        names, defaults, inplace, read = spec
        bound = dict(defaults)
        bound.update(zip(names, args))
        bound.update(kwargs)
        inp = bound.get("input")
        limits = read(bound)
        if not isinstance(inp, torch.Tensor) or not inp.requires_grad or limits is None:
            return func(*args, **kwargs)
        self.modified += 1
        inplace = bool(bound.get("inplace")) if inplace is None else inplace
        if self.guided:
            # The activation's own backward already multiplies by 1[lo < x < hi]; clipping the
            # gradient that reaches its output makes that the guided rule, with no extra copy of
            # the activation and no Python function in the graph. A hook on a tensor changed in
            # place attaches to its new value, so in-place calls are reached as well.
            out = func(*args, **kwargs)
            out.register_hook(_clamp_min_zero)
            return out
        if not inplace:
            return _DeconvReLUBackward.apply(inp, func(*args, **kwargs))
        # in place: the caller's tensor must hold the output, and its new value must backpropagate
        # by the DeconvNet rule to its old one (kept by the clone) rather than by the ReLU's own
        before = inp.clone()
        with torch.no_grad():
            out = func(*args, **kwargs)
        return out.copy_(_DeconvReLUBackward.apply(before, out.detach()))


def modified_relu_backward(guided: bool) -> ModifiedReLURule:
    """The rule for one call's forwards: `with modified_relu_backward(True): ...` (per thread)."""
    return ModifiedReLURule(guided)


def _rule_report(rule: ModifiedReLURule, method: str) -> dict:
    """What the rule reached, for `extras`; a warning when it reached nothing or not every activation."""
    others = ", ".join(f"{name} x{n}" for name, n in sorted(rule.others.items()))
    if rule.modified == 0:
        warnings.warn(f"{method} reached no ReLU-family activation of this model (none, or none that torch "
                      f"functions see, as in a TorchScript module): the map is the plain gradient"
                      + (f"; its activations ({others}) pass ordinary gradients" if others else ""), stacklevel=4)
    elif others:
        warnings.warn(f"{method} is defined for ReLU-family activations; this model also has {others}, "
                      "which pass ordinary gradients", stacklevel=4)
    return {"relu_rule": {"modified_calls": rule.modified, "other_activation_calls": dict(sorted(rule.others.items()))}}


class _ModifiedBackprop(Method):
    layouts = ANY_LAYOUT
    family = "gradient"
    cost = "1F+1B"
    defaults = {"reduce": "max_abs"}
    guided = True

    @classmethod
    def prime(cls, ctx):
        """When this method runs first and alone needs the clean forward, record that forward
        under the modified rule, so the target forward is also this method's forward."""
        ctx.prime_under(("modified_relu", cls.guided), modified_relu_backward(cls.guided))

    def run(self, ctx, target, layer, reduce="max_abs"):
        _check_reduce(reduce)
        primed = ctx.own_input_gradient(("modified_relu", self.guided), target)
        if primed is not None:
            g, rule = primed
        else:
            with modified_relu_backward(self.guided) as rule:
                g = _input_gradient(ctx, target, reuse_primed=False)
        out = _maps(g, reduce, ctx.layout)
        out["extras"] = _rule_report(rule, self.name)
        return out


@register
class GuidedBackprop(_ModifiedBackprop):
    name = "guided_backprop"
    aliases = ("gbp",)
    description = "Backprop passing only positive gradients through positive ReLU inputs (Springenberg 2015)."
    guided = True


@register
class DeconvNet(_ModifiedBackprop):
    name = "deconvnet"
    description = "Backprop passing positive gradients through every ReLU (Zeiler & Fergus 2014)."
    guided = False
