"""Class summaries: what the salient regions of a class's images have in common, as a few
clusters with their frequency.

For every image, a saliency method (default Grad-CAM) explains the class; the image's salient
region is its top `keep` share of pixels. The region is described by the features the model has
there: the activation at `layer`, averaged over the layer cells weighted by the saliency mask
resized to the layer (so two images whose salient regions look alike to the model get close
vectors wherever the region sits). The vectors, L2-normalised, are clustered by k-means
(scikit-learn, seeded, 10 restarts); each cluster is a *summary*: its share of the images, its
members ordered by closeness to the centre, and per member the box around the largest connected
piece of the salient region (the crop a picture shows).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SaliencyError, positive_int, resolve_seed


@dataclass
class Summary:
    """One cluster: `frequency` (share of the images), `members` (image indices, closest to the
    centre first), `boxes` (per member `(top, left, bottom, right)` in input pixels) and
    `spread` (the mean cosine distance of the members to the centre)."""

    frequency: float
    members: list
    boxes: list
    spread: float


@dataclass
class ClassSummary:
    """`summaries` (largest first), `cls` (the class index summarised), `assignment` [N] (the summary of each image), `maps` [N,H,W]
    (the saliency maps), `x` (the images explained), `target`, `method`, `layer`, `seed`, `passes`."""

    summaries: list
    cls: int
    assignment: np.ndarray
    maps: torch.Tensor
    x: torch.Tensor
    target: list
    method: str
    layer: str
    seed: int
    keep: float
    passes: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.summaries)

    def to_dict(self) -> dict:
        return {"class": self.cls, "target": self.target[0] if self.target else None, "method": self.method, "layer": self.layer,
                "seed": self.seed, "keep": self.keep, "images": int(len(self.assignment)), "passes": self.passes,
                "summaries": [{"frequency": round(s.frequency, 4), "members": s.members, "boxes": s.boxes,
                               "spread": round(s.spread, 4)} for s in self.summaries]}


def salient_mask(m: torch.Tensor, keep: float) -> torch.Tensor:
    """The top `keep` share of the pixels of each map [N,H,W], never counting pixels at the map's
    minimum (a map that is zero outside a small object keeps just the object); at least one pixel."""
    flat = m.flatten(1)
    n = max(1, int(round(keep * flat.shape[1])))
    thr = flat.topk(n, dim=1).values[:, -1:]
    mask = (flat >= thr) & (flat > flat.amin(1, keepdim=True))
    empty = ~mask.any(1)
    mask[empty] = flat[empty] >= thr[empty]
    return mask.reshape(m.shape)


def largest_box(mask: np.ndarray) -> tuple:
    """(top, left, bottom, right) of the largest 8-connected piece of a [H,W] bool mask."""
    from skimage.measure import label

    lab = label(mask, connectivity=2)
    if lab.max() == 0:
        return (0, 0, mask.shape[0], mask.shape[1])
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    ys, xs = np.nonzero(lab == sizes.argmax())
    return (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)


def summarize_class(subject, images, target=None, method: str = "gradcam", n_summaries: int = 4,
                    layer="auto", keep: float = 0.2, seed: int | None = 0, batch_size: int = 32,
                    progress: bool = False) -> ClassSummary:
    """Cluster the salient regions of `images` (a [N,3,H,W] tensor or any dataset source) for
    class `target` (an int or `sk.Class`; default: the most frequent top-1 class, and only the
    images predicted as it) into at most `n_summaries` visual summaries (see the module docstring)."""
    from sklearn.cluster import KMeans

    from ..engine import PassCounter
    from ..methods import explain
    from ..targets import Class
    from .bank import _as_input, layer_activations

    k = positive_int(n_summaries, "n_summaries")
    if not 0 < float(keep) < 1:
        raise SaliencyError(f"keep must be a share of the pixels in (0, 1), got {keep}")
    seed = resolve_seed(seed)
    x = _as_input(subject, images)
    counter = PassCounter()
    name = subject.find_layer(layer, x[:1])[0]
    acts, logits = layer_activations(subject, x, name, batch_size, counter, with_logits=True)
    pred = logits.argmax(1).cpu()
    if target is None:
        c = int(torch.bincount(pred).argmax())
        chosen = torch.nonzero(pred == c).flatten()
        x, acts = x[chosen], acts[chosen]
    else:
        c = target.c if isinstance(target, Class) else target
        if c is None or isinstance(c, (list, tuple)):
            raise SaliencyError(f"summarize_class explains one class: give its index or label, got {target!r}")
        c = subject.class_index(c, logits.shape[1])
    N = x.shape[0]
    if N < k:
        raise SaliencyError(f"{N} image(s) of class {c} are too few for {k} summaries: give more images "
                            "or ask for fewer summaries")
    exp = explain(subject, x, method, target=Class(c), layer=layer, batch_size=batch_size, progress=progress)
    counter.add(forward=round(exp.passes.get("forward", 0) * N), backward=round(exp.passes.get("backward", 0) * N))
    maps = exp.maps.detach().float().cpu()
    mask = salient_mask(maps, float(keep))
    w = torch.nn.functional.adaptive_avg_pool2d(mask.float()[:, None], acts.shape[-2:])[:, 0]      # [N,h,w]
    emb = (acts.clamp(min=0) * w[:, None]).sum((2, 3)) / w.sum((1, 2)).clamp(min=1e-12)[:, None]
    emb = torch.nn.functional.normalize(emb.double(), dim=1).numpy()
    km = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(emb)
    centres = km.cluster_centers_ / np.maximum(np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True), 1e-12)
    summaries = []
    for j in range(k):
        idx = np.nonzero(km.labels_ == j)[0]
        if len(idx) == 0:
            continue
        dist = 1 - emb[idx] @ centres[j]
        order = idx[np.argsort(dist, kind="stable")]
        summaries.append(Summary(len(idx) / N, order.tolist(), [largest_box(mask[i].numpy()) for i in order],
                                 float(dist.mean())))
    summaries.sort(key=lambda s: (-s.frequency, s.members[0]))
    assignment = np.empty(N, dtype=np.int64)
    for r, s in enumerate(summaries):
        assignment[s.members] = r
    return ClassSummary(summaries, c, assignment, maps, x.detach().cpu(), exp.target, exp.method, name, seed,
                        float(keep), counter.per_image(N))


__all__ = ["summarize_class", "ClassSummary", "Summary", "salient_mask", "largest_box"]
