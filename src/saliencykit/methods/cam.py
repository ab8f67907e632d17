"""CAM family (METHODS.md 11-19): CAM, Grad-CAM, Grad-CAM++, Smooth Grad-CAM++, HiResCAM,
XGrad-CAM, LayerCAM, Score-CAM, Eigen-CAM.

Every gradient CAM is a function of one capture (activations A and gradients G of the target
layer from one forward + one backward). The capture is cached in the call's Context, so asking
for several CAMs of the same layer and target costs a single pass.

Raw maps are at layer resolution (`Explanation.raw`, [B,h,w]); `maps` are upsampled bilinearly
(align_corners=False) to the input size, not normalised. With several layers, each layer's map
is upsampled and min-max normalised, then the maps are averaged (LayerCAM: element-wise max).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import forward_logits, forward_scores, upsample
from ..errors import SaliencyError
from .base import Method, register
from .gradient import noisy_gradients

EPS = 1e-7


def resolve_layers(ctx, layer) -> list[str]:
    layers = layer if isinstance(layer, (list, tuple)) else [layer]
    if not layers:
        raise SaliencyError("empty layer list")
    return [ctx.subject.find_layer(item, ctx.x)[0] for item in layers]


def as_grid(ctx, name: str, t: torch.Tensor) -> torch.Tensor:
    """Layer output -> [B,C,h,w] (token outputs of transformers become a patch grid)."""
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        return ctx.subject.tokens_to_grid(t, tuple(ctx.x.shape[-2:]), layer=name)
    raise SaliencyError(f"layer {name!r} outputs shape {tuple(t.shape)}; CAM methods need a spatial map "
                        "[B,C,h,w] or tokens [B,N,D]; choose a convolutional layer")


def normalize01(m: torch.Tensor) -> torch.Tensor:
    flat = m.reshape(m.shape[0], -1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    out = torch.where(hi - lo > 1e-12, (flat - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(flat))
    return out.view_as(m)


def fuse_layers(raws: list[torch.Tensor], size, how: str = "mean") -> torch.Tensor:
    if len(raws) == 1:
        return upsample(raws[0], size)
    ups = [normalize01(upsample(r, size)) for r in raws]
    stacked = torch.stack(ups)
    return stacked.amax(0) if how == "max" else stacked.mean(0)


class _GradCamBase(Method):
    """A CAM computed from (A, G) of one shared capture."""

    family = "cam"
    cost = "1F+1B"
    uses_layer = True
    defaults = {"relu": True}
    fuse = "mean"

    def combine(self, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run(self, ctx, target, layer, relu=True, **params):
        names = resolve_layers(ctx, layer)
        res = ctx.capture(names, target)
        raws = []
        for i, name in enumerate(names):
            A = as_grid(ctx, name, res.activations[name]).float()
            G = as_grid(ctx, name, res.gradients[name]).float()
            m = self.combine(A, G, **params) if params else self.combine(A, G)
            raws.append(m.clamp_min(0) if relu else m)
        maps = fuse_layers(raws, ctx.x.shape[-2:], self.fuse)
        return {"maps": maps, "raw": raws[0] if len(raws) == 1 else None, "layer": ",".join(names),
                "signed": not relu}


@register
class GradCAM(_GradCamBase):
    name = "gradcam"
    aliases = ("grad_cam",)
    description = "Channel weights = spatial mean of gradients (Selvaraju et al. 2017)."

    def combine(self, A, G):
        return (G.mean((2, 3), keepdim=True) * A).sum(1)


@register
class GradCAMPlusPlus(_GradCamBase):
    name = "gradcam_pp"
    aliases = ("gradcampp", "gradcam++", "grad_cam_plus_plus")
    description = "Grad-CAM++ (Chattopadhay et al. 2018): higher-order pixel weights under exp(score)."

    def combine(self, A, G):
        return (gradcam_pp_weights(A, G, G, G.pow(2), G.pow(3)) * A).sum(1)


def gradcam_pp_weights(A, D1, G_unused, D2, D3):
    """w_k = sum_ij alpha_kij ReLU(D1_kij), alpha = D2 / (2 D2 + sum_ab A_kab D3); alpha = 0 where D2 = 0."""
    sum_a = A.sum((2, 3), keepdim=True)
    denom = 2 * D2 + sum_a * D3
    alpha = torch.where(D2 != 0, D2 / torch.where(denom != 0, denom, torch.full_like(denom, EPS)),
                        torch.zeros_like(D2))
    return (alpha * D1.clamp_min(0)).sum((2, 3), keepdim=True)


@register
class HiResCAM(_GradCamBase):
    name = "hirescam"
    description = "Element-wise gradient x activation summed over channels (Draelos & Carin 2020)."

    def combine(self, A, G):
        return (G * A).sum(1)


@register
class XGradCAM(_GradCamBase):
    name = "xgradcam"
    aliases = ("xgrad_cam",)
    description = "Channel weights = sum(G*A)/sum(A) (Fu et al. 2020)."

    def combine(self, A, G):
        w = (G * A).sum((2, 3), keepdim=True) / (A.sum((2, 3), keepdim=True) + EPS)
        return (w * A).sum(1)


@register
class LayerCAM(_GradCamBase):
    name = "layercam"
    aliases = ("layer_cam",)
    description = "ReLU(gradient) x activation per location (Jiang et al. 2021); works at shallow layers."
    fuse = "max"

    def combine(self, A, G):
        return (G.clamp_min(0) * A).sum(1)


def _head_linear(model: nn.Module, channels: int) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1].in_features != channels:
        found = f"last linear layer has {linears[-1].in_features} inputs" if linears else "no linear layer"
        raise SaliencyError(f"CAM needs a global-average-pool + linear head fed by the chosen layer "
                            f"({channels} channels; {found}); use gradcam or hirescam instead")
    return linears[-1]


@register
class CAM(Method):
    name = "cam"
    family = "cam"
    cost = "1F"
    uses_layer = True
    defaults = {"relu": True}
    description = ("Class activation map (Zhou et al. 2016): classifier weights x last feature map; "
                   "needs a GAP + linear head. Contrast/Group targets use the target's derivative "
                   "w.r.t. the logits to combine class weights.")

    def run(self, ctx, target, layer, relu=True):
        names = resolve_layers(ctx, layer)
        if len(names) != 1:
            raise SaliencyError("cam takes a single layer (the one feeding global pooling)")
        name = names[0]
        acts, logits = ctx.activations(names)
        A = as_grid(ctx, name, acts[name]).float()
        fc = _head_linear(ctx.subject.model, A.shape[1])
        # d score / d logits: one-hot for a class, +/- for a contrast, softmax-weights for a group
        with torch.enable_grad():
            lg = logits.detach().float().requires_grad_(True)
            (dlogits,) = torch.autograd.grad(target.score(lg).sum(), lg)
        w = dlogits @ fc.weight.detach().float()          # [B,C]
        m = torch.einsum("bc,bchw->bhw", w, A)
        if relu:
            m = m.clamp_min(0)
        return {"maps": upsample(m, ctx.x.shape[-2:]), "raw": m, "layer": name, "signed": not relu}


@register
class SmoothGradCAMPlusPlus(Method):
    name = "smooth_gradcam_pp"
    aliases = ("smoothgradcampp", "smooth_gradcam++")
    family = "cam"
    cost = "11F+11B"
    uses_layer = True
    randomized = True
    defaults = {"samples": 10, "noise": 0.15, "noise_abs": None, "relu": True, "batch_size": None}
    description = ("Grad-CAM++ with gradient moments averaged over noisy copies (Omeiza et al. 2019); "
                   "activations from the clean input.")

    def run(self, ctx, target, layer, samples=10, noise=0.15, noise_abs=None, relu=True, batch_size=None):
        names = resolve_layers(ctx, layer)
        clean = ctx.capture(names, target)
        b = ctx.batch
        sums = {n: [0.0, 0.0, 0.0] for n in names}

        def accumulate(start, res):
            for n in names:
                g = as_grid(ctx, n, res.gradients[n]).float()
                ex = torch.arange(start, start + g.shape[0], device=g.device) % b
                for p in range(3):
                    acc = torch.zeros((b, *g.shape[1:]), device=g.device)
                    acc.index_add_(0, ex, g.pow(p + 1))
                    sums[n][p] = sums[n][p] + acc

        noisy_gradients(ctx, target, samples, noise, noise_abs, "gradient", batch_size, layers=names,
                        on_chunk=accumulate)
        raws = []
        for n in names:
            A = as_grid(ctx, n, clean.activations[n]).float()
            D1, D2, D3 = (s / samples for s in sums[n])
            m = (gradcam_pp_weights(A, D1, None, D2, D3) * A).sum(1)
            raws.append(m.clamp_min(0) if relu else m)
        return {"maps": fuse_layers(raws, ctx.x.shape[-2:]), "raw": raws[0] if len(raws) == 1 else None,
                "layer": ",".join(names), "signed": not relu}


@register
class ScoreCAM(Method):
    name = "scorecam"
    aliases = ("score_cam",)
    family = "cam"
    cost = "(C+2)F"
    uses_layer = True
    defaults = {"weighting": "paper", "batch_size": None, "relu": True}
    description = ("Channel weights from the score of the input masked by each upsampled, normalised "
                   "channel (Wang et al. 2020). weighting='paper' (prob increase over the zero baseline), "
                   "'official' (masked prob, maps accumulated on upsampled channels) or 'channel_softmax'.")

    def run(self, ctx, target, layer, weighting="paper", batch_size=None, relu=True):
        if weighting not in ("paper", "official", "channel_softmax"):
            raise SaliencyError(f"unknown Score-CAM weighting {weighting!r}; use paper, official or channel_softmax")
        names = resolve_layers(ctx, layer)
        if len(names) != 1:
            raise SaliencyError("scorecam takes a single layer")
        name = names[0]
        acts, _ = ctx.activations(names)
        A = as_grid(ctx, name, acts[name]).float()
        b, c = A.shape[:2]
        size = tuple(ctx.x.shape[-2:])
        align = weighting == "channel_softmax"
        x = ctx.x.detach()
        flat = A.reshape(b, c, -1)
        lo, hi = flat.amin(2), flat.amax(2)
        valid = (hi - lo) > 1e-12   # constant channels carry no spatial information: skipped

        def masks(start, stop):
            idx = torch.arange(start, stop, device=A.device)
            ex, ch = idx // c, idx % c
            up = F.interpolate(A[ex, ch].unsqueeze(1), size=size, mode="bilinear", align_corners=align)
            l, h = lo[ex, ch].view(-1, 1, 1, 1), hi[ex, ch].view(-1, 1, 1, 1)
            return up, (up - l) / (h - l).clamp_min(1e-12), ex

        def make_inputs(start, stop):
            _, norm, ex = masks(start, stop)
            return x[ex] * norm

        output = "logit" if weighting == "channel_softmax" else "prob"
        scores = forward_scores(ctx.subject, make_inputs, b * c, target,
                                rows_of=lambda s, e: torch.arange(s, e, device=A.device) // c,
                                batch_size=batch_size or ctx.batch_size, counter=ctx.counter, output=output,
                                progress=ctx.progress, desc="scorecam").view(b, c)
        if weighting == "channel_softmax":
            w = scores.masked_fill(~valid, float("-inf")).softmax(1)
        elif weighting == "paper":
            base = target.score(forward_logits(ctx.subject, torch.zeros_like(x), counter=ctx.counter), output="prob")
            w = scores - base.view(b, 1)
        else:
            w = scores
        w = torch.where(valid, w, torch.zeros_like(w))
        if weighting == "official":
            maps = torch.zeros(b, *size, device=A.device)
            bs = batch_size or 64
            for start in range(0, b * c, bs):
                stop = min(b * c, start + bs)
                up, _, ex = masks(start, stop)
                idx = torch.arange(start, stop, device=A.device)
                maps.index_add_(0, ex, up.squeeze(1) * w[ex, idx % c].view(-1, 1, 1))
            raw = None
            if relu:
                maps = maps.clamp_min(0)
        else:
            raw = torch.einsum("bc,bchw->bhw", w, A)
            if relu:
                raw = raw.clamp_min(0)
            maps = upsample(raw, size)
        return {"maps": maps, "raw": raw, "layer": name, "signed": not relu,
                "extras": {"skipped_constant_channels": int((~valid).sum())}}


@register
class EigenCAM(Method):
    name = "eigencam"
    aliases = ("eigen_cam",)
    family = "cam"
    cost = "1F"
    uses_layer = True
    defaults = {"relu": True, "sign_correction": True}
    description = ("First principal component of the centred activations (Muhammad & Yeasin 2020); "
                   "class-agnostic. The component's sign is chosen to correlate positively with the "
                   "channel-mean activation.")

    def run(self, ctx, target, layer, relu=True, sign_correction=True):
        names = resolve_layers(ctx, layer)
        raws = []
        acts, _ = ctx.activations(names)
        for name in names:
            A = as_grid(ctx, name, acts[name]).float()
            raws.append(eigen_projection(A, sign_correction))
        raws = [r.clamp_min(0) if relu else r for r in raws]
        return {"maps": fuse_layers(raws, ctx.x.shape[-2:]), "raw": raws[0] if len(raws) == 1 else None,
                "layer": ",".join(names), "signed": not relu}


def eigen_projection(A: torch.Tensor, sign_correction: bool = True) -> torch.Tensor:
    b, c, h, w = A.shape
    X = A.reshape(b, c, h * w).transpose(1, 2)          # [B, hw, C]
    X = X - X.mean(1, keepdim=True)                     # centre each channel over positions
    X = torch.nan_to_num(X)
    _, _, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    proj = (X.double() @ Vh[:, 0, :].unsqueeze(-1)).squeeze(-1).float()   # [B, hw]
    if sign_correction:
        ref = A.mean(1).reshape(b, -1)
        ref = ref - ref.mean(1, keepdim=True)
        sign = torch.sign((proj * ref).sum(1))
        proj = proj * torch.where(sign == 0, torch.ones_like(sign), sign).view(b, 1)
    return proj.view(b, h, w)
