"""Perturbation family: occlusion, RISE, LIME, KernelSHAP, extremal perturbation and meaningful
perturbation.

Occlusion, RISE, LIME and KernelSHAP are forward-only and run on the shared perturbation runner
`engine.perturbed_scores` (chunked, `torch.inference_mode()`, passes counted there). The two
optimised-mask methods need gradients w.r.t. the mask and run their own small optimisation
loops; each step is one batched forward + backward over all examples (and areas), counted.

Conventions:
- `output=None` scores with the target's own output (logits unless the Target says otherwise);
  RISE and LIME default to softmax probabilities, as their reference code does.
- Baselines ("zero"/"black", "mean", "blur", "white", "noise", a pixel value or a tensor) are
  those of `gradient.make_baseline`: "mean" is 0 in the model's normalised space (the dataset
  mean colour), "zero" is the black image.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..engine import generator, perturbed_scores, with_progress
from ..errors import SaliencyError, positive_float, positive_int
from ..filters import gaussian_blur
from ..targets import OUTPUTS
from .base import Method, register
from .surrogates import SURROGATES
from .along_axes import (RiseMasks, feature_segments, keep_mask, occlusion_along_axes,  # noqa: F401
                         perturbed_axes, rise_cells, series_segments, time_segments, volume_segments, window_starts)
from ..subject import channel_axis
from .gradient import make_baseline


# ----------------------------------------------------------------------------- helpers

def _pair(value, what: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
        raise SaliencyError(f"{what} must be an int or a pair of ints (height, width), got {value!r}")
    if min(value) < 1:
        raise SaliencyError(f"{what} must be >= 1, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _output(target, output) -> str:
    out = target.output if output is None else output
    if out not in OUTPUTS:
        raise SaliencyError(f"output must be one of {OUTPUTS} or None (the target's own), got {output!r}")
    return out


def _clean_scores(ctx, target, output: str) -> torch.Tensor:
    """Target scores of the unperturbed inputs (the clean pass is shared by the call)."""
    return target.score(ctx.logits(), output=output)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The perturbation substrates' blur: radius ceil(3 sigma), replicate padding (no dark border)."""
    return gaussian_blur(x, sigma, radius=max(1, math.ceil(3 * sigma)), padding="replicate")


def _median_blur(x: torch.Tensor, size: int) -> torch.Tensor:
    """Median filter over size x size windows (replicate padding), channel by channel."""
    r = size // 2
    b, c, h, w = x.shape
    out = torch.empty_like(x)
    padded = F.pad(x, (r, r, r, r), mode="replicate")
    for start in range(0, h, 32):   # row bands keep the unfolded copy small
        stop = min(h, start + 32)
        band = padded[:, :, start:stop + 2 * r]
        cols = F.unfold(band, size)                                   # [B, C*size^2, rows*W]
        med = cols.view(b, c, size * size, -1).median(dim=2).values
        out[:, :, start:stop] = med.view(b, c, stop - start, w)
    return out


def _steps(ctx, steps: int, desc: str):
    return with_progress(range(steps), desc, enabled=ctx.progress)


def _baseline(ctx, baseline) -> torch.Tensor:
    return make_baseline(ctx.subject, ctx.x.detach(), baseline, seed=ctx.seed)


# ----------------------------------------------------------------------------- occlusion

@register
class Occlusion(Method):
    name = "occlusion"
    family = "perturbation"
    cost = "1 + #windows F (784 at 224x224, patch 15, stride 8)"
    signed = True
    defaults = {"patch": None, "stride": None, "baseline": "mean", "output": None}
    description = ("Slide a patch (all channels) over the image, replace it by a baseline and record the "
                   "score drop s(x) - s(x_occluded); each pixel gets the mean drop of the windows covering "
                   "it (Zeiler & Fergus 2014). baseline: 'mean' (0 in normalised space), 'zero', 'blur' "
                   "or a tensor. patch/stride: an int or one per axis; None: 15 and 8 (images, series, "
                   "volumes, clips), 1 and 1 on feature vectors and on token ids through an embedding (each "
                   "feature / token alone; a token's default baseline is the baseline embedding).")

    layouts = ("BCHW", "BCT", "BCDHW", "BTCHW", "BF")

    def run(self, ctx, target, layer, patch=None, stride=None, baseline="mean", output=None):
        # one sliding-window occlusion for every layout (methods.along_axes); token ids seen through
        # their embedding (`embedding.EmbeddingView`) are occluded one token at a time by default,
        # each replaced by the baseline embedding (zeros, or the subject's baseline_token's)
        flat = ctx.layout == "BF" or getattr(ctx.subject, "token_view", False)
        baseline = _token_baseline(ctx, baseline, "mean")
        patch = (1 if flat else 15) if patch is None else patch
        stride = (1 if flat else 8) if stride is None else stride
        out = occlusion_along_axes(ctx, target, patch, stride, _output(target, output), _baseline(ctx, baseline))
        out["extras"].update(patch=patch, stride=stride)
        out["used"] = {"patch": patch, "stride": stride}
        return out


