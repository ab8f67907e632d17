"""Performance Information Curves, SIC and AIC (Kapishnikov et al., XRAI 2019).

The image (uint8 pixels) is rebuilt from a growing set of its most salient pixels plus a fixed
random 1 % of pixels and the four corners; every other pixel is filled by linear interpolation
over a Delaunay triangulation of the kept pixels (not a Gaussian blur). For each threshold t the
normalised information content e_t (lossless-WebP size, between the fully "blurred" image and the
original) and the normalised prediction q_t are measured; the AUC of q as a function of e is the
score. SIC: q from the softmax probability of the class; AIC: q from whether the top-1 class is
still the class. An image is skipped (NaN, reason in extras) when the class probability is below
`min_pred` (SIC) or the class is not top-1 (AIC), or when the fully blurred image already predicts
as well or holds as much information as the original.
"""
from __future__ import annotations

import io

import numpy as np
import torch

from ..engine import PassCounter
from ..errors import SaliencyError
from .base import EvalContext, Metric, per_example_passes, rank_maps, register, stack_maps

THRESHOLDS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.21, 0.34, 0.5, 0.75)


def interpolate_fill(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """[H,W,C] image with every pixel outside `keep` (plus the 4 corners) linearly interpolated."""
    import matplotlib.tri as mtri

    H, W, C = image.shape
    keep = keep.copy()
    keep[0, 0] = keep[0, -1] = keep[-1, 0] = keep[-1, -1] = True
    if keep.all():
        return image.astype(np.float64)
    rr, cc = np.nonzero(keep)
    tri = mtri.Triangulation(cc.astype(float), rr.astype(float))
    qr, qc = np.nonzero(~keep)
    out = image.astype(np.float64).copy()
    finder = tri.get_trifinder()
    for ch in range(C):
        vals = image[rr, cc, ch].astype(np.float64)
        f = mtri.LinearTriInterpolator(tri, vals, trifinder=finder)
        v = f(qc.astype(float), qr.astype(float))
        out[qr, qc, ch] = np.ma.filled(v, float(vals.mean()))
    return out


def webp_size(image: np.ndarray) -> int:
    """Bytes of the image saved as lossless WebP: the information-content proxy."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8)).save(buf, format="webp", lossless=True)
    return len(buf.getvalue())


def pic_auc(e: np.ndarray, q: np.ndarray, keep_monotonous: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC of q(e) with (0,0) and (1,1) added, sampled at 1000 points in [0,1) and at 1."""
    e = np.clip(np.asarray(e, float), 0, 1)
    q = np.clip(np.asarray(q, float), 0, 1)
    if keep_monotonous:
        q = np.maximum.accumulate(q)
    xs = np.concatenate([[0.0], e, [1.0]])
    ys = np.concatenate([[0.0], q, [1.0]])
    order = np.lexsort((-ys, xs))            # sort by x; for equal x keep the largest y first
    xs, ys = xs[order], ys[order]
    uniq = np.concatenate([[True], np.diff(xs) > 0])
    xs, ys = xs[uniq], ys[uniq]
    grid = np.concatenate([np.linspace(0, 1, 1000, endpoint=False), [1.0]])
    curve = np.interp(grid, xs, ys)
    return float(np.trapezoid(curve, grid)), grid, curve


class _PIC(Metric):
    family = "faithfulness"
    direction = "higher"
    randomized = True
    defaults = {"thresholds": THRESHOLDS, "random_fraction": 0.01, "min_pred": 0.8, "keep_monotonous": True}
    cost = "13 per map + 1 shared per image, plus CPU interpolation and WebP encoding"
    kind = "sic"
    layouts = ("BCHW",)    # a blurred photo's saliency, its information measured as a WebP size

    def compute(self, ctx: EvalContext, exps, thresholds=THRESHOLDS, random_fraction=0.01, min_pred=0.8,
                keep_monotonous=True):
        key = ("pic", tuple(thresholds), float(random_fraction), tuple(sorted((n, id(e)) for n, e in exps.items())))
        if key not in ctx._cache:
            ctx._cache[key] = _pic_forward(ctx, exps, [float(t) for t in thresholds], float(random_fraction))
        data = ctx._cache[key]
        B = ctx.batch
        out = {}
        for e, name in enumerate(data["names"]):
            scores, reasons, curves = [], [], []
            for b in range(B):
                m = e * B + b
                pred_x = data["prob_x"][b] if self.kind == "sic" else data["hit_x"][b]
                pred_b = data["prob_b"][b] if self.kind == "sic" else data["hit_b"][b]
                preds = data["prob"][m] if self.kind == "sic" else data["hit"][m]
                reason = None
                if self.kind == "sic" and pred_x < min_pred:
                    reason = f"class probability {pred_x:.3f} < min_pred {min_pred}"
                elif self.kind == "aic" and pred_x < 1:
                    reason = "the class is not the model's top-1 prediction"
                elif pred_b >= pred_x:
                    reason = "the fully blurred image predicts as well as the original"
                elif data["ent_b"][b] >= data["ent_x"][b]:
                    reason = "the fully blurred image is not less informative than the original"
                if reason is not None:
                    scores.append(float("nan"))
                    reasons.append(reason)
                    curves.append(np.full(1001, np.nan))
                    continue
                ent = (np.array(data["ent"][m]) - data["ent_b"][b]) / (data["ent_x"][b] - data["ent_b"][b])
                q = (np.array(preds) - pred_b) / (pred_x - pred_b)
                auc, grid, curve = pic_auc(ent, q, keep_monotonous)
                scores.append(auc)
                reasons.append(None)
                curves.append(curve)
            out[name] = self.result(name, scores,
                                    curves={"x": torch.from_numpy(np.concatenate([np.linspace(0, 1, 1000, endpoint=False), [1.0]])),
                                            "y": torch.from_numpy(np.stack(curves)),
                                            "xlabel": "normalised information (WebP size)",
                                            "ylabel": "normalised " + ("probability" if self.kind == "sic" else "accuracy")},
                                    passes=per_example_passes(data["counter"], B, len(data["names"])),
                                    extras={"skipped": reasons, "thresholds": list(thresholds)})
        return out


def _pic_forward(ctx: EvalContext, exps, thresholds, random_fraction) -> dict:
    from .faithfulness import _rows_target
    from .road import _HitRecorder

    if not thresholds or any(not 0 < t < 1 for t in thresholds):
        raise SaliencyError(f"pic: thresholds must be fractions in (0, 1), got {thresholds}")
    names, maps, image_of = stack_maps(ctx, exps)
    M, (H, W) = maps.shape[0], maps.shape[-2:]
    B, T, hw = ctx.batch, len(thresholds), H * W
    pixels = np.round(ctx.subject.unnormalize(ctx.x).detach().cpu().double().numpy() * 255).transpose(0, 2, 3, 1)
    gen = ctx.generator(7)
    rand = [(torch.rand(H, W, generator=gen) < random_fraction).numpy() for _ in range(B)]
    blurred_b = [interpolate_fill(pixels[b], rand[b]) for b in range(B)]
    ent_x = [webp_size(pixels[b]) for b in range(B)]
    ent_b = [webp_size(im) for im in blurred_b]
    ranks = rank_maps(maps, ctx.generator(8)).cpu().numpy().reshape(M, H, W)
    images, ent = [], np.zeros((M, T))
    for m in range(M):
        b = int(image_of[m])
        for ti, t in enumerate(thresholds):
            keep = (ranks[m] < int(np.ceil(t * hw))) | rand[b]
            im = interpolate_fill(pixels[b], keep)
            ent[m, ti] = webp_size(im)
            images.append(im)
    all_images = np.stack(blurred_b + images)                       # [B + M*T, H, W, C]
    xin = torch.from_numpy(np.clip(np.round(all_images), 0, 255) / 255.0).permute(0, 3, 1, 2).to(ctx.x)
    xin = ctx.subject.normalize_pixels(xin)
    rows = torch.cat([torch.arange(B), image_of.cpu().repeat_interleave(T)])
    tgt = _rows_target(ctx.target, rows)
    classes = torch.tensor([s.indices[0] for s in tgt.pos])
    rec = _HitRecorder(tgt, classes)
    counter = PassCounter()
    n = xin.shape[0]
    probs = ctx.runner(torch.zeros_like(xin), lambda a, b_: (torch.arange(a, b_, device=xin.device),
                                                             torch.ones(b_ - a, 1, 1, 1, device=xin.device)),
                       n, counter, output="prob", target=rec, x=xin, desc="pic").double().cpu().numpy()
    hits = torch.cat(rec.hits).double().cpu().numpy()
    clean_p = ctx.clean_scores("prob").double().cpu().numpy()
    top = ctx.logits.argmax(1).cpu()
    cls0 = torch.tensor([s.indices[0] for s in ctx.target.pos])
    return {"names": names, "counter": counter, "prob_x": clean_p, "hit_x": (top == cls0).double().numpy(),
            "prob_b": probs[:B], "hit_b": hits[:B], "ent_x": ent_x, "ent_b": ent_b, "ent": ent,
            "prob": probs[B:].reshape(M, T), "hit": hits[B:].reshape(M, T)}


@register
class PicSIC(_PIC):
    name = "pic_sic"
    kind = "sic"
    description = ("Softmax information curve (XRAI): AUC of the normalised class probability against the "
                   "normalised information (WebP size) of images rebuilt from the most salient pixels.")


@register
class PicAIC(_PIC):
    name = "pic_aic"
    kind = "aic"
    description = ("Accuracy information curve (XRAI): like pic_sic with 1 if the class is still top-1, else 0.")
