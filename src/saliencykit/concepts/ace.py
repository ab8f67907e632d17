"""ACE: automatic concept-based explanations (Ghorbani et al. 2019), as `extract(method="ace")`.

As implemented here:
  1. every image is cut into superpixels by SLIC (scikit-image) at several resolutions
     (`resolutions`, default 15, 50 and 80 segments, as in the paper), on the image un-normalised
     to [0, 1]; segments smaller than `min_area` of the image are dropped;
  2. each segment becomes a patch: its bounding box, with the pixels outside the segment filled
     with the normalisation mean (0 in the model's input space; the paper fills with the dataset
     mean grey), resized to the input size;
  3. the patches' activations at `layer`, averaged over space, clamped at 0 as CRAFT does (so the
     cluster centres are non-negative and `decompose` / `concept_maps` read them as they read a
     CRAFT basis; the share clamped is reported);
  4. k-means (scikit-learn, `random_state=seed`) into `n_concepts` clusters; the centres are the
     bank's basis, and each concept keeps its `top` segments nearest the centre
     (`bank.extras["top_segments"]`: image index, box [top, left, bottom, right], distance), from
     which `segment_patches` rebuilds the patches for an atlas;
  5. TCAV (`concepts.tcav`) of each concept for each image's predicted class: the concept's top
     patches against random sets of segment patches (`tcav_runs` of them, seeded), with the
     random-concept significance test; scores, p-values and decisions in `bank.extras["tcav"]`
     (`tcav_runs=0` skips it).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import SaliencyError, positive_int
from .bank import EXTRACTORS, ConceptBank, layer_activations

RESOLUTIONS = (15, 50, 80)
OPTIONS = ("resolutions", "min_area", "top", "tcav_runs", "target")


def segment(image01: np.ndarray, resolutions, min_area: float) -> list[np.ndarray]:
    """Boolean masks [H, W] of the SLIC superpixels of one image ([H, W, 3] in [0, 1]) at every
    resolution, the ones under `min_area` of the image left out."""
    from skimage.segmentation import slic

    H, W = image01.shape[:2]
    masks = []
    for n in resolutions:
        labels = slic(image01, n_segments=int(n), compactness=20, sigma=1.0, start_label=0)
        for s in np.unique(labels):
            m = labels == s
            if m.sum() >= min_area * H * W:
                masks.append(m)
    return masks


def _patch(x: torch.Tensor, mask: np.ndarray) -> tuple[torch.Tensor, list]:
    """The segment's bounding box of `x` [3,H,W], outside pixels 0 (the normalisation mean),
    resized to [3,H,W]; and the box [top, left, bottom, right)."""
    rows, cols = np.nonzero(mask)
    t, b, l_, r = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    m = torch.from_numpy(mask[t:b, l_:r]).to(x.device)
    crop = x[:, t:b, l_:r] * m
    out = torch.nn.functional.interpolate(crop[None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    return out[0], [t, l_, b, r]


def _unnormalise(subject, x: torch.Tensor) -> np.ndarray:
    """[N,H,W,3] pixels in [0,1] for SLIC, through the subject's own `unnormalize`."""
    return subject.unnormalize(x).permute(0, 2, 3, 1).cpu().double().numpy()


def segment_patches(subject, images: torch.Tensor, segments: list[dict], resolutions=RESOLUTIONS,
                    min_area: float = 0.01) -> torch.Tensor:
    """Rebuild the patches [n,3,H,W] of segments recorded by ACE ({"image", "segment"} entries of
    `bank.extras["top_segments"]`) from the images the bank was extracted from."""
    pics = _unnormalise(subject, images)
    cache: dict = {}
    out = []
    for s in segments:
        i = int(s["image"])
        if i not in cache:
            cache[i] = segment(pics[i], resolutions, min_area)
        out.append(_patch(images[i], cache[i][int(s["segment"])])[0])
    return torch.stack(out)