# ----------------------------------------------------------------------------- RISE

@register
class Rise(Method):
    name = "rise"
    family = "perturbation"
    cost = "N F (N = n_masks = 4000)"
    randomized = True
    defaults = {"n_masks": 4000, "cell": None, "p": 0.5, "output": "prob", "classes": None}
    description = ("Randomised Input Sampling (Petsiuk et al. 2018): S = sum_i score(x * M_i) M_i / (N p) over "
                   "N random smooth masks (cell x cell Bernoulli(p) grids, bilinear upsampling, random "
                   "shifts). Softmax probabilities by default (the authors' code). classes=[...] or 'all' "
                   "also returns per-class maps from the same N passes (extras['class_maps']). Any layout: "
                   "masks over the axes but the channel axis (cell: an int or one per axis; None: 7, at "
                   "most the axis length; on a feature vector one Bernoulli(p) draw per feature).")

    layouts = ("BCHW", "BCT", "BCDHW", "BTCHW", "BF")

    def run(self, ctx, target, layer, n_masks=4000, cell=None, p=0.5, output="prob", classes=None):
        x = ctx.x.detach()
        axes, ca = perturbed_axes(x, ctx.layout)
        b = x.shape[0]
        n = positive_int(n_masks, "rise n_masks")
        cells = rise_cells(cell, axes, ctx.layout)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise SaliencyError(f"rise p (keep probability) must be in (0, 1], got {p!r}")
        hw = math.prod(axes)
        out = _output(target, output)
        k_classes = ctx.logits().shape[1]
        if classes is None:
            cls_idx = None
        elif isinstance(classes, str) and classes == "all":
            cls_idx = torch.arange(k_classes, device=x.device)
        else:
            if isinstance(classes, (int, str)):
                classes = [classes]
            cls_idx = torch.tensor([ctx.subject.class_index(c, k_classes) for c in classes], dtype=torch.long,
                                   device=x.device)
        if cls_idx is not None and b * len(cls_idx) * hw * 4 > 4 * 2 ** 30:
            raise SaliencyError(f"rise classes: {len(cls_idx)} per-class maps of {b} x {' x '.join(map(str, axes))} "
                                "need more than 4 GiB; ask for the classes you need (classes=[...])")
        gen = RiseMasks(n, cells, float(p), axes, ctx.seed, device=x.device)
        acc = torch.zeros(b, hw, device=x.device, dtype=torch.float64)
        # float32 per-class maps: B x classes x H x W (classes="all" on 1000 classes at 224 px is 200 MB
        # per image; ask for the classes needed)
        acc_cls = (torch.zeros(b, len(cls_idx), hw, device=x.device, dtype=torch.float32)
                   if cls_idx is not None else None)
        current: dict = {}

        def masks(start, stop):
            idx = torch.arange(start, stop, device=x.device)
            ex, mi = idx // n, idx % n
            m = gen(mi)[:, 0]                                   # [k, *axes]
            current["rows"], current["m"] = ex, m
            return ex, keep_mask(m, ca)

        def on_chunk(start, stop, logits, scores):
            ex, m = current["rows"], current["m"].flatten(1).double()
            acc.index_add_(0, ex, scores.double().view(-1, 1) * m)
            if acc_cls is not None:
                per_class = target.transform(logits, out)[:, cls_idx]   # [k, C]
                acc_cls.index_add_(0, ex, per_class.unsqueeze(2) * m.float().unsqueeze(1))

        perturbed_scores(ctx.subject, x, torch.zeros_like(x), target, masks, b * n, batch_size=ctx.batch_size,
                         counter=ctx.counter, output=out, progress=ctx.progress, desc="rise", on_chunk=on_chunk)
        norm = n * float(p)
        maps = (acc / norm).float().view(b, *axes)
        extras = {"cell": cells}   # the grid used (None: one draw per feature)
        if acc_cls is not None:
            extras["class_maps"] = (acc_cls / norm).float().view(b, len(cls_idx), *axes)
            extras["classes"] = cls_idx.tolist()
        # the cell recorded as given: one int when every axis has the same (an image's 7), else per axis
        used = cells if cells is None or len(set(cells)) > 1 else cells[0]
        return {"maps": maps, "signed": out == "log_prob" or target.kind == "contrast", "extras": extras,
                "used": {"cell": used}}


# ----------------------------------------------------------------------------- LIME / KernelSHAP

