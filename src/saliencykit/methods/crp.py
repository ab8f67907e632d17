"""CRP: concept relevance propagation (Achtibat et al. 2023), LRP conditioned on a concept.

`sk.explain(subject, x, "crp", target=sk.Class(c), concept=(layer, channel))` runs the project's
LRP (`propagation.lrp_relevance`, same rules, composites and parameters) and, where relevance
passes `layer`, keeps only the concept's share before propagating further to the input:

  * `channel` an int or a list of ints: the relevance of those channels is kept, the others'
    set to zero (a 0/1 mask over the channel axis);
  * `channel = (bank, k)`, any object with `.basis` [K, C] (non-negative directions over the
    layer's channels) and `.layer` (a concept bank): each channel's relevance at each location is
    split between the bank's concepts in proportion to their part of the activation there,
    `mask_k(c, h, w) = u_k(h, w) W_kc / sum_j u_j(h, w) W_jc`, with `u = max(0, a Wᵀ (W Wᵀ)⁻¹)` the
    clamped least-squares coefficients of the (clamped) activation (a location no concept
    explains is shared equally). `concept=(bank, k)` alone means the bank's own layer.

In LRP's representation the relevance at a layer is `a * g` (g the modified gradient), so masking
the relevance is masking the gradient: the layer's output keeps its value and its backward is
multiplied by the mask. The backward is linear in what arrives at the layer, so the CRP maps of
all channels of a layer (or of all concepts of a bank) sum to the plain LRP map (conservation).
This module does not import the concepts room: a bank is read by its attributes.
"""
from __future__ import annotations

import torch

from ..errors import SaliencyError
from .base import ANY_LAYOUT, Method, register
from .propagation import LRP, lrp_relevance


def _is_bank(obj) -> bool:
    return hasattr(obj, "basis") and hasattr(obj, "layer")


def channel_mask(channels: list[int]):
    """mask_fn for a 0/1 mask keeping `channels` of a [B, C, ...] output."""

    def mask_fn(out):
        C = out.shape[1]
        bad = [c for c in channels if not 0 <= c < C]
        if bad:
            raise SaliencyError(f"channel(s) {bad} are not in 0..{C - 1} at this layer")
        m = torch.zeros(C, dtype=out.dtype, device=out.device)
        m[channels] = 1
        return m.view(1, C, *([1] * (out.dim() - 2)))

    return mask_fn


def bank_share_mask(basis: torch.Tensor, k: int):
    """mask_fn giving concept k's share of each channel's relevance at each location (see the
    module docstring); the masks of all concepts of the bank sum to 1."""
    W = torch.as_tensor(basis).detach().double().cpu()
    projector = W.T @ torch.linalg.pinv(W @ W.T)                                    # [C, K]

    def mask_fn(out):
        if out.dim() < 2:
            raise SaliencyError(f"conditioning on a concept bank needs a layer output [B,C,...], got {tuple(out.shape)}")
        if out.shape[1] != W.shape[1]:
            raise SaliencyError(f"the bank has {W.shape[1]} channels and the layer has {out.shape[1]}: the bank "
                                "was made on another model or layer")
        a = out.double().clamp(min=0)
        Wd, P = W.to(a.device), projector.to(a.device)
        # any axes after the channel axis: a series' [B,C,t], an image's [B,C,h,w], a volume's [B,C,d,h,w]
        u = torch.einsum("bc...,ck->bk...", a, P).clamp(min=0)
        parts = torch.einsum("bk...,kc->bkc...", u, Wd)                            # [B, K, C, ...]
        total = parts.sum(1)
        share = torch.where(total > 0, parts[:, k] / torch.where(total > 0, total, torch.ones_like(total)),
                            torch.full_like(total, 1.0 / W.shape[0]))
        return share.to(out.dtype)

    return mask_fn


def resolve_concept(subject, concept, x):
    """`concept` -> (layer name, mask_fn, a JSON-able description)."""
    if isinstance(concept, tuple) and len(concept) == 2 and _is_bank(concept[0]):
        concept = (concept[0].layer, concept)
    if not (isinstance(concept, (tuple, list)) and len(concept) == 2):
        raise SaliencyError("crp needs concept=(layer, channel), the channel an int, a list of ints, or (bank, k); "
                            f"got {concept!r}")
    layer, which = concept
    name = subject.find_layer(layer, x[:1])[0]
    if isinstance(which, tuple) and len(which) == 2 and _is_bank(which[0]):
        bank, k = which
        K = int(bank.basis.shape[0])
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < K:
            raise SaliencyError(f"concept index {k!r} is not in 0..{K - 1}")
        if subject.find_layer(bank.layer, x[:1])[0] != name:
            raise SaliencyError(f"the bank belongs to layer {bank.layer!r}, not {name!r}")
        return name, bank_share_mask(bank.basis, k), {"layer": name, "bank": getattr(bank, "method", "bank"),
                                                       "concept": k, "n_concepts": K}
    channels = [which] if isinstance(which, int) and not isinstance(which, bool) else which
    if not isinstance(channels, (list, tuple)) or not channels or \
            not all(isinstance(c, int) and not isinstance(c, bool) for c in channels):
        raise SaliencyError(f"a CRP channel is an int, a non-empty list of ints or (bank, k); got {which!r}")
    return name, channel_mask(sorted(set(channels))), {"layer": name, "channels": sorted(set(channels))}


@register
class CRP(Method):
    name = "crp"
    family = "propagation"
    changes_model = True  # LRP's batch-norm merge
    cost = "1F+1B (modified)"
    signed = True
    defaults = {**LRP.defaults, "concept": None}
    requires = ("concept",)
    description = ("Concept relevance propagation (Achtibat et al. 2023): LRP whose relevance at a layer is "
                   "restricted to chosen channels or to a concept bank direction before it reaches the input. "
                   "Any layout LRP reads: the channels of a series', a volume's or a clip's layer, or the "
                   "features of an MLP's layer.")
    # the masks act on the layer output's channel axis (dim 1), whatever follows it
    layouts = ANY_LAYOUT

    def run(self, ctx, target, layer, concept=None, reduce="sum", **lrp):
        from ..engine import reduce_channels

        if concept is None:
            raise SaliencyError("crp needs concept=(layer, channel): which channel(s) or (bank, k) to condition on")
        name, mask_fn, described = resolve_concept(ctx.subject, concept, ctx.x)
        out = lrp_relevance(ctx.subject, ctx.x, target, counter=ctx.counter, condition=(name, mask_fn), **lrp)
        rel = out["relevance"]
        kept = out["layer_relevance"] * out["layer_mask"]       # the concept's relevance at the layer
        extras = {"concept": described, "relevance_sum": rel.flatten(1).sum(1).tolist(),
                  "layer_relevance_sum": out["layer_relevance"].flatten(1).sum(1).tolist(),
                  "concept_relevance": kept.flatten(1).sum(1).tolist(),
                  "score": out["scores"].tolist(), "composite": lrp.get("composite", LRP.defaults["composite"]),
                  "merged_batchnorm": [list(p) for p in out["merged"]]}
        if out["undefined"]:
            extras["gradient_through"] = out["undefined"]
        return {"maps": reduce_channels(rel, reduce, ctx.layout), "attributions": rel, "signed": reduce in ("sum", "mean"),
                "extras": extras}


__all__ = ["CRP", "resolve_concept", "channel_mask", "bank_share_mask"]
