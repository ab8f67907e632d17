"""Explaining similarity between two images under an embedding model.

* `Similarity(reference)` target: the score of a row is `cos(φ(x), φ(r))` (or the dot product)
  where `φ` is the Subject's output (an embedding model: DINOv2's CLS token, a CNN's pooled
  features) and `r` the reference image (photo, input tensor) or embedding. The reference is
  embedded once, without gradient, so every method (gradients, CAMs, RISE-style perturbations)
  explains the query while the reference is held fixed. One reference per example is allowed.
* `explain_pair(subject, q, r, method)`: maps for both images in one batched call (q against r and
  r against q); swapping the images swaps the maps.
* `point_to_point(subject, q, r, layer)`: the decomposition of Zhu et al. 2019 for embeddings that
  are the global average of a last conv layer's per-location vectors (optionally mapped by a
  linear `head`): `P_ij = e_i · e'_j / (hw · h'w')` (divided by `‖f‖‖f'‖` for cosine), which
  sums exactly to the similarity; the map of each image is the row/column sum of `P`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..engine import upsample
from ..errors import SaliencyError
from ..hooks import forward_at
from ..targets import Side, Target

MEASURES = ("cosine", "dot")


class ResolvedScore:
    """A resolved target given by a function of the model output, `fn(out, rows) -> [N]`.

    Duck-types `targets.ResolvedTarget` (score, transform, describe, key, pos/neg sides): used by
    the similarity, text (CLIP) and box (detector) targets. Their score is already the quantity
    explained, so `output` ("logit"/"prob"/...) does not change it.
    """

    def __init__(self, fn: Callable, batch: int, kind: str, names: list[str], key: tuple):
        self.fn = fn
        self.batch = batch
        self.kind = kind
        self.output = "logit"
        self.names = names
        self._key = key
        self.pos = [Side([], kind, n) for n in names]
        self.neg = [None] * batch

    def __len__(self):
        return self.batch

    def transform(self, logits, output=None):
        return logits

    def score(self, logits: torch.Tensor, rows: torch.Tensor | None = None, output: str | None = None):
        if rows is None:
            if logits.shape[0] != self.batch:
                raise SaliencyError(f"{logits.shape[0]} outputs for {self.batch} targets")
            rows = torch.arange(self.batch, device=logits.device)
        return self.fn(logits, rows.to(logits.device))

    def describe(self) -> list[dict]:
        return [{"kind": self.kind, "indices": [], "name": n, "output": self.kind} for n in self.names]

    def key(self) -> tuple:
        return self._key


def _embed(subject, reference) -> torch.Tensor:
    """Reference -> embedding [R, D] (photo, list of photos, input tensor [R,C,H,W] or embedding [D]/[R,D])."""
    if isinstance(reference, torch.Tensor):
        if reference.dim() in (1, 2):
            return reference.detach().float().reshape(-1, reference.shape[-1]).to(subject.device)
        if reference.dim() == 4:
            x = subject.check_input(reference)
        elif reference.dim() == 3:
            x = subject.check_input(reference.unsqueeze(0))
        else:
            raise SaliencyError(f"reference tensor of shape {tuple(reference.shape)} is neither an image batch "
                                "[R,C,H,W] nor an embedding [D] / [R,D]")
    else:
        x = subject.preprocess(reference if isinstance(reference, (list, tuple)) else [reference])
    with torch.no_grad():
        return subject.forward(x).detach().float()


class Similarity(Target):
    """Why is `x` similar to `reference` under the Subject's embedding?

    `reference`: a photo (path / PIL / array), a list of photos (one per example), an input tensor
    `[R,C,H,W]` in the model's normalised space, or an embedding `[D]` / `[R,D]`. `measure`:
    "cosine" (default) or "dot".
    """

    def __init__(self, reference, measure: str = "cosine", name: str | None = None):
        if measure not in MEASURES:
            raise SaliencyError(f"similarity measure must be one of {MEASURES}, got {measure!r}")
        self.reference = reference
        self.measure = measure
        self.name = name or f"{measure} similarity to the reference"

    def __repr__(self):
        return f"Similarity(measure={self.measure!r})"

    def resolve(self, subject, logits):
        ref = _embed(subject, self.reference).to(logits.device)
        batch, dim = logits.shape
        if ref.shape[1] != dim:
            raise SaliencyError(f"reference embedding has {ref.shape[1]} dimensions, the model outputs {dim}")
        if ref.shape[0] not in (1, batch):
            raise SaliencyError(f"{ref.shape[0]} references for a batch of {batch} examples (give 1 or {batch})")
        ref = ref.expand(batch, dim)
        measure = self.measure

        def fn(out, rows):
            r = ref[rows].to(out.dtype)
            if measure == "cosine":
                return F.cosine_similarity(out, r, dim=1, eps=1e-12)
            return (out * r).sum(1)

        key = ("similarity", measure, tuple(round(float(v), 6) for v in ref.flatten()[:64]), tuple(ref.shape))
        return ResolvedScore(fn, batch, "similarity", [self.name] * batch, key)


class PooledFeatures(torch.nn.Module):
    """A classifier cut at a conv layer: `x -> mean_hw(layer(x))` `[B, C]` (the rest of the forward
    still runs, its output is discarded)."""

    def __init__(self, model: torch.nn.Module, layer: str):
        super().__init__()
        self.model = model
        self.layer = layer

    def forward(self, x):
        _, feats = forward_at(self.model, self.layer, x)
        if not isinstance(feats, torch.Tensor) or feats.dim() != 4:
            raise SaliencyError(f"layer {self.layer!r} does not output a conv feature map [B,C,h,w]")
        return feats.mean((2, 3))


def embedding_subject(subject, layer="auto"):
    """A Subject whose output is the global-average-pooled features of `layer` of `subject`'s model
    (e.g. EfficientNet-Lite0's penultimate features with `layer="auto"`); its layer for CAMs and
    `point_to_point` is `model.<layer>`, so the decomposition is exact."""
    from ..subject import Subject

    name = subject.find_layer(layer)[0]
    emb = Subject(PooledFeatures(subject.model, name), preprocess=subject._preprocess, mean=subject.mean,
                  std=subject.std, input_size=subject.input_size, layer=f"model.{name}",
                  name=f"{subject.name}:{name}:pooled", groups=None)
    return emb


def explain_pair(subject, q, r, method="gradcam", measure: str = "cosine", **kwargs):
    """Explain the similarity of images `q` and `r` (input tensors `[1,C,H,W]` or photos) for both:
    returns `(explanation_of_q, explanation_of_r)` from one batched call on `[q; r]`."""
    from ..methods import explain

    xq = q if isinstance(q, torch.Tensor) else subject.preprocess(q)
    xr = r if isinstance(r, torch.Tensor) else subject.preprocess(r)
    if xq.dim() == 3:
        xq = xq.unsqueeze(0)
    if xr.dim() == 3:
        xr = xr.unsqueeze(0)
    if xq.shape[0] != 1 or xr.shape[0] != 1:
        raise SaliencyError("explain_pair takes one query and one reference image")
    x = torch.cat([xq, xr])
    exp = explain(subject, x, method=method, target=Similarity(torch.cat([xr, xq]), measure=measure), **kwargs)
    return _split(exp, 0), _split(exp, 1)


def _split(exp, i):
    from ..explanation import Explanation

    if isinstance(exp, dict):
        return {k: _split(v, i) for k, v in exp.items()}
    return Explanation(maps=exp.maps[i:i + 1], method=exp.method, signed=exp.signed, target=exp.target[i:i + 1],
                       layer=exp.layer, params=exp.params, seed=exp.seed, passes=exp.passes, seconds=exp.seconds,
                       raw=None if exp.raw is None else exp.raw[i:i + 1],
                       attributions=None if exp.attributions is None else exp.attributions[i:i + 1],
                       model=exp.model, extras=exp.extras)


def point_to_point(subject, q: torch.Tensor, r: torch.Tensor, layer="auto", head: Callable | None = None,
                   measure: str = "cosine") -> dict:
    """Point-to-point similarity decomposition (Zhu et al. 2019) at a pooled conv layer.

    With per-location embeddings `e_i = head(A_i)` (`head` linear or None = identity) and the
    image embedding `f = mean_i e_i`, returns `P [h*w, h'*w']` with `sum(P) == s(q, r)`, the maps
    `map_q [h,w] = P.sum(1)`, `map_r [h',w'] = P.sum(0)` (raw and upsampled to the inputs), the
    similarity `s`, and `model_similarity` (the same measure on the Subject's own outputs, equal to
    `s` when the model's embedding is the pooled layer). One forward per image, no backward.
    """
    if measure not in MEASURES:
        raise SaliencyError(f"similarity measure must be one of {MEASURES}, got {measure!r}")
    xq, xr = subject.check_input(q), subject.check_input(r)
    if xq.shape[0] != 1 or xr.shape[0] != 1:
        raise SaliencyError("point_to_point takes one query and one reference image")
    with subject.explaining():
        name = subject.find_layer(layer, xq)[0]
        feats, outs = [], []
        with torch.no_grad():
            for x in (xq, xr):  # the two images may differ in size
                with subject.capture([name]) as cap:
                    outs.append(subject.forward(x).float())
                    feats.append(cap.get(name).detach().double())
    for f in feats:
        if f.dim() != 4:
            raise SaliencyError(f"layer {name!r} outputs shape {tuple(f.shape)}; the decomposition needs a conv "
                                "feature map [1,C,h,w]")
    (A, B) = feats
    hq, wq = A.shape[-2:]
    hr, wr = B.shape[-2:]
    ea = A[0].flatten(1).t()  # [hw, C]
    eb = B[0].flatten(1).t()
    if head is not None:
        ea, eb = head(ea.float()).double(), head(eb.float()).double()
    P = ea @ eb.t() / (ea.shape[0] * eb.shape[0])
    fa, fb = ea.mean(0), eb.mean(0)
    if measure == "cosine":
        P = P / (fa.norm() * fb.norm()).clamp_min(1e-12)
        s = float(F.cosine_similarity(fa, fb, dim=0))
        ms = float(F.cosine_similarity(outs[0][0], outs[1][0], dim=0))
    else:
        s = float(fa @ fb)
        ms = float(outs[0][0] @ outs[1][0])
    map_q = P.sum(1).view(hq, wq).float()
    map_r = P.sum(0).view(hr, wr).float()
    return {"P": P.float(), "similarity": s, "model_similarity": ms, "layer": name,
            "raw_q": map_q, "raw_r": map_r,
            "map_q": upsample(map_q[None], xq.shape[-2:])[0], "map_r": upsample(map_r[None], xr.shape[-2:])[0]}


__all__ = ["Similarity", "ResolvedScore", "explain_pair", "point_to_point", "embedding_subject", "PooledFeatures"]