def grid_segments(h: int, w: int, cells: int) -> torch.Tensor:
    """`[h, w]` long labels of a `cells` x `cells` grid of blocks: fixed superpixels for
    `lime` / `kernelshap` (`segments=grid_segments(H, W, 7)`) that do not depend on the image."""
    ys = torch.arange(h) * cells // h
    xs = torch.arange(w) * cells // w
    return ys.view(-1, 1) * cells + xs.view(1, -1)


def superpixels(subject, x: torch.Tensor, n_segments: int = 50, compactness: float = 10.0,
                segments=None) -> tuple[torch.Tensor, list[int]]:
    """[B,H,W] long segment ids 0..M_b-1 per example, and the M_b. SLIC (scikit-image) on the
    unnormalised image unless `segments` ([H,W] or [B,H,W] integer labels) is given."""
    b, _, h, w = x.shape
    if segments is not None:
        seg = torch.as_tensor(segments)
        if seg.is_floating_point() or seg.dtype == torch.bool:
            raise SaliencyError(f"segments must be an integer label map, got dtype {seg.dtype}")
        if seg.dim() == 2:
            seg = seg.unsqueeze(0).expand(b, h, w) if tuple(seg.shape) == (h, w) else seg
        if seg.dim() != 3 or tuple(seg.shape) != (b, h, w):
            raise SaliencyError(f"segments must have shape (H, W) = {(h, w)} or (B, H, W) = {(b, h, w)}, "
                                f"got {tuple(torch.as_tensor(segments).shape)}")
        seg = seg.to(x.device).long()
    else:
        from skimage.segmentation import slic

        n_segments = positive_int(n_segments, "n_segments", 2)
        pix = subject.unnormalize(x.detach()).permute(0, 2, 3, 1).cpu().double().numpy()
        seg = torch.stack([torch.from_numpy(np.asarray(
            slic(pix[i] if pix.shape[-1] > 1 else pix[i, ..., 0], n_segments=n_segments, compactness=compactness,
                 start_label=0, channel_axis=-1 if pix.shape[-1] > 1 else None))).long()
            for i in range(b)]).to(x.device)
    out, counts = [], []
    for i in range(b):    # relabel to consecutive ids
        _, inv = torch.unique(seg[i], return_inverse=True)
        out.append(inv)
        counts.append(int(inv.max()) + 1)
    if min(counts) < 2:
        row = counts.index(min(counts))
        if segments is not None:
            raise SaliencyError(f"the given segments make a single segment in example {row}: there is nothing to "
                                "switch on and off; give at least two segments")
        # more segments do not help here: SLIC merges a region-less image (noise, a flat colour) into one
        raise SaliencyError(f"SLIC found a single segment in example {row} (an image without regions, such as "
                            f"noise or a flat colour), so there is nothing to switch on and off; pass "
                            f"segments=grid_segments({h}, {w}, 7) (saliencykit.methods.perturbation) for a "
                            "grid of cells, or your own [H,W] label map")
    return torch.stack(out), counts


def _segment_baseline(x: torch.Tensor, seg: torch.Tensor, counts: list[int], ca: int | None = 1) -> torch.Tensor:
    """Each pixel replaced by the mean colour of its segment (LIME's hide_color=None); a series'
    steps by the mean of their time segment, channel by channel; a feature by its group's mean.
    `ca`: the input's channel axis (2 for a clip, None for features)."""
    if ca is None:   # no channel axis (features)
        return _segment_baseline(x.unsqueeze(1), seg, counts).squeeze(1)
    if ca != 1:
        return _segment_baseline(x.movedim(ca, 1), seg, counts).movedim(1, ca)
    b, c = x.shape[:2]
    n = seg[0].numel()   # pixels (or time steps) per channel
    m = max(counts)
    flat = seg.reshape(b, 1, n).expand(b, c, n)
    sums = torch.zeros(b, c, m, dtype=x.dtype, device=x.device).scatter_add_(2, flat, x.reshape(b, c, n))
    size = torch.zeros(b, 1, m, dtype=x.dtype, device=x.device).scatter_add_(
        2, seg.reshape(b, 1, n), torch.ones(b, 1, n, dtype=x.dtype, device=x.device))
    means = sums / size.clamp_min(1)
    return means.gather(2, flat).view(x.shape)


def _coalition_scores(ctx, target, z: torch.Tensor, seg: torch.Tensor, base: torch.Tensor, out: str,
                      desc: str) -> torch.Tensor:
    """Scores of x with the segments where z == 0 replaced by the baseline. z: [B, S, M]."""
    x = ctx.x.detach()
    b, s, m = z.shape
    segflat = seg.reshape(b, -1)

    def masks(start, stop):
        idx = torch.arange(start, stop, device=x.device)
        ex, j = idx // s, idx % s
        keep = z[ex, j].gather(1, segflat[ex])                 # [k, HW]
        return ex, keep_mask(keep.view(-1, *seg.shape[1:]), channel_axis(ctx.layout))

    return perturbed_scores(ctx.subject, x, base, target, masks, b * s, batch_size=ctx.batch_size,
                            counter=ctx.counter, output=out, progress=ctx.progress, desc=desc).view(b, s)


