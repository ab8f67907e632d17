"""Relevance maximisation (Achtibat et al. 2023): the reference patches where a channel is most
RELEVANT to a prediction, beside activation maximisation (where it is most ACTIVE).

For every image, one LRP pass (`methods.propagation.lrp_relevance`, the CRP conditioning layer
with no mask) gives the relevance that reaches `layer` for the target (default each image's top-1
class), `R(c, h, w) = a * g`:
  * relevance maximisation ranks the images by the channel's total relevance `sum_{h,w} R(c,h,w)`
    and crops each around the location of its largest relevance;
  * activation maximisation ranks them by the channel's largest activation `max_{h,w} a(c,h,w)`
    and crops around that location.
A crop is a square of side `patch` x the image side centred on the layer cell's centre (shifted to
stay inside the image). A channel can be very active where it does not matter to the class (its
activation is cancelled further up): the two rankings then differ.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import SaliencyError, positive_int


@dataclass
class Reference:
    """The top images of one ranking: `indices` [n] into the images, `scores` [n], `boxes` [n, 4]
    (top, left, bottom, right) and `patches` [n, 3, s, s]."""

    indices: list
    scores: list
    boxes: list
    patches: torch.Tensor


@dataclass
class RelevanceMax:
    relevance: Reference
    activation: Reference
    layer: str
    channel: int
    relevance_per_image: torch.Tensor     # [N] the channel's total relevance
    activation_per_image: torch.Tensor    # [N] the channel's largest activation
    target: list
    passes: dict = field(default_factory=dict)


def _crop_box(cell: int, h: int, w: int, H: int, W: int, side: int) -> list:
    i, j = divmod(cell, w)
    cy, cx = (i + 0.5) * H / h, (j + 0.5) * W / w
    top = int(round(min(max(cy - side / 2, 0), H - side)))
    left = int(round(min(max(cx - side / 2, 0), W - side)))
    return [top, left, top + side, left + side]


def _reference(x, order, scores, where, h, w, side) -> Reference:
    H, W = x.shape[-2:]
    boxes = [_crop_box(int(where[i]), h, w, H, W, side) for i in order]
    patches = torch.stack([x[i, :, t:b, l_:r] for i, (t, l_, b, r) in zip(order, boxes)])
    return Reference(list(order), [float(scores[i]) for i in order], boxes, patches.detach().cpu())


def relevance_max(subject, images, layer, channel: int, n: int = 8, target=None, patch: float = 0.25,
                  composite: str = "epsilon_plus_flat", batch_size: int = 16) -> RelevanceMax:
    """The `n` images (and patches) where `channel` of `layer` is most relevant to the target,
    and the `n` where it is most active. See the module docstring."""
    from ..engine import PassCounter, forward_logits, spans
    from ..methods.propagation import lrp_relevance
    from ..targets import ResolvedTarget, as_target
    from .bank import _as_input

    n = positive_int(n, "n")
    if isinstance(channel, bool) or not isinstance(channel, int):
        raise SaliencyError(f"channel must be an int, got {channel!r}")
    if not 0 < float(patch) <= 1:
        raise SaliencyError(f"patch must be a fraction of the image side in (0, 1], got {patch}")
    x = _as_input(subject, images)
    name = subject.find_layer(layer, x[:1])[0]
    counter = PassCounter()
    with torch.no_grad(), subject.explaining():      # the logits fix the target; the layer is read by LRP below
        logits = forward_logits(subject, x, batch_size, counter)
    resolved = as_target(target).resolve(subject, logits)
    rel, act = [], []
    with subject.explaining():
        for s, e in spans(x.shape[0], batch_size):
            part = ResolvedTarget(resolved.pos[s:e], resolved.neg[s:e], resolved.output, resolved.kind)
            out = lrp_relevance(subject, x[s:e], part, composite=composite, counter=counter, condition=(name, None))
            a = out["layer_output"]
            if a.dim() != 4:
                raise SaliencyError(f"layer {name!r} has no spatial output [B,C,h,w] (got {tuple(a.shape)})")
            if not 0 <= channel < a.shape[1]:
                raise SaliencyError(f"channel {channel} is not in 0..{a.shape[1] - 1} at layer {name!r}")
            rel.append(out["layer_relevance"][:, channel].float().cpu())
            act.append(a[:, channel].float().cpu())
    rel, act = torch.cat(rel), torch.cat(act)                # [N, h, w]
    N, h, w = rel.shape
    side = max(1, int(round(float(patch) * min(x.shape[-2:]))))
    r_score, a_score = rel.flatten(1).sum(1), act.flatten(1).amax(1)
    top = min(n, N)
    r_order = torch.argsort(r_score, descending=True, stable=True)[:top].tolist()
    a_order = torch.argsort(a_score, descending=True, stable=True)[:top].tolist()
    return RelevanceMax(_reference(x, r_order, r_score, rel.flatten(1).argmax(1), h, w, side),
                        _reference(x, a_order, a_score, act.flatten(1).argmax(1), h, w, side),
                        name, channel, r_score, a_score, resolved.describe(), counter.per_image(N))


__all__ = ["relevance_max", "RelevanceMax", "Reference"]
