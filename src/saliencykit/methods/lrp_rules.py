"""The LRP rules as forward hooks (used by `methods.propagation`'s `lrp_relevance`, and through
it by CRP): `RuleHooks` keeps each Conv/Linear output but routes its gradient through the layer's
rule, so that value x gradient is the relevance everywhere; `PassThrough` hands relevance
unchanged through element-wise activations (`unsupported="identity"`). Every hook answers only
the calling thread and is removed when its `with` ends."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SaliencyError
from ..hooks import this_thread_only

RULES = ("epsilon", "zero", "gamma", "alpha_beta", "zplus", "flat", "zbox")
FIRST_ONLY = ("flat", "zbox")

#: element-wise activations: relevance can pass through them unchanged (`unsupported="identity"`,
#: Zennit's Pass rule and Captum's treatment of Tanh)
ELEMENTWISE = (nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU,
               nn.Mish, nn.Softplus)

def _stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))


class HookSet:
    """Forward hooks (this thread's calls only) on `self.modules`, put on at `with` and removed at
    its end, whatever happens inside."""

    modules: list = []

    def __enter__(self):
        self.handles = [m.register_forward_hook(this_thread_only(self.hook)) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        return False


class PassThrough(HookSet):
    """Forward hooks on element-wise activations y = f(z) that keep y but give it the local
    derivative y / z, so relevance R = value * gradient passes unchanged: R_z = z * (y / z) * g_y =
    R_y (where z = 0 the relevance there, if any, is dropped: it has no gradient form)."""

    def __init__(self, modules):
        self.modules = list(modules)

    @staticmethod
    def hook(_m, inputs, out):
        z = inputs[0]
        if not isinstance(out, torch.Tensor) or not isinstance(z, torch.Tensor) or z.shape != out.shape:
            return None
        path = z * _ratio(out.detach(), z.detach())
        return out.detach() + (path - path.detach())



class RuleHooks(HookSet):
    """Forward hooks that keep each Conv/Linear output but route its gradient through an LRP rule."""

    def __init__(self, model, assign, first_rule, xin, eps, gamma, alpha, beta, low, high, user_set=()):
        self.model, self.assign, self.first_rule, self.xin = model, assign, first_rule, xin
        self.modules = list(assign)
        self.user_set = set(user_set)  # layers whose rule the caller chose (wins over the first-layer rule)
        self.eps, self.gamma, self.alpha, self.beta = eps, gamma, alpha, beta
        self.low, self.high = low, high
        self.leaves: list[torch.Tensor] = []  # extra relevance carriers of the first layer (flat, z-box)
        self.seen_first = False
        self.busy = False

    def _call(self, m, a, wmod, bmod):
        w = wmod(m.weight)
        params = {"weight": w}
        if m.bias is not None:
            params["bias"] = bmod(m.bias)
        return torch.func.functional_call(m, params, (a,))

    def hook(self, m, inputs, out):
        if self.busy or not isinstance(out, torch.Tensor):
            return None
        rule = self.assign[m]
        if not self.seen_first:
            self.seen_first = True
            if self.first_rule is not None and m not in self.user_set:
                rule = self.first_rule
        a = inputs[0]
        if rule in FIRST_ONLY and a is not self.xin and not self._input_view(a):
            raise SaliencyError(f"LRP rule {rule!r} belongs to the first layer, whose input must be the model input; "
                                f"layer {type(m).__name__} receives a transformed tensor; use another composite")
        self.busy = True
        try:
            path = self._path(m, a, out.detach(), rule)
        finally:
            self.busy = False
        return out.detach() + (path - path.detach())

    def _input_view(self, a) -> bool:
        """Whether `a` is a view of the model input (a clip model's permute to [B,C,T,H,W], its
        frames flattened to [B*T,C,H,W]): the first-layer rules then apply through the same view."""
        return isinstance(a, torch.Tensor) and a._base is self.xin

    def _like_input(self, a, full: torch.Tensor) -> torch.Tensor:
        """A leaf laid out like the model input (`full`, shaped as the input: its relevance adds to
        the input's) seen through the view that `a` is of the input (`a` itself when it is the input)."""
        leaf = torch.empty_like(self.xin, requires_grad=False).copy_(full).requires_grad_(True)
        self.leaves.append(leaf)
        return leaf.as_strided(a.size(), a.stride(), a.storage_offset() - self.xin.storage_offset())

    def _path(self, m, a, z, rule):
        ident = lambda p: p  # noqa: E731
        pos = lambda p: p.clamp(min=0)  # noqa: E731
        neg = lambda p: p.clamp(max=0)  # noqa: E731
        zero = torch.zeros_like
        call = lambda inp, w, b: self._call(m, inp, w, b)  # noqa: E731
        if rule in ("epsilon", "zero"):
            zp = call(a, ident, ident)
            eps = 0.0 if rule == "zero" else self.eps
            return zp * _ratio(z, _stab(zp.detach(), eps)).detach()
        if rule == "zplus":
            zp = call(a.clamp(min=0), pos, pos) + call(a.clamp(max=0), neg, zero)
            return zp * _ratio(z, _stab(zp.detach(), self.eps)).detach()
        if rule == "alpha_beta":
            zp = call(a.clamp(min=0), pos, pos) + call(a.clamp(max=0), neg, zero)
            zn = call(a.clamp(min=0), neg, neg) + call(a.clamp(max=0), pos, zero)
            return (self.alpha * zp * _ratio(z, _stab(zp.detach(), self.eps)).detach()
                    - self.beta * zn * _ratio(z, _stab(zn.detach(), self.eps)).detach())
        if rule == "gamma":
            g = self.gamma
            up = lambda p: p + g * p.clamp(min=0)  # noqa: E731
            dn = lambda p: p + g * p.clamp(max=0)  # noqa: E731
            zp = call(a.clamp(min=0), up, up) + call(a.clamp(max=0), dn, zero)
            zn = call(a.clamp(min=0), dn, dn) + call(a.clamp(max=0), up, zero)
            sp = torch.where(z > 0, _ratio(z, _stab(zp.detach(), self.eps)), torch.zeros_like(z))
            sn = torch.where(z < 0, _ratio(z, _stab(zn.detach(), self.eps)), torch.zeros_like(z))
            return zp * sp.detach() + zn * sn.detach()
        if rule == "flat":
            if a is self.xin:
                ones = torch.ones_like(a).requires_grad_(True)
                self.leaves.append(ones)
            else:   # a view of the input: the leaf has the input's shape
                ones = self._like_input(a, torch.ones((), dtype=a.dtype, device=a.device))
            zp = call(ones, lambda p: torch.ones_like(p), zero)
            return zp * _ratio(z, _stab(zp.detach(), self.eps)).detach()
        if rule == "zbox":
            if a is self.xin:
                low = self.low.to(a).expand_as(a).clone().requires_grad_(True)
                high = self.high.to(a).expand_as(a).clone().requires_grad_(True)
                self.leaves += [low, high]
            else:   # bounds given in the input's layout, seen through the same view as the input
                low = self._like_input(a, self.low.to(self.xin).expand_as(self.xin))
                high = self._like_input(a, self.high.to(self.xin).expand_as(self.xin))
            zp = call(a, ident, ident) - call(low, pos, pos) - call(high, neg, neg)
            return zp * _ratio(z, _stab(zp.detach(), self.eps)).detach()
        raise SaliencyError(f"unknown LRP rule {rule!r}; use one of {', '.join(RULES)}")