def extract_ace(subject, x: torch.Tensor, layer: str, n_concepts: int, seed: int, batch_size: int = 32,
                resolutions=RESOLUTIONS, min_area: float = 0.01, top: int = 10, tcav_runs: int = 10,
                target=None) -> ConceptBank:
    """An ACE concept bank of `x` [N,3,H,W] at `layer` (see the module docstring)."""
    from sklearn.cluster import KMeans

    from ..engine import PassCounter
    from .tcav import tcav

    k = positive_int(n_concepts, "n_concepts")
    top = positive_int(top, "top")
    if not resolutions or any(int(r) < 2 for r in resolutions):
        raise SaliencyError(f"resolutions must be SLIC segment counts >= 2, got {resolutions!r}")
    if not 0 <= float(min_area) < 1:
        raise SaliencyError(f"min_area must be a fraction of the image in [0, 1), got {min_area}")
    if x.shape[0] < 2:
        raise SaliencyError(f"ACE needs at least 2 images to find concepts across images, got {x.shape[0]}")
    counter = PassCounter()
    pics = _unnormalise(subject, x)
    feats, where, boxes = [], [], []
    for i in range(x.shape[0]):
        masks = segment(pics[i], resolutions, float(min_area))
        if not masks:
            continue
        patches, bx = zip(*[_patch(x[i], m) for m in masks])
        acts = layer_activations(subject, torch.stack(patches), layer, batch_size, counter)
        feats.append(acts.mean((2, 3)))
        where += [(i, j) for j in range(len(masks))]
        boxes += list(bx)
    if len(where) < 2 * k:
        raise SaliencyError(f"{x.shape[0]} image(s) gave {len(where)} segments, too few for {k} concepts: give "
                            f"more images (at least {2 * k} segments are needed) or ask for fewer concepts")
    A = torch.cat(feats).double()
    negative = float((A < 0).double().mean())
    A = A.clamp(min=0).numpy()
    if not np.isfinite(A).all():
        raise SaliencyError(f"layer {layer!r} gave non-finite activations")
    km = KMeans(n_clusters=k, random_state=int(seed), n_init=10).fit(A)
    centres = np.clip(km.cluster_centers_, 0, None)     # means of non-negative vectors: already >= 0
    dist = np.linalg.norm(A - centres[km.labels_], axis=1)
    top_segments, sizes, spread = [], [], []
    for c in range(k):
        members = np.nonzero(km.labels_ == c)[0]
        order = members[np.argsort(dist[members], kind="stable")][:top]
        top_segments.append([{"image": where[j][0], "segment": where[j][1], "box": boxes[j],
                              "distance": float(dist[j])} for j in order])
        sizes.append(int(len(members)))
        spread.append(int(len({where[j][0] for j in members})))
    err = float(np.linalg.norm(A - centres[km.labels_]) / max(np.linalg.norm(A), 1e-12))
    extras = {"segments": len(where), "images": int(x.shape[0]), "cluster_sizes": sizes, "images_per_concept": spread,
              "top_segments": top_segments, "negative_fraction_clamped": negative}
    if int(tcav_runs) > 0:
        concepts = {str(c): segment_patches(subject, x, top_segments[c], resolutions, min_area) for c in range(k)
                    if len(top_segments[c]) >= 2}
        g = torch.Generator().manual_seed(int(seed))
        pick = torch.randperm(len(where), generator=g)[:min(len(where), top * (int(tcav_runs) + 1))].tolist()
        pool = segment_patches(subject, x, [{"image": where[j][0], "segment": where[j][1]} for j in pick],
                               resolutions, min_area)
        res = tcav(subject, x, concepts, pool, layer=layer, target=target, n_runs=int(tcav_runs), seed=int(seed),
                   batch_size=batch_size)
        extras["tcav"] = {c: {"score": res.scores[c], "p_value": res.p_values[c], "significant": res.significant[c]}
                          for c in res.concepts}
        extras["tcav_target"] = res.target
        counter.add(forward=int(round(res.passes["forward"] * x.shape[0])),
                    backward=int(round(res.passes["backward"] * x.shape[0])))
    return ConceptBank(basis=torch.from_numpy(centres).float(), layer=layer, method="ace", seed=int(seed),
                       model=getattr(subject, "name", None),
                       params={"n_concepts": k, "resolutions": [int(r) for r in resolutions], "min_area": float(min_area),
                               "top": top, "tcav_runs": int(tcav_runs)},
                       reconstruction_error=err,
                       passes={"forward": counter.forward / x.shape[0], "backward": counter.backward / x.shape[0]},
                       extras=extras)


EXTRACTORS["ace"] = (extract_ace, OPTIONS)

__all__ = ["OPTIONS", "extract_ace", "segment", "segment_patches", "RESOLUTIONS"]
