"""CAM family: CAM, Grad-CAM, Grad-CAM++, Smooth Grad-CAM++, HiResCAM,
XGrad-CAM, LayerCAM, Score-CAM, Eigen-CAM, CF-CAM (channel clustering with scikit-learn DBSCAN and
filtered cluster gradients).

Every gradient CAM is a function of one capture (activations A and gradients G of the target
layer from one forward + one backward). The capture is cached in the call's Context, so asking
for several CAMs of the same layer and target costs a single pass.

Raw maps are at layer resolution (`Explanation.raw`, [B,h,w]); `maps` are upsampled bilinearly
(align_corners=False) to the input size, not normalised. With several layers, each layer's map
is upsampled and min-max normalised, then the maps are averaged (LayerCAM: each normalised map
is scaled by tanh(2 M / max M), then the element-wise max is taken).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import forward_logits, perturbed_scores, upsample
from ..errors import SaliencyError
from .along_axes import keep_mask, perturbed_axes
from .base import Method, register
from .gradient import noisy_gradients

EPS = 1e-7


def resolve_layers(ctx, layer) -> list[str]:
    """`layer` (a name, a module, "auto" or a list of those) -> unique layer names, in order."""
    layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not layers:
        raise SaliencyError("the layer list is empty; give at least one layer name (or 'auto')")
    names = []
    for item in layers:
        name = ctx.subject.find_layer(item, ctx.x)[0]
        if name not in names:
            names.append(name)
    return names


def _spatial(t: torch.Tensor) -> tuple:
    """The axes after the channel axis of a layer map: (2, 3) for [B,C,h,w], (2,) for a series'
    [B,C,t], (2, 3, 4) for a volume's [B,C,d,h,w]."""
    return tuple(range(2, t.dim()))


def map_size(ctx) -> tuple:
    """The axes of the call's maps: the input's axes but its channel axis ((T,H,W) for a clip)."""
    return perturbed_axes(ctx.x, ctx.layout)[0]


def as_grid(ctx, name: str, t: torch.Tensor) -> torch.Tensor:
    """Layer output -> [B,C,h,w] (token outputs of transformers become a patch grid); a series'
    or a volume's layer keeps its [B,C,t] / [B,C,d,h,w]; a clip's layer is [B,C,t,h,w] (a 3-D
    convolution's output as it is, a frame-by-frame layer's [B*T,C,h,w] with its frames put back
    on a time axis)."""
    if ctx.layout != "BCHW":
        b, frames = ctx.x.shape[:2]
        if ctx.layout == "BTCHW" and t.dim() == 4 and t.shape[0] == b * frames:
            return t.reshape(b, frames, *t.shape[1:]).transpose(1, 2)
        if t.dim() != ctx.x.dim():
            per_frame = (" or a frame-by-frame layer [B*T,C,h,w]" if ctx.layout == "BTCHW" else "")
            raise SaliencyError(f"layer {name!r} outputs shape {tuple(t.shape)}; a CAM of a {ctx.layout} input needs "
                                f"a layer map with {ctx.x.dim()} axes like the input's{per_frame}; choose a "
                                "convolutional layer")
        return t
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        return ctx.subject.tokens_to_grid(t, tuple(ctx.x.shape[-2:]), layer=name)
    raise SaliencyError(f"layer {name!r} outputs shape {tuple(t.shape)}; CAM methods need a spatial map "
                        "[B,C,h,w] or tokens [B,N,D]; choose a convolutional layer")