def _paint(coef: list[torch.Tensor], seg: torch.Tensor) -> torch.Tensor:
    return torch.stack([c.to(seg.device).float()[seg[i]] for i, c in enumerate(coef)])


def _token_baseline(ctx, baseline, default):
    """Token ids seen through their embedding (`embedding.EmbeddingView`): a method's default
    baseline means the baseline embedding there (zeros, or the subject's baseline_token's)."""
    if getattr(ctx.subject, "token_view", False) and isinstance(baseline, str) and baseline == default:
        return "black"
    return baseline


def _segment_params(ctx, n_segments, segments, compactness):
    if getattr(ctx.subject, "token_view", False) and segments is None:   # token ids: each token alone
        return series_segments(ctx.x, ctx.x.shape[-1], None)
    if ctx.layout == "BCT":   # a series: time segments
        return series_segments(ctx.x, n_segments, segments)
    if ctx.layout in ("BCDHW", "BTCHW"):   # a volume or a clip: supervoxels
        return volume_segments(ctx.x, n_segments, compactness, segments, ctx.subject, ctx.layout)
    if ctx.layout == "BF":   # features: each alone, or the given groups
        return feature_segments(ctx.x, segments)
    seg, counts = superpixels(ctx.subject, ctx.x, n_segments, compactness, segments)
    return seg, counts


@register
class Lime(Method):
    name = "lime"
    family = "perturbation"
    cost = "n_samples F (1000)"
    signed = True
    randomized = True
    defaults = {"n_samples": 1000, "n_segments": 50, "segments": None, "compactness": 10.0,
                "baseline": "segment_mean", "kernel_width": 0.25, "surrogate": "ridge", "alpha": None,
                "output": "prob"}
    # a series' features are equal time segments, a volume's or a clip's supervoxels, a feature vector's its features
    layouts = ("BCHW", "BCT", "BCDHW", "BTCHW", "BF")
    description = ("LIME on superpixels (Ribeiro et al. 2016): random on/off superpixel samples (first one "
                   "all on), hidden ones filled with their mean colour; weighted ridge regression "
                   "(alpha=1, intercept) with kernel sqrt(exp(-d^2/w^2)), d = cosine distance to the "
                   "all-on sample, w=0.25; coefficients painted on the superpixels. SLIC segments by "
                   "default (n_segments), or segments=[H,W] labels. surrogate='lasso' fits scikit-learn's "
                   "weighted Lasso instead (Captum's default surrogate; alpha defaults to 0.01 there). Series: equal "
                   "time segments; volumes and clips: SLIC supervoxels; feature vectors: each feature alone (hidden ones "
                   "take 0) or segments=[F] groups; token ids through an embedding: each token alone, hidden ones "
                   "take the baseline embedding.")
    #: alpha of each surrogate when none is given (ridge: LIME's; lasso: Captum's SkLearnLasso default)
    DEFAULT_ALPHA = {"ridge": 1.0, "lasso": 0.01}

    def run(self, ctx, target, layer, n_samples=1000, n_segments=50, segments=None, compactness=10.0,
             baseline="segment_mean", kernel_width=0.25, surrogate="ridge", alpha=None, output="prob"):
        n = positive_int(n_samples, "lime n_samples", 2)
        width = positive_float(kernel_width, "lime kernel_width")
        if surrogate not in SURROGATES:
            raise SaliencyError(f"lime surrogate must be one of {', '.join(SURROGATES)}, got {surrogate!r}")
        alpha = self.DEFAULT_ALPHA[surrogate] if alpha is None else alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
            raise SaliencyError(f"lime alpha must be >= 0, got {alpha!r}")
        fit = SURROGATES[surrogate]
        out = _output(target, output)
        seg, counts = _segment_params(ctx, n_segments, segments, compactness)
        b, mmax = len(counts), max(counts)
        baseline = _token_baseline(ctx, baseline, "segment_mean")
        if baseline == "segment_mean" and ctx.layout == "BF" and segments is None:
            baseline = "mean"   # a feature alone is its own mean: hidden features take 0 instead
        base = (_segment_baseline(ctx.x.detach(), seg, counts, channel_axis(ctx.layout)) if baseline == "segment_mean"
                else _baseline(ctx, baseline))
        g = generator(ctx.seed)
        z = (torch.rand(b, n, mmax, generator=g) < 0.5).to(ctx.x.device, torch.float32)
        z[:, 0] = 1
        y = _coalition_scores(ctx, target, z, seg, base, out, "lime")
        coefs, intercepts, weights_all = [], [], []
        for i, m in enumerate(counts):
            zi = z[i, :, :m].double()
            on = zi.sum(1)
            d = 1 - on.sqrt() / math.sqrt(m)           # cosine distance to the all-ones vector
            d = torch.where(on > 0, d, torch.ones_like(d))
            wts = torch.sqrt(torch.exp(-d ** 2 / width ** 2))
            beta, c = fit(zi, y[i], wts, float(alpha))
            coefs.append(beta)
            intercepts.append(float(c))
            weights_all.append(wts)
        return {"maps": _paint(coefs, seg), "signed": True,
                "extras": {"segments": seg, "coefficients": [c.float() for c in coefs], "intercept": intercepts,
                           "surrogate": surrogate, "alpha": float(alpha), "baseline": baseline
                           if isinstance(baseline, str) else "given"}}


