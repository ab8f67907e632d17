"""Gradient family: saliency, gradient x input, SmoothGrad / SmoothGrad^2 / VarGrad,
Integrated Gradients, guided backpropagation and DeconvNet.

Input-space methods keep the signed `[B,C,H,W]` attributions in `Explanation.attributions`
and reduce channels for the map (`reduce=`).
"""
from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine import chunked_gradient, generator, reduce_channels
from ..errors import SaliencyError, positive_float, positive_int
from ..filters import gaussian_blur
from .base import Method, register

SIGNED_REDUCTIONS = ("sum", "mean")


def _maps(attr: torch.Tensor, reduce: str) -> dict:
    return {"maps": reduce_channels(attr, reduce), "attributions": attr, "signed": reduce in SIGNED_REDUCTIONS}


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
        return _maps(g.abs() if abs else g, reduce)


@register
class GradientXInput(Method):
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
        return _maps(ctx.x.detach() * g, reduce)


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
        sigma = torch.full((b, 1, 1, 1), positive_float(noise_abs, "noise_abs", allow_zero=True), device=x.device, dtype=x.dtype)
    else:
        flat = x.reshape(b, -1)
        sigma = (positive_float(noise, "noise", allow_zero=True) * (flat.amax(1) - flat.amin(1))).view(b, 1, 1, 1)
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
            return _maps(grads.mean(0), reduce)
        if self.kind == "smoothgrad_sq":
            attr = grads.pow(2).mean(0)  # squared before any channel reduction
        else:
            # E[g^2] - E[g]^2, accumulated in float64; exact arithmetic is >= 0, the clamp removes rounding
            gd = grads.double()
            attr = (gd.pow(2).mean(0) - gd.mean(0).pow(2)).clamp_min(0).to(grads.dtype)
        out = _maps(attr, reduce)
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


class _ModifiedReLUBackward(torch.autograd.Function):
    """Identity on the activation's output; backward replaces the ReLU rule.

    guided:   grad_in = ReLU(grad_out) * 1[lo < x < hi]     (Springenberg et al.)
    deconv:   grad_in = ReLU(grad_out)                       (Zeiler & Fergus)

    `modified_relu_backward` uses it for DeconvNet only: the guided rule is the activation's own
    backward applied to ReLU(grad_out), which a gradient hook on the output gives for free.
    """

    @staticmethod
    def forward(ctx, inp, out, lo, hi, guided):
        ctx.save_for_backward(inp)
        ctx.lo, ctx.hi, ctx.guided = lo, hi, guided
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out):
        (inp,) = ctx.saved_tensors
        grad_in = grad_out.clamp_min(0)
        if ctx.guided:
            mask = inp > ctx.lo
            if ctx.hi is not None:
                mask = mask & (inp < ctx.hi)
            grad_in = grad_in * mask
        return grad_in, None, None, None, None


def _clamp_min_zero(grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp_min(0)


def _relu_range(module: nn.Module):
    if isinstance(module, nn.ReLU):
        return 0.0, None
    if isinstance(module, nn.ReLU6):
        return 0.0, 6.0
    if isinstance(module, nn.Hardtanh) and module.min_val == 0:
        return 0.0, float(module.max_val)
    return None


NON_RELU = (nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus)


@contextlib.contextmanager
def modified_relu_backward(model: nn.Module, guided: bool):
    """Swap the backward rule of every ReLU-family activation: `nn.ReLU`, `nn.ReLU6`,
    `nn.Hardtanh(0, t)` modules (forward hooks) and the functional `F.relu` / `F.relu6`
    (patched for the duration; restored on exit, also after an exception)."""
    others = sorted({type(m).__name__ for m in model.modules() if isinstance(m, NON_RELU)})
    if others:
        warnings.warn(f"{'guided backprop' if guided else 'DeconvNet'} is defined for ReLU-family activations; "
                      f"this model also has {', '.join(others)}, which pass ordinary gradients", stacklevel=4)
    handles = []
    original_relu, original_relu6 = F.relu, F.relu6

    def modify(inp, out, lo, hi):
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return None
        if guided:
            # The activation's own backward already multiplies by 1[lo < x < hi]; clipping the
            # gradient that reaches its output makes that the guided rule, with no extra copy
            # of the activation and no Python function in the graph.
            out.register_hook(_clamp_min_zero)
            return None
        return _ModifiedReLUBackward.apply(inp, out, lo, hi, guided)

    def relu(input, inplace=False):  # functional ReLUs (e.g. DenseNet's last) are invisible to hooks
        out = original_relu(input, inplace=False)
        new = modify(input, out, 0.0, None)
        return out if new is None else new

    def relu6(input, inplace=False):
        out = original_relu6(input, inplace=False)
        new = modify(input, out, 0.0, 6.0)
        return out if new is None else new

    try:
        for m in model.modules():
            rng = _relu_range(m)
            if rng is None:
                continue

            def hook(_mod, inp, out, lo=rng[0], hi=rng[1]):
                return modify(inp[0], out, lo, hi)

            handles.append(m.register_forward_hook(hook))
        F.relu, F.relu6 = relu, relu6
        yield
    finally:
        F.relu, F.relu6 = original_relu, original_relu6
        for h in handles:
            h.remove()


class _ModifiedBackprop(Method):
    family = "gradient"
    cost = "1F+1B"
    defaults = {"reduce": "max_abs"}
    guided = True

    @classmethod
    def prime(cls, ctx):
        """When this method runs first and alone needs the clean forward, record that forward
        under the modified rule, so the target forward is also this method's forward."""
        ctx.prime_under(("modified_relu", cls.guided), modified_relu_backward(ctx.subject.model, cls.guided))

    def run(self, ctx, target, layer, reduce="max_abs"):
        _check_reduce(reduce)
        g = ctx.own_input_gradient(("modified_relu", self.guided), target)
        if g is None:
            with modified_relu_backward(ctx.subject.model, self.guided):
                g = _input_gradient(ctx, target, reuse_primed=False)
        return _maps(g, reduce)


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
