"""Region methods: XRAI (Kapishnikov et al., "XRAI: Better Attributions Through Regions", ICCV 2019).

XRAI turns a pixel attribution into a ranking of image regions:

1. base attribution: integrated gradients from a black and from a white baseline, averaged, then
   the maximum over colour channels (or a user-given `base_attribution`);
2. candidate regions: Felzenszwalb segmentations (scikit-image) of the image at several scales,
   each segment dilated by a disk (or user-given `segments`, used as they are);
3. greedy selection ("full"): repeatedly add the region whose *new* pixels have the highest mean
   attribution (gain); the new pixels get that gain as their value. Regions adding fewer than
   `min_pixel_diff` new pixels are dropped. "fast": rank the regions once by their mean
   attribution and add them in that order. Pixels never covered get their own mean attribution.

Output: `maps` is the region map (piecewise constant, value = region gain); `raw` the integer
rank map (1 = highest gain); `extras["regions"]` the regions as boolean masks in rank order and
`extras["region_values"]` their gains; `attributions` the base attribution when it was computed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SaliencyError
from .base import Method, register
from .gradient import make_baseline
from .paths import integrated_gradients

SCALES = (50, 100, 150, 250, 500, 1200)


# --------------------------------------------------------------------------- segments
def _dilate(masks: torch.Tensor, radius: int, chunk: int = 64) -> torch.Tensor:
    """Binary dilation of boolean masks [M,H,W] with a disk of `radius` (zero outside the image)."""
    if radius <= 0 or masks.shape[0] == 0:
        return masks
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    disk = ((t.view(-1, 1) ** 2 + t.view(1, -1) ** 2) <= radius ** 2).float()
    out = []
    for s in range(0, masks.shape[0], chunk):
        m = masks[s:s + chunk].float().unsqueeze(1)
        out.append(F.conv2d(m, disk.view(1, 1, *disk.shape), padding=radius)[:, 0] > 0.5)
    return torch.cat(out)


def xrai_segments(image: np.ndarray, scales=SCALES, sigma: float = 0.8, min_size: int = 150,
                  dilation: int = 5, size: int | None = 224) -> torch.Tensor:
    """Candidate regions of one image [H,W,C] -> boolean masks [M,H,W].

    The image is min-max rescaled to [-1,1] and resized to `size` x `size` (cubic, anti-aliased)
    for the Felzenszwalb segmentation at each scale; each label map is resized back (nearest) and
    every label becomes a mask, dilated by a disk of radius `dilation`. Masks overlap across scales.
    """
    from skimage.segmentation import felzenszwalb
    from skimage.transform import resize

    im = np.asarray(image, dtype=np.float64)
    h, w = im.shape[:2]
    lo, hi = im.min(), im.max()
    im = 2 * (im - lo) / (hi - lo) - 1 if hi > lo else np.zeros_like(im)
    if size is not None and (h, w) != (size, size):
        im = resize(im, (size, size), order=3, mode="constant", preserve_range=True, anti_aliasing=True)
    masks = []
    for scale in scales:
        seg = felzenszwalb(im, scale=scale, sigma=sigma, min_size=min_size, channel_axis=-1)
        if seg.shape != (h, w):
            seg = resize(seg, (h, w), order=0, mode="constant", preserve_range=True,
                         anti_aliasing=False).astype(np.int64)
        seg = torch.from_numpy(np.ascontiguousarray(seg)).long()
        labels = torch.unique(seg)
        masks.append(seg.unsqueeze(0) == labels.view(-1, 1, 1))
    return _dilate(torch.cat(masks), dilation)


# --------------------------------------------------------------------------- greedy ranking
def xrai_rank(attr: torch.Tensor, masks: torch.Tensor, algorithm: str = "full", area_threshold: float = 1.0,
              min_pixel_diff: int = 50) -> dict:
    """Rank candidate regions of one image by gain.

    attr [H,W], masks [M,H,W] bool. Returns {"map" [H,W] float64, "ranks" [H,W] long (1 = highest
    gain; 0 never happens when every pixel is assigned), "regions" [R,H,W] bool (rank order),
    "values" [R] float64, "order" (regions in the order they were added, as indices into "regions")}.
    """
    if algorithm not in ("full", "fast"):
        raise SaliencyError(f"unknown XRAI algorithm {algorithm!r}; use 'full' or 'fast'")
    hw = attr.shape
    a = attr.reshape(-1).double()
    m = masks.reshape(masks.shape[0], -1).bool()
    n_pix = a.numel()
    out = torch.full((n_pix,), float("-inf"), dtype=torch.float64)
    current = torch.zeros(n_pix, dtype=torch.bool)
    trace: list[tuple[torch.Tensor, float]] = []
    need = max(int(min_pixel_diff), 1)
    if algorithm == "full":
        mf = m.double()
        cnt = mf.sum(1)             # new pixels each region would add
        sums = mf @ a               # attribution over those new pixels
        alive = torch.ones(m.shape[0], dtype=torch.bool)
        area = 0.0
        while area <= area_threshold:
            alive &= cnt >= need
            if not bool(alive.any()):
                break
            gain = torch.where(alive, sums / cnt.clamp_min(1), torch.full_like(sums, float("-inf")))
            best = int(torch.argmax(gain))   # first of tied maxima
            diff = m[best] & ~current
            idx = torch.nonzero(diff).flatten()
            g = float(gain[best])
            trace.append((diff, g))
            out[idx] = g
            current |= diff
            area = float(current.double().mean())
            alive[best] = False
            inter = mf[:, idx]
            cnt -= inter.sum(1)
            sums -= inter @ a[idx]
    else:
        whole = (m.double() @ a) / m.sum(1).double().clamp_min(1)
        order = np.argsort(-whole.numpy(), kind="stable")
        for i in order:
            diff = m[i] & ~current
            c = int(diff.sum())
            if c < need:
                continue
            g = float(a[diff].mean())
            trace.append((diff, g))
            out[diff] = g
            current |= m[i]
            if area_threshold < 1 and float(current.double().mean()) > area_threshold:
                break
    rest = torch.isinf(out)
    ranked = sorted(range(len(trace)), key=lambda i: -trace[i][1])  # stable: ties keep insertion order
    regions = [trace[i][0] for i in ranked]
    values = [trace[i][1] for i in ranked]
    if bool(rest.any()):
        v = float(a[rest].mean())
        out[rest] = v
        regions.append(rest)
        values.append(v)
    ranks = torch.zeros(n_pix, dtype=torch.long)
    for r, reg in enumerate(regions):
        ranks[reg] = r + 1
    position = {i: r for r, i in enumerate(ranked)}
    return {"map": out.view(hw), "ranks": ranks.view(hw),
            "regions": torch.stack(regions).view(-1, *hw) if regions else torch.zeros((0, *hw), dtype=torch.bool),
            "values": torch.tensor(values, dtype=torch.float64),
            "order": [position[i] for i in range(len(trace))]}


# --------------------------------------------------------------------------- inputs
def _per_image_segments(segments, b: int, hw) -> list[torch.Tensor]:
    """User segments -> per-image boolean masks [M,H,W]. A tensor/array applies to every image
    (bool [M,H,W] masks, or an integer [H,W] label map); a list/tuple gives one entry per image."""

    def one(s):
        t = torch.as_tensor(np.asarray(s) if not isinstance(s, torch.Tensor) else s)
        if t.dtype == torch.bool and t.dim() == 3:
            masks = t
        elif t.dim() == 2 and not t.dtype.is_floating_point and t.dtype != torch.bool:
            masks = t.unsqueeze(0) == torch.unique(t).view(-1, 1, 1)
        else:
            raise SaliencyError(f"segments must be boolean masks [M,H,W] or an integer label map [H,W]; got "
                                f"dtype {t.dtype} shape {tuple(t.shape)}")
        if tuple(masks.shape[-2:]) != tuple(hw):
            raise SaliencyError(f"segments have size {tuple(masks.shape[-2:])}, the input {tuple(hw)}")
        if masks.shape[0] == 0:
            raise SaliencyError("segments: no masks given")
        return masks.cpu()

    if isinstance(segments, (list, tuple)):
        if len(segments) != b:
            raise SaliencyError(f"a list of segments gives one entry per image: {len(segments)} for {b} images")
        return [one(s) for s in segments]
    masks = one(segments)
    return [masks] * b


def _base_attribution(value, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value).double().cpu()
    b, _, h, w = x.shape
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() == 4:
        t = t.amax(1)
    if t.dim() != 3 or tuple(t.shape) not in ((b, h, w), (1, h, w)):
        raise SaliencyError(f"base_attribution must be [B,H,W], [H,W] or [B,C,H,W] matching the input "
                            f"{tuple(x.shape)}; got {tuple(t.shape)}")
    return t.expand(b, h, w)


@register
class XRAI(Method):
    name = "xrai"
    not_for = dict.fromkeys(("BCT", "BCDHW", "BTCHW", "BF"),
                            "XRAI needs image segments: Felzenszwalb superpixels of an RGB image")
    family = "region"
    cost = "200F+200B"
    signed = True
    description = ("XRAI (Kapishnikov et al. 2019): integrated gradients (black + white baselines, channel max) "
                   "summarised over multi-scale Felzenszwalb regions ranked greedily by attribution density. "
                   "raw = integer rank map (1 = best); extras['regions'] = masks in rank order.")
    defaults = {"steps": 100, "baselines": ("black", "white"), "rule": "gausslegendre", "algorithm": "full",
                "area_threshold": 1.0, "min_pixel_diff": 50, "scales": SCALES, "felzenszwalb_sigma": 0.8,
                "min_size": 150, "dilation": 5, "segment_size": 224, "segments": None,
                "base_attribution": None, "batch_size": None}

    def run(self, ctx, target, layer, steps=100, baselines=("black", "white"), rule="gausslegendre",
            algorithm="full", area_threshold=1.0, min_pixel_diff=50, scales=SCALES, felzenszwalb_sigma=0.8,
            min_size=150, dilation=5, segment_size=224, segments=None, base_attribution=None,
            batch_size=None):
        if algorithm not in ("full", "fast"):
            raise SaliencyError(f"unknown XRAI algorithm {algorithm!r}; use 'full' or 'fast'")
        if not 0 < area_threshold <= 1:
            raise SaliencyError(f"area_threshold must be in (0, 1], got {area_threshold!r}")
        if min_pixel_diff < 0:
            raise SaliencyError(f"min_pixel_diff must be >= 0, got {min_pixel_diff!r}")
        x = ctx.x.detach()
        b, _, h, w = x.shape
        attributions = None
        if base_attribution is not None:
            attr = _base_attribution(base_attribution, x)
        else:
            if isinstance(baselines, (str, int, float, torch.Tensor)):
                baselines = [baselines]
            if not baselines:
                raise SaliencyError("xrai needs at least one baseline")
            total = None
            for bl in baselines:
                base = make_baseline(ctx.subject, x, bl, ctx.seed)
                ig = integrated_gradients(ctx, target, x, base, steps, rule, batch_size).double()
                total = ig if total is None else total + ig
            attributions = (total / len(baselines)).to(x.dtype)
            attr = attributions.double().amax(1).cpu()
        if segments is not None:
            seg_masks = _per_image_segments(segments, b, (h, w))
        else:
            if not scales:
                raise SaliencyError("xrai needs at least one Felzenszwalb scale")
            pixels = ctx.subject.unnormalize(x).detach().float().cpu().permute(0, 2, 3, 1).numpy()
            seg_masks = [xrai_segments(pixels[i], scales, felzenszwalb_sigma, min_size, dilation, segment_size)
                         for i in range(b)]
        results = [xrai_rank(attr[i], seg_masks[i], algorithm, area_threshold, min_pixel_diff) for i in range(b)]
        maps = torch.stack([r["map"] for r in results]).float()
        ranks = torch.stack([r["ranks"] for r in results])
        extras = {"regions": [r["regions"] for r in results], "region_values": [r["values"] for r in results],
                  "added_order": [r["order"] for r in results],
                  "n_regions": [int(r["regions"].shape[0]) for r in results],
                  "n_candidates": [int(s.shape[0]) for s in seg_masks], "ranks": ranks}
        return {"maps": maps, "raw": ranks.float(), "attributions": attributions, "signed": True, "extras": extras}