def normalize01(m: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max to [0,1]; a constant map becomes zeros (never NaN)."""
    flat = m.reshape(m.shape[0], -1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    out = torch.where(hi - lo > 1e-12, (flat - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(flat))
    return out.view_as(m)


def fuse_layers(raws: list[torch.Tensor], size, how: str = "mean") -> torch.Tensor:
    """Upsample each layer's map to `size`; several layers: normalise each and fuse.

    "mean": average of min-max normalised maps (pytorch-grad-cam's multi-layer rule).
    "tanh_max": LayerCAM's rule, each map scaled by tanh(2 M / max M), then element-wise max.
    """
    if len(raws) == 1:
        return upsample(raws[0], size)
    ups = [normalize01(upsample(r, size)) for r in raws]
    if how == "tanh_max":
        return torch.stack([torch.tanh(2.0 * u) for u in ups]).amax(0)
    return torch.stack(ups).mean(0)


def _finish(ctx, names, raws, relu, how="mean", extras=None) -> dict:
    raws = [r.clamp_min(0) if relu else r for r in raws]
    out = {"maps": fuse_layers(raws, map_size(ctx), how), "raw": raws[0] if len(raws) == 1 else None,
           "layer": ",".join(names), "signed": not relu}
    if extras:
        out["extras"] = extras
    return out


class _GradCamBase(Method):
    """A CAM computed from (A, G) of one shared capture (one forward + one backward)."""

    family = "cam"
    cost = "1F+1B"
    uses_layer = True
    clean_pass = True
    defaults = {"relu": True}
    fuse = "mean"
    # 1-D maps upsample linearly, 3-D ones (volumes, clips) trilinearly; a flat input has no axes
    layouts = ("BCHW", "BCT", "BCDHW", "BTCHW")
    not_for = {"BF": "a CAM weighs the channels of a layer map, and a flat input's layers have no axes to map"}

    def combine(self, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run(self, ctx, target, layer, relu=True):
        names = resolve_layers(ctx, layer)
        res = ctx.capture(names, target)
        raws = []
        for name in names:
            A = as_grid(ctx, name, res.activations[name]).float()
            G = as_grid(ctx, name, res.gradients[name]).float()
            raws.append(self.combine(A, G))
        return _finish(ctx, names, raws, relu, self.fuse)


@register
class GradCAM(_GradCamBase):
    name = "gradcam"
    aliases = ("grad_cam",)
    description = "Channel weights = spatial mean of gradients (Selvaraju et al. 2017)."

    def combine(self, A, G):
        return (G.mean(_spatial(G), keepdim=True) * A).sum(1)


@register
class GradCAMPlusPlus(_GradCamBase):
    name = "gradcam_pp"
    aliases = ("gradcampp", "gradcam++", "grad_cam_plus_plus")
    description = "Grad-CAM++ (Chattopadhay et al. 2018): higher-order pixel weights under exp(score)."

    def combine(self, A, G):
        return (gradcam_pp_weights(A, G, G.pow(2), G.pow(3)) * A).sum(1)


def gradcam_pp_weights(A, D1, D2, D3):
    """w_k = sum_ij alpha_kij ReLU(D1_kij), alpha = D2 / (2 D2 + sum_ab A_kab D3); alpha = 0 where D2 = 0.

    Grad-CAM++ passes D1, D2, D3 = G, G^2, G^3; Smooth Grad-CAM++ their means over noisy copies.
    """
    sum_a = A.sum(_spatial(A), keepdim=True)
    denom = 2 * D2 + sum_a * D3
    safe = torch.where(denom != 0, denom, torch.full_like(denom, EPS))
    alpha = torch.where(D2 != 0, D2 / safe, torch.zeros_like(D2))
    return (alpha * D1.clamp_min(0)).sum(_spatial(D1), keepdim=True)


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
    description = "Channel weights = sum(G*A)/sum(A) (Fu et al. 2020); channels with sum(A) = 0 get weight 0."

    def combine(self, A, G):
        num = (G * A).sum(_spatial(A), keepdim=True)
        den = A.sum(_spatial(A), keepdim=True) + EPS
        w = torch.where(den.abs() > 1e-12, num / torch.where(den.abs() > 1e-12, den, torch.ones_like(den)),
                        torch.zeros_like(num))
        return (w * A).sum(1)


@register
class LayerCAM(_GradCamBase):
    name = "layercam"
    aliases = ("layer_cam",)
    description = ("ReLU(gradient) x activation per location (Jiang et al. 2021); works at shallow layers; "
                   "several layers are fused by max of tanh(2 M / max M).")
    fuse = "tanh_max"

    def combine(self, A, G):
        return (G.clamp_min(0) * A).sum(1)


def _gap_linear_head(model: nn.Module, A: torch.Tensor, logits: torch.Tensor, layer: str) -> nn.Linear:
    """The linear layer L with L(GAP(A)) == logits, checked numerically; else a clear error."""
    c = A.shape[1]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    candidates = [m for m in reversed(linears) if m.in_features == c and m.out_features == logits.shape[1]]
    pooled = A.mean(_spatial(A)).double()
    ref = logits.detach().double()
    tol = 1e-3 * (ref.abs().max().item() + 1e-6)
    for lin in candidates:
        pred = pooled @ lin.weight.detach().double().t()
        if lin.bias is not None:
            pred = pred + lin.bias.detach().double()
        if (pred - ref).abs().max().item() <= tol:
            return lin
    found = (f"the last linear layer has {linears[-1].in_features} inputs" if linears and not candidates
             else "no linear layer" if not linears
             else "a linear layer of matching size exists but linear(mean(A)) does not reproduce the logits")
    raise SaliencyError(f"cam needs layer {layer!r} ({c} channels) to feed a global-average-pool + linear head "
                        f"directly ({found}); use gradcam or hirescam for this model/layer")


@register
class CAM(Method):
    name = "cam"
    family = "cam"
    cost = "1F"
    uses_layer = True
    clean_pass = True
    defaults = {"relu": True}
    description = ("Class activation map (Zhou et al. 2016): classifier weights x last feature map; "
                   "needs a GAP + linear head (checked). Contrast/Group targets use the target's derivative "
                   "w.r.t. the logits to combine class weights.")
    layouts = _GradCamBase.layouts
    not_for = _GradCamBase.not_for

    def run(self, ctx, target, layer, relu=True):
        names = resolve_layers(ctx, layer)
        if len(names) != 1:
            raise SaliencyError("cam takes a single layer (the one feeding global average pooling)")
        name = names[0]
        acts, logits = ctx.activations(names)
        A = as_grid(ctx, name, acts[name]).float()
        fc = _gap_linear_head(ctx.subject.model, A, logits, name)
        # d score / d logits: one-hot for a class, +/- for a contrast, softmax-weights for a group
        with torch.enable_grad():
            lg = logits.detach().float().requires_grad_(True)
            (dlogits,) = torch.autograd.grad(target.score(lg).sum(), lg)
        w = dlogits @ fc.weight.detach().float()          # [B,C]
        m = torch.einsum("bc,bc...->b...", w, A)
        return _finish(ctx, names, [m], relu)


@register
class SmoothGradCAMPlusPlus(Method):
    name = "smooth_gradcam_pp"
    aliases = ("smoothgradcampp", "smooth_gradcam++")
    family = "cam"
    cost = "11F+10B"
    uses_layer = True
    clean_pass = True
    randomized = True
    defaults = {"samples": 10, "noise": 0.15, "noise_abs": None, "relu": True, "batch_size": None}
    description = ("Grad-CAM++ with gradient moments D1, D2, D3 averaged over all noisy copies (Omeiza et al. "
                   "2019); activations from the clean input. noise = std as a fraction of the input range "
                   "(noise_abs: absolute std).")
    # a clip's frame-by-frame layer comes back in chunks of noisy rows, which the clip's frame count
    # alone cannot fold back: series and volumes only
    layouts = ("BCHW", "BCT", "BCDHW")
    not_for = _GradCamBase.not_for

    def run(self, ctx, target, layer, samples=10, noise=0.15, noise_abs=None, relu=True, batch_size=None):
        names = resolve_layers(ctx, layer)
        clean, _ = ctx.activations(names)   # reuses a capture of these layers if one was made
        b = ctx.batch
        sums = {n: [0.0, 0.0, 0.0] for n in names}

        def accumulate(start, res):
            for n in names:
                g = as_grid(ctx, n, res.gradients[n]).float()
                ex = torch.arange(start, start + g.shape[0], device=g.device) % b   # copy-major rows
                for p in range(3):
                    acc = torch.zeros((b, *g.shape[1:]), device=g.device)
                    acc.index_add_(0, ex, g.pow(p + 1))
                    sums[n][p] = sums[n][p] + acc

        noisy_gradients(ctx, target, samples, noise, noise_abs, "gradient", batch_size, layers=names,
                        on_chunk=accumulate)
        raws = []
        for n in names:
            A = as_grid(ctx, n, clean[n]).float()
            D1, D2, D3 = (s / samples for s in sums[n])
            raws.append((gradcam_pp_weights(A, D1, D2, D3) * A).sum(1))
        return _finish(ctx, names, raws, relu)


@register
class ScoreCAM(Method):
    name = "scorecam"
    aliases = ("score_cam",)
    family = "cam"
    cost = "(C+2)F"
    uses_layer = True
    clean_pass = True
    defaults = {"weighting": "paper", "batch_size": None, "relu": True}
    layouts = ("BCHW", "BCT", "BCDHW", "BTCHW")   # channel masks upsampled linearly / trilinearly
    not_for = _GradCamBase.not_for
    description = ("Channel weights from the score of the input masked by each upsampled, min-max normalised "
                   "channel, blended towards a zero baseline (Wang et al. 2020). weighting='paper': increase of "
                   "the target probability over the zero input; 'official': masked probability; "
                   "'channel_softmax': softmax over channels of the masked logits (pytorch-grad-cam). "
                   "Constant channels are skipped (weight 0, no forward pass); channels with the same normalised "
                   "map are scored once.")

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
        size, ca = perturbed_axes(ctx.x, ctx.layout)   # the map's axes: (H,W), (T,), (D,H,W), (T,H,W)
        axes = tuple(range(2, 2 + len(size)))
        # pytorch-grad-cam upsamples with align_corners=True; the paper/official variants with False
        align = weighting == "channel_softmax"
        x = ctx.x.detach()
        flat = A.reshape(b, c, -1)
        valid = (flat.amax(2) - flat.amin(2)) > 1e-12   # constant channels carry no spatial information
        ex_all, ch_all = valid.nonzero(as_tuple=True)   # only these (example, channel) pairs are scored
        # Channels of one example that are affine copies of each other (a' = s*a + t, s > 0; e.g. one
        # active cell at the same place) make the same normalised mask, so the same masked input:
        # each group with equal normalised maps (float32) is scored once (resnet50 layer4 on a
        # photo: 1937 -> 1900 passes; EfficientNet-Lite0's head: 534 -> 488).
        g = flat[ex_all, ch_all].double()
        norm = ((g - g.amin(1, keepdim=True)) / (g.amax(1, keepdim=True) - g.amin(1, keepdim=True))).float()
        _, inverse = torch.unique(torch.cat([ex_all[:, None].float(), norm], 1), dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1 if inverse.numel() else 0,), inverse.numel(), dtype=torch.long,
                           device=inverse.device)
        first.scatter_reduce_(0, inverse, torch.arange(inverse.numel(), device=inverse.device), reduce="amin")
        ex_u, ch_u = ex_all[first], ch_all[first]

        def masks(start, stop):
            ex, ch = ex_u[start:stop], ch_u[start:stop]
            # bilinear for an image, linear for a series, trilinear for a volume or a clip (engine.upsample)
            up = upsample(A[ex, ch].unsqueeze(1), size, align_corners=align)
            lo = up.amin(axes, keepdim=True)
            hi = up.amax(axes, keepdim=True)
            return ex, keep_mask(((up - lo) / (hi - lo).clamp_min(1e-12))[:, 0], ca)

        output = "logit" if weighting == "channel_softmax" else "prob"
        scores = perturbed_scores(ctx.subject, x, torch.zeros_like(x), target, masks, int(ex_u.numel()),
                                  batch_size=batch_size or ctx.batch_size, counter=ctx.counter, output=output,
                                  progress=ctx.progress, desc="scorecam")[inverse]
        S = torch.full((b, c), float("-inf") if weighting == "channel_softmax" else 0.0, device=A.device)
        S[ex_all, ch_all] = scores.float().to(A.device)
        if weighting == "channel_softmax":
            w = S.softmax(1)
        elif weighting == "paper":
            base = target.score(forward_logits(ctx.subject, torch.zeros_like(x), counter=ctx.counter),
                                output="prob")
            w = S - base.view(b, 1).to(S)
        else:
            w = S
        w = torch.where(valid, w, torch.zeros_like(w))   # also clears NaN of an all-constant layer
        raw = torch.einsum("bc,bc...->b...", w, A)
        return _finish(ctx, [name], [raw], relu,
                       extras={"skipped_constant_channels": int((~valid).sum()),
                               "duplicate_channels": int(ex_all.numel() - ex_u.numel()), "channel_weights": w,
                               "weighting": weighting})


@register
class EigenCAM(Method):
    name = "eigencam"
    aliases = ("eigen_cam",)
    family = "cam"
    cost = "1F"
    uses_layer = True
    clean_pass = True
    defaults = {"relu": True, "sign_correction": True}
    description = ("First principal component of the centred activations (Muhammad & Yeasin 2020); "
                   "class-agnostic. The component's sign is chosen to correlate positively with the "
                   "channel-mean activation.")
    layouts = _GradCamBase.layouts
    not_for = _GradCamBase.not_for

    def run(self, ctx, target, layer, relu=True, sign_correction=True):
        names = resolve_layers(ctx, layer)
        acts, _ = ctx.activations(names)
        raws = [eigen_projection(as_grid(ctx, n, acts[n]).float(), sign_correction) for n in names]
        return _finish(ctx, names, raws, relu)


def eigen_projection(A: torch.Tensor, sign_correction: bool = True) -> torch.Tensor:
    """Per image: X = positions x channels, columns centred; returns X v1 (= sigma1 u1) as [B,h,w]
    (a series' [B,t], a volume's or a clip's [B,d,h,w])."""
    b, c, spatial = A.shape[0], A.shape[1], A.shape[2:]
    X = torch.nan_to_num(A.double()).reshape(b, c, -1).transpose(1, 2)   # [B, hw, C]
    X = X - X.mean(1, keepdim=True)                     # centre each channel over positions
    _, _, Vh = torch.linalg.svd(X, full_matrices=False)
    proj = (X @ Vh[:, 0, :].unsqueeze(-1)).squeeze(-1)   # [B, hw]
    if sign_correction:
        ref = torch.nan_to_num(A.double()).mean(1).reshape(b, -1)
        ref = ref - ref.mean(1, keepdim=True)
        sign = torch.sign((proj * ref).sum(1))
        proj = proj * torch.where(sign == 0, torch.ones_like(sign), sign).view(b, 1)
    return proj.float().view(b, *spatial)


# =========================================================================== CF-CAM
def _cluster_filter(gbar: torch.Tensor, spatial_sigma: float, range_sigma: float | None) -> torch.Tensor:
    """Filter a cluster's mean gradient map ([h,w]; a series' [t], a volume's or a clip's [d,h,w])
    with a normalised kernel of the map's size: a Gaussian of the distance to the map's centre
    times (unless range_sigma is None) a range term exp(-(g - mean g)^2 / 2 rs^2); convolution
    over the map's axes with 'same' zero padding."""
    shape = tuple(gbar.shape)
    nd = len(shape)
    r2 = None
    for i, n in enumerate(shape):       # squared distance to the centre, one axis at a time
        c = (torch.arange(n, dtype=gbar.dtype, device=gbar.device) - n // 2) ** 2
        c = c.view(*([1] * i), n, *([1] * (nd - i - 1)))
        r2 = c if r2 is None else r2 + c
    k = torch.exp(-r2 / (2 * spatial_sigma ** 2))
    if range_sigma is not None:
        k = k * torch.exp(-(gbar - gbar.mean()) ** 2 / (2 * range_sigma ** 2))
    k = k / k.sum().clamp_min(1e-30)
    # 'same' zero padding, the extra row/column of an even kernel on the far side (last axis first)
    pad = tuple(p for n in reversed(shape) for p in ((n - 1) // 2, (n - 1) - (n - 1) // 2))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return conv(F.pad(gbar.view(1, 1, *shape), pad), k.view(1, 1, *shape))[0, 0]


def cf_cam_map(A: torch.Tensor, G: torch.Tensor, spatial_sigma: float = 5.0, range_sigma: float | None = 0.1,
               importance_percentile: float = 75.0, eps_percentile: float = 25.0,
               min_samples_fraction: float = 0.05) -> tuple[torch.Tensor, dict]:
    """CF-CAM of one example from activations and gradients [C,h,w] -> ReLU map [h,w] and info
    (a series' [C,t] -> [t], a volume's [C,d,h,w] -> [d,h,w]).

    Important channels (activation norm >= the 75th percentile) keep the mean gradient as weight;
    the others are clustered with scikit-learn's DBSCAN (Euclidean, eps = 25th percentile of the
    off-diagonal pairwise distances, min_samples = max(2, floor(0.05 n))); noise channels are dropped;
    each cluster member gets the mean of the filtered cluster-mean gradient. Weights are softmaxed
    over the valid channels.
    """
    from sklearn.cluster import DBSCAN

    A = A.detach().double().cpu()
    G = G.detach().double().cpu()
    c = A.shape[0]
    vec = A.reshape(c, -1)
    norms = vec.norm(dim=1)
    important = norms >= torch.quantile(norms, importance_percentile / 100.0)
    weights = torch.full((c,), float("nan"), dtype=torch.float64)
    axes = tuple(range(1, A.dim()))
    weights[important] = G[important].mean(axes)
    rest = torch.nonzero(~important).flatten()
    n_clusters = 0
    if rest.numel() >= 2:
        d = torch.cdist(vec[rest], vec[rest])
        off = d[~torch.eye(len(rest), dtype=torch.bool)]
        eps = max(float(torch.quantile(off, eps_percentile / 100.0)), 1e-5)
        min_samples = max(2, int(math.floor(min_samples_fraction * len(rest))))
        labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(d.numpy())
        labels = torch.from_numpy(labels)
        for lab in sorted(set(labels.tolist()) - {-1}):
            members = rest[labels == lab]
            gbar = G[members].mean(0)
            weights[members] = _cluster_filter(gbar, spatial_sigma, range_sigma).mean()
            n_clusters += 1
    valid = ~torch.isnan(weights)
    w = torch.softmax(weights[valid], 0)
    cam = torch.relu((w.view(-1, *([1] * len(axes))) * A[valid]).sum(0))
    info = {"clusters": n_clusters, "important": int(important.sum()), "noise": int(c - valid.sum())}
    return cam, info


@register
class CFCAM(Method):
    name = "cf_cam"
    aliases = ("cfcam",)
    family = "cam"
    cost = "1F+1B"
    uses_layer = True
    description = ("CF-CAM: high-norm channels weighted by mean gradient, the rest clustered with DBSCAN "
                   "(scikit-learn) and weighted by filtered cluster gradients; softmax weights; map / max. "
                   "Series, volumes and clips too: the cluster filter is a Gaussian over the layer map's axes.")
    layouts = _GradCamBase.layouts
    not_for = _GradCamBase.not_for
    defaults = {"spatial_sigma": 5.0, "range_sigma": 0.1, "importance_percentile": 75.0,
                "eps_percentile": 25.0, "min_samples_fraction": 0.05}

    def run(self, ctx, target, layer, spatial_sigma=5.0, range_sigma=0.1, importance_percentile=75.0,
            eps_percentile=25.0, min_samples_fraction=0.05):
        if spatial_sigma <= 0 or (range_sigma is not None and range_sigma <= 0):
            raise SaliencyError("spatial_sigma and range_sigma must be > 0 (range_sigma=None: spatial filter only)")
        for nm, p in (("importance_percentile", importance_percentile), ("eps_percentile", eps_percentile)):
            if not 0 <= p <= 100:
                raise SaliencyError(f"{nm} must be in [0, 100], got {p!r}")
        names = resolve_layers(ctx, layer)
        if len(names) != 1:
            raise SaliencyError("cf_cam takes one layer")
        res = ctx.capture(names, target)
        A = as_grid(ctx, names[0], res.activations[names[0]]).float()
        G = as_grid(ctx, names[0], res.gradients[names[0]]).float()
        raws, infos = [], []
        for i in range(A.shape[0]):
            m, info = cf_cam_map(A[i], G[i], spatial_sigma, range_sigma, importance_percentile, eps_percentile,
                                 min_samples_fraction)
            raws.append(m.float().to(A.device))
            infos.append(info)
        raw = torch.stack(raws)
        maps = upsample(raw, map_size(ctx))
        peak = maps.reshape(maps.shape[0], -1).amax(1).view(-1, *([1] * (maps.dim() - 1)))
        maps = torch.where(peak > 0, maps / peak.clamp_min(1e-30), maps)
        return {"maps": maps, "raw": raw, "layer": names[0], "extras": {"clusters": infos}}