def shapley_kernel(m: int, size: torch.Tensor) -> torch.Tensor:
    """(M-1) / (C(M,|z|) |z| (M-|z|)) for 0 < |z| < M."""
    size = size.double()
    logc = torch.lgamma(torch.tensor(m + 1.0, dtype=torch.float64)) - torch.lgamma(size + 1) - torch.lgamma(m - size + 1)
    return (m - 1) / (torch.exp(logc) * size * (m - size))


def _kernelshap_samples(m: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Coalitions (without the empty and the full one) and their regression weights.

    Exact mode when all 2^M - 2 coalitions fit in n: every coalition, weighted by the Shapley kernel.
    Otherwise sizes k ~ (M-1)/(k(M-k)), a uniform subset of that size and its complement (paired
    sampling), weight 1 each: the kernel is then carried by the sampling distribution.
    """
    if m <= 20 and (1 << m) - 2 <= n:
        codes = torch.arange(1, (1 << m) - 1)
        z = ((codes.unsqueeze(1) >> torch.arange(m)) & 1).double()
        return z, shapley_kernel(m, z.sum(1)), True
    ks = torch.arange(1, m, dtype=torch.float64)
    pk = (m - 1) / (ks * (m - ks))
    half = (n + 1) // 2
    sizes = torch.multinomial(pk / pk.sum(), half, replacement=True, generator=g) + 1
    order = torch.rand(half, m, generator=g).argsort(1)
    z = (order < sizes.unsqueeze(1)).double()       # a uniform subset of each size
    z = torch.cat([z, 1 - z])[:n]
    return z, torch.ones(z.shape[0], dtype=torch.float64), False


def constrained_shap_regression(z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, f_x: float,
                                f_base: float) -> torch.Tensor:
    """Weighted least squares for phi with phi_0 = f(baseline) and sum(phi) = f(x) - f(baseline)
    imposed exactly (the last coefficient is eliminated)."""
    m = z.shape[1]
    total = f_x - f_base
    if m == 1:
        return torch.tensor([total], dtype=torch.float64)
    yt = y.double() - f_base - z[:, -1] * total
    A = z[:, :-1] - z[:, -1:]
    Aw = A * weights.unsqueeze(1)
    head = torch.linalg.lstsq(A.T @ Aw, (Aw.T @ yt).unsqueeze(1)).solution.squeeze(1)
    return torch.cat([head, (total - head.sum()).view(1)])


@register
class KernelShap(Method):
    name = "kernelshap"
    aliases = ("kernel_shap",)
    family = "perturbation"
    cost = "n_samples + 1 F (1000)"
    signed = True
    randomized = True
    defaults = {"n_samples": 1000, "n_segments": 50, "segments": None, "compactness": 10.0,
                "baseline": "mean", "output": None}
    layouts = ("BCHW", "BCT", "BCDHW", "BTCHW", "BF")
    description = ("KernelSHAP on superpixels (Lundberg & Lee 2017): Shapley-kernel weighted least squares "
                   "with phi_0 = f(baseline) and sum(phi) = f(x) - f(baseline) imposed exactly; all "
                   "coalitions when 2^M - 2 <= n_samples (exact Shapley values), else kernel-distributed "
                   "paired samples. Hidden superpixels take the baseline ('mean' = 0 in normalised space; token ids "
                   "through an embedding: each token alone, hidden ones take the baseline embedding).")

    def run(self, ctx, target, layer, n_samples=1000, n_segments=50, segments=None, compactness=10.0,
            baseline="mean", output=None):
        n = positive_int(n_samples, "kernelshap n_samples", 2)
        out = _output(target, output)
        seg, counts = _segment_params(ctx, n_segments, segments, compactness)
        b, mmax = len(counts), max(counts)
        baseline = _token_baseline(ctx, baseline, "mean")
        base = (_segment_baseline(ctx.x.detach(), seg, counts, channel_axis(ctx.layout)) if baseline == "segment_mean"
                else _baseline(ctx, baseline))
        g = generator(ctx.seed)
        samples = [_kernelshap_samples(m, n, g) for m in counts]
        s = max(zs.shape[0] for zs, _, _ in samples) + 1       # + the all-off coalition: f(baseline)
        z = torch.zeros(b, s, mmax, device=ctx.x.device)
        for i, (zs, _, _) in enumerate(samples):
            z[i, 1:1 + zs.shape[0], :zs.shape[1]] = zs.float()
            z[i, 1 + zs.shape[0]:] = 1          # padding rows (examples with fewer samples): unused
        y = _coalition_scores(ctx, target, z, seg, base, out, "kernelshap")
        f_x = _clean_scores(ctx, target, out)
        phis = []
        for i, (zs, wts, _) in enumerate(samples):
            phis.append(constrained_shap_regression(zs, y[i, 1:1 + zs.shape[0]].cpu(), wts, float(f_x[i]),
                                                    float(y[i, 0])))
        return {"maps": _paint(phis, seg), "signed": True,
                "extras": {"segments": seg, "coefficients": [p.float() for p in phis],
                           "base_value": [float(v) for v in y[:, 0]],
                           "exact": [bool(e) for _, _, e in samples]}}


# ----------------------------------------------------------------------------- optimised masks

def _check_areas(areas) -> list[float]:
    if isinstance(areas, (int, float)) and not isinstance(areas, bool):
        areas = [areas]
    if not isinstance(areas, (list, tuple)) or not areas:
        raise SaliencyError(f"areas must be a number or a non-empty list of numbers in (0, 1), got {areas!r}")
    for a in areas:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0 < a < 1):
            raise SaliencyError(f"every area must be in (0, 1), got {a!r}")
    return [float(a) for a in areas]


class SmoothMask:
    """Smooth masks from a coarse parameter grid (Fong, Patrick & Vedaldi 2019).

    Parameters live on a grid of spacing `step` pixels. Each grid point's mask value is the smooth
    max (softmax pooling with coldness T) of the neighbouring parameters weighted by
    k(d) = exp(-2 max(d/sigma - 0.5, 0)^2), d the distance in pixels; the result is upsampled
    bilinearly to the image and clamped to [0, 1]. Masks are thus smooth at scale sigma.
    """

    def __init__(self, size: tuple[int, int], step: int, sigma: float, coldness: float = 20.0, device="cpu"):
        self.size, self.step, self.sigma, self.coldness = size, step, sigma, coldness
        self.grid = (int(math.ceil(size[0] / step)) + 1, int(math.ceil(size[1] / step)) + 1)
        r = max(1, int(math.ceil(2.5 * sigma / step)))
        self.radius = r
        t = torch.arange(-r, r + 1, dtype=torch.float32, device=device) * step
        d = (t.view(-1, 1) ** 2 + t.view(1, -1) ** 2).sqrt()
        self.kernel = torch.exp(-2 * (d / sigma - 0.5).clamp_min(0) ** 2).flatten()     # [(2r+1)^2]

    def __call__(self, params: torch.Tensor, coarse: bool = False):
        """params [N,1,gh,gw] -> masks [N,1,H,W] in [0,1] (and, with coarse=True, the mask values
        at the grid points [N,1,gh,gw])."""
        n = params.shape[0]
        r = self.radius
        # replicate padding: a uniform parameter grid gives a uniform mask, borders included
        cols = F.unfold(F.pad(params, (r, r, r, r), mode="replicate"), 2 * r + 1)   # [N, K, gh*gw]
        weighted = cols * self.kernel.view(1, -1, 1)
        smax = (weighted * torch.softmax(self.coldness * weighted, dim=1)).sum(1)
        grid_mask = smax.view(n, 1, *self.grid)
        span = ((self.grid[0] - 1) * self.step, (self.grid[1] - 1) * self.step)
        up = F.interpolate(grid_mask, size=span, mode="bilinear", align_corners=True)
        full = up[:, :, :self.size[0], :self.size[1]].clamp(0, 1)
        return (full, grid_mask.clamp(0, 1)) if coarse else full


def blur_pyramid(x: torch.Tensor, max_sigma: float, levels: int = 8) -> torch.Tensor:
    """[L,B,C,H,W]: level t is x blurred with sigma (1 - t/(L-1)) max_sigma (last level = x)."""
    return torch.stack([_blur(x, (1 - t / (levels - 1)) * max_sigma) for t in range(levels)])


def pyramid_perturb(pyr: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-pixel interpolation in the blur pyramid: mask 1 = the input, 0 = fully blurred.
    pyr [L,N,C,H,W] (already gathered per row), mask [N,1,H,W]."""
    levels = pyr.shape[0]
    pos = (mask * (levels - 1)).unsqueeze(0)                            # [1,N,1,H,W]
    lo = pos.detach().floor().clamp(0, levels - 2)
    frac = pos - lo                                                     # in [0,1]; gradient everywhere
    shape = (1,) + tuple(pyr.shape[1:])
    a = pyr.gather(0, lo.long().expand(shape))
    b = pyr.gather(0, (lo.long() + 1).expand(shape))
    return (a + frac * (b - a)).squeeze(0)


@register
class ExtremalPerturbation(Method):
    name = "extremal_perturbation"
    not_for = dict.fromkeys(("BCT", "BCDHW", "BTCHW", "BF"),
                            "its smooth masks (a max-convolution of a 2-D grid) and blur pyramid are defined on "
                            "an image's height and width; on a series learned_mask and contralsp learn masks "
                            "over time")
    aliases = ("extremal",)
    family = "perturbation"
    cost = "steps x (F+B) per area (300; 600 for 'dual')"
    randomized = False
    defaults = {"areas": [0.1], "steps": 300, "game": "preserve", "lr": 0.05, "step": None, "sigma": None,
                "max_blur": None, "reg_start": 300.0, "reg_growth": None, "jitter": True, "output": None}
    description = ("Extremal perturbations (Fong, Patrick & Vedaldi 2019): the smooth mask of a fixed area a "
                   "that maximises the target score of the preserved image (game='preserve'), minimises it "
                   "for the deleted one ('delete') or both ('dual'); blur-pyramid perturbation, area "
                   "enforced by lambda * mean((sort(m) - r_a)^2) with a growing lambda. Defaults shortened for "
                   "CPU: 300 SGD steps (paper 800, lr 0.01) with lr 0.05 and lambda growing by "
                   "1.0035^(800/steps) per step so it reaches the paper's final weight; the area term is "
                   "evaluated at the mask's grid points and ramps in over the first 10% of the steps; mask "
                   "step 7, sigma 21 and blur 20 at 224 px, scaled with the image size. "
                   "maps = mean of the masks over areas (extras['masks'] per area).")

    def run(self, ctx, target, layer, areas=(0.1,), steps=300, game="preserve", lr=0.05, step=None, sigma=None,
            max_blur=None, reg_start=300.0, reg_growth=None, jitter=True, output=None):
        areas = _check_areas(areas)
        steps = positive_int(steps, "extremal_perturbation steps")
        lr = positive_float(lr, "extremal_perturbation lr")
        if game not in ("preserve", "delete", "dual"):
            raise SaliencyError(f"unknown game {game!r}; use preserve, delete or dual")
        out = _output(target, output)
        x = ctx.x.detach()
        b, _, h, w = x.shape
        scale = min(h, w) / 224
        step = positive_int(step, "extremal_perturbation step") if step is not None else max(1, round(7 * scale))
        sigma = positive_float(sigma, "extremal_perturbation sigma") if sigma is not None else 21 * scale
        max_blur = positive_float(max_blur, "max_blur") if max_blur is not None else 20 * scale
        growth = (1.0035 ** (800 / steps)) if reg_growth is None else positive_float(reg_growth, "reg_growth")
        reg = positive_float(reg_start, "reg_start")
        gen = SmoothMask((h, w), step, sigma, device=x.device)
        na = len(areas)
        rows = torch.arange(b, device=x.device).repeat_interleave(na)           # row r = (example, area)
        area = torch.tensor(areas, device=x.device).repeat(b)
        npix = gen.grid[0] * gen.grid[1]
        ref = (torch.arange(npix, device=x.device).view(1, -1) >= ((1 - area) * npix).round().view(-1, 1)).float()
        pyr = blur_pyramid(x, max_blur)[:, rows]                                  # [L,R,C,H,W]
        params = torch.ones(b * na, 1, *gen.grid, device=x.device, requires_grad=True)
        opt = torch.optim.SGD([params], lr=lr, momentum=0.9, dampening=0.9)
        history = []
        warmup = max(1, steps // 10)
        for it in _steps(ctx, steps, "extremal_perturbation"):
            with torch.enable_grad():
                mask, grid_mask = gen(params, coarse=True)
                inputs, srows, sign = [], [], []
                if game in ("preserve", "dual"):
                    inputs.append(pyramid_perturb(pyr, mask))
                    srows.append(rows)
                    sign.append(1.0)
                if game in ("delete", "dual"):
                    inputs.append(pyramid_perturb(pyr, 1 - mask))
                    srows.append(rows)
                    sign.append(-1.0)
                batch = torch.cat(inputs)
                if jitter and it % 2 == 0:
                    batch = batch.flip(-1)
                scores = target.score(ctx.subject.forward(batch).float(), rows=torch.cat(srows), output=out)
                reward = sum(sg * part for sg, part in zip(sign, scores.split(b * na)))
                # the area term is taken at the grid points: every parameter weighs the same (taken
                # on the full-size mask, the border parameters would be penalised less)
                area_loss = ((grid_mask.flatten(1).sort(1).values - ref) ** 2).mean(1)
                # the area weight ramps in over the first `warmup` steps so that the ranking of the mask
                # values is set by the reward, not by the ties of the uniform initial mask
                energy = (-reward + reg * min(1.0, it / warmup) * area_loss).sum()
                (grad,) = torch.autograd.grad(energy, [params])
            ctx.counter.add(forward=batch.shape[0], backward=batch.shape[0])
            params.grad = grad
            opt.step()
            with torch.no_grad():
                params.clamp_(0, 1)
            reg *= growth
            history.append(float(energy.detach()))
        with torch.no_grad():
            masks = gen(params.detach()).view(b, na, h, w)
        return {"maps": masks.mean(1), "signed": False,
                "extras": {"masks": masks, "areas": areas, "achieved_area": masks.flatten(2).mean(2),
                           "energy": history, "game": game}}


@register
class MeaningfulPerturbation(Method):
    name = "meaningful_perturbation"
    not_for = dict.fromkeys(("BCT", "BCDHW", "BTCHW", "BF"),
                            "its 28x28 mask, median blur and 2-D total variation are defined on an image; "
                            "learned_mask is its counterpart over a series' time steps")
    aliases = ("meaningful",)
    family = "perturbation"
    cost = "steps x (F+B) (300)"
    defaults = {"steps": 300, "lr": 0.1, "l1": 1e-4, "tv": 1e-2, "tv_beta": 3.0, "mask_size": 28,
                "blur_sigma": 5.0, "median_size": 11, "output": "prob"}
    description = ("Meaningful perturbation (Fong & Vedaldi 2017): learn a 28x28 deletion mask m (1 = keep), "
                   "upsampled bilinearly; x~ = x M + blur(x)(1 - M), blur = mean of a Gaussian (sigma 5) and "
                   "an 11x11 median blur; minimise l1 |1-m|_1 + tv TV_beta(m) + P_c(x~) (sums over the mask "
                   "as in the paper, lambda1=1e-4, lambda2=1e-2, beta=3) with Adam (lr 0.1), clamping m to "
                   "[0,1]; saliency = 1 - M. The paper's jitter and noise during the optimisation are not "
                   "applied (deterministic).")

    def run(self, ctx, target, layer, steps=300, lr=0.1, l1=1e-4, tv=1e-2, tv_beta=3.0, mask_size=28,
            blur_sigma=5.0, median_size=11, output="prob"):
        steps = positive_int(steps, "meaningful_perturbation steps")
        lr = positive_float(lr, "meaningful_perturbation lr")
        for v, what in ((l1, "l1"), (tv, "tv")):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise SaliencyError(f"meaningful_perturbation {what} must be >= 0, got {v!r}")
        tv_beta = positive_float(tv_beta, "tv_beta")
        ms = _pair(mask_size, "mask_size")
        median_size = positive_int(median_size, "median_size")
        if median_size % 2 == 0:
            raise SaliencyError(f"median_size must be odd, got {median_size}")
        out = _output(target, output)
        x = ctx.x.detach()
        b, _, h, w = x.shape
        if ms[0] > h or ms[1] > w:
            raise SaliencyError(f"mask_size {ms} is larger than the image {(h, w)}")
        blurred = (_blur(x, positive_float(blur_sigma, "blur_sigma")) + _median_blur(x, median_size)) / 2
        m = torch.ones(b, 1, *ms, device=x.device, requires_grad=True)
        opt = torch.optim.Adam([m], lr=lr)
        history = []
        for _ in _steps(ctx, steps, "meaningful_perturbation"):
            with torch.enable_grad():
                up = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
                score = target.score(ctx.subject.forward(x * up + blurred * (1 - up)).float(), output=out)
                l1_term = (1 - m).abs().flatten(1).sum(1)
                tv_term = ((m[:, :, 1:] - m[:, :, :-1]).abs() ** tv_beta).flatten(1).sum(1) + \
                          ((m[:, :, :, 1:] - m[:, :, :, :-1]).abs() ** tv_beta).flatten(1).sum(1)
                loss = l1 * l1_term + tv * tv_term + score
                (grad,) = torch.autograd.grad(loss.sum(), [m])
            ctx.counter.add(forward=b, backward=b)
            m.grad = grad
            opt.step()
            with torch.no_grad():
                m.clamp_(0, 1)
            history.append([float(v) for v in loss.detach()])
        with torch.no_grad():
            up = F.interpolate(m.detach(), size=(h, w), mode="bilinear", align_corners=False)
        return {"maps": (1 - up).squeeze(1), "raw": (1 - m.detach()).squeeze(1), "signed": False,
                "extras": {"objective": history}}
