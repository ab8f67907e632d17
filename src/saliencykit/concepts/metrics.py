"""How good a concept bank is, against known parts, and how much each concept carries a prediction.

The three checks of concept-based explanations proposed by Aysel et al. (2025, "Concept-based
XAI: metrics and benchmarks"), defined here for unsupervised banks, whose concepts carry no names:
each concept is first matched to the part it sits on, then

* **location** (their CLM): how often the concept's map peaks inside its part, over the images
  that show the part (the pointing game of the concept map); a random bank peaks where the
  activation is strong, which is the whole bird, not one part;
* **existence** (their CEM): over images with some parts removed, the share of each image's
  `top` most important concepts (importance > 0) whose part is really there, and per concept the AUROC of its share
  of the image's coefficients for "my part is in this image" (0.5 = the concept does not know;
  the share, not the raw coefficient, because removing any part lowers all coefficients a little);
* **global importance** (their CGIM): the Spearman correlation, over images and parts, between
  the importance the concepts give a part (the summed importance of the concepts matched to it)
  and the part's true effect on the model (the score drop when the part is removed from the
  image, measured by re-rendering it: `benchmarks.parts.leaderboard.PartsBench.part_drop`).

Matching: a concept's *lift* on part p is the share of its map's mass inside p's mask divided by
the share of the image p covers, averaged over the images showing p (1 = no better than spread
evenly); its part is the one of highest lift, and a concept whose best lift is below
`min_lift` (default 2) is matched to no part.

`removal_effect` is the fidelity a sentence can quote: the target's score with one concept's
coefficients set to zero everywhere in the layer (the rest of the activation unchanged), one
forward per concept and image through the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SaliencyError
from .bank import ConceptBank, concept_maps


@dataclass
class ConceptRemoval:
    """`clean` [B] target scores; `removed` [B,k] the scores with each concept removed; `drop`
    [B,k] the relative drop `(clean - removed) / |clean|`."""

    clean: torch.Tensor
    removed: torch.Tensor
    target: list
    passes: dict = field(default_factory=dict)

    @property
    def drop(self) -> torch.Tensor:
        return (self.clean[:, None] - self.removed) / self.clean.abs().clamp(min=1e-12)[:, None]


def removal_effect(subject, bank: ConceptBank, x: torch.Tensor, target=None, batch_size: int | None = None) -> ConceptRemoval:
    """The target's score (default: each image's top-1 class) with each concept of `bank` removed
    from the activation at its layer: k + 1 forward rows per image (the extra row rebuilds the
    clean activation from the decomposition and checks it gives the model's own score)."""
    from ..engine import PassCounter, forward_scores
    from .importance import _single, decomposed, intervention_view

    if not isinstance(bank, ConceptBank):
        raise SaliencyError(f"removal_effect needs a ConceptBank, got {type(bank).__name__}")
    x = subject.check_input(x)
    B, k = x.shape[0], bank.n_concepts
    counter = PassCounter()
    acts, resolved, U_all = decomposed(subject, bank, x, target, batch_size, counter)
    masks = torch.cat([torch.ones(1, k), 1 - torch.eye(k)]).to(x.device)          # [k+1, k]
    clean, removed = torch.zeros(B), torch.zeros(B, k)
    for b in range(B):
        view, _ = intervention_view(subject, bank, x, acts, U_all, b)
        with subject.explaining():
            f = forward_scores(view, lambda s, e: masks[s:e], k + 1, _single(resolved, b),
                               lambda s, e: torch.zeros(e - s, dtype=torch.long, device=x.device),
                               batch_size=batch_size, counter=counter).double().cpu()
        clean[b], removed[b] = float(f[0]), f[1:].float()
    return ConceptRemoval(clean, removed, resolved.describe(), counter.per_image(B))


@dataclass
class ConceptScores:
    """The ground-truth scores of one bank (see the module docstring). Per concept: `part` (the
    matched part or None), `lift` [k, parts], `location` [k] (NaN when the concept has no part or
    its part is never shown), `existence_auc` [k]; for the bank: `location_mean`, `existence`
    (CEM), `global_importance` (CGIM; NaN without ground-truth part effects)."""

    parts: list
    part: list
    lift: np.ndarray
    location: np.ndarray
    existence_auc: np.ndarray
    existence: float
    global_importance: float
    top: int
    matched_share: float
    passes: dict = field(default_factory=lambda: {"forward": 1.0, "backward": 0.0})   # the concept maps' pass

    @property
    def location_mean(self) -> float:
        v = self.location[np.isfinite(self.location)]
        return float(v.mean()) if len(v) else float("nan")

    @property
    def coverage(self) -> float:
        """The share of the parts that some concept is matched to: a bank that finds every part
        scores 1 (several concepts on one part and none on another is what a random bank does)."""
        return len({p for p in self.part if p is not None}) / len(self.parts)

    @property
    def existence_auc_mean(self) -> float:
        v = self.existence_auc[np.isfinite(self.existence_auc)]
        return float(v.mean()) if len(v) else float("nan")

    def to_dict(self) -> dict:
        def num(v):
            return None if v is None or not np.isfinite(v) else round(float(v), 4)

        return {"parts": list(self.parts), "top": self.top, "location_mean": num(self.location_mean),
                "existence": num(self.existence), "existence_auc_mean": num(self.existence_auc_mean),
                "global_importance": num(self.global_importance), "matched_share": num(self.matched_share),
                "coverage": num(self.coverage), "passes": self.passes,
                "concepts": [{"concept": j, "part": self.part[j], "lift": num(float(self.lift[j].max())),
                              "location": num(self.location[j]), "existence_auc": num(self.existence_auc[j])}
                             for j in range(len(self.part))]}


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the boolean `labels` (ties count half); NaN when
    one class is missing."""
    labels = np.asarray(labels, bool)
    pos, neg = np.asarray(scores)[labels], np.asarray(scores)[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def _as_masks(part_masks: dict, B: int, hw) -> dict:
    out = {}
    for name, m in part_masks.items():
        t = torch.as_tensor(np.asarray(m)).bool()
        if t.dim() != 3 or t.shape[0] != B:
            raise SaliencyError(f"part mask {name!r} must be [images, H, W] for {B} images, got {tuple(t.shape)}")
        if tuple(t.shape[1:]) != tuple(hw):
            t = torch.nn.functional.interpolate(t[:, None].float(), size=tuple(hw), mode="nearest")[:, 0] > 0.5
        out[str(name)] = t
    if not out:
        raise SaliencyError("no part masks given: score a bank against at least one known part")
    return out


def score_bank(subject, bank: ConceptBank, x: torch.Tensor, part_masks: dict, importance: torch.Tensor | None = None,
               part_effect: np.ndarray | None = None, top: int = 3, min_lift: float = 2.0,
               batch_size: int = 32, maps=None) -> ConceptScores:
    """Score `bank` on images `x` [B,3,H,W] whose parts are known (`part_masks`: {part: [B,H,W]
    bool}; a part an image lacks has an empty mask there). `importance` [B,k] (e.g. Sobol indices
    from `concepts.importance`) ranks each image's concepts for existence and weighs them for
    global importance; without it the concepts' coefficients are used. `part_effect` [B, parts]
    (the same part order) is the true effect of removing each part; without it CGIM is NaN.
    `maps`: the `concept_maps` of `x` when the caller has them already (no pass then)."""
    x = subject.check_input(x)
    B = x.shape[0]
    masks = _as_masks(part_masks, B, x.shape[-2:])
    parts = list(masks)
    cm = maps if maps is not None else concept_maps(subject, bank, x, batch_size)
    maps = cm.maps.clamp(min=0)                                   # [B,k,H,W]
    k = maps.shape[1]
    weight = cm.coefficients if importance is None else torch.as_tensor(importance, dtype=torch.float32)
    if tuple(weight.shape) != (B, k):
        raise SaliencyError(f"importance must be [{B}, {k}] (images x concepts), got {tuple(weight.shape)}")
    mass = maps.flatten(2).sum(2)                                 # [B,k]
    lift = np.zeros((k, len(parts)))
    for p, name in enumerate(parts):
        m = masks[name].float()                                   # [B,H,W]
        area = m.flatten(1).mean(1)                               # [B]
        shown = area > 0
        if not shown.any():
            lift[:, p] = np.nan
            continue
        inside = (maps * m[:, None]).flatten(2).sum(2) / mass.clamp(min=1e-12)     # [B,k]
        ok = shown[:, None] & (mass > 0)
        ratio = torch.where(ok, inside / area.clamp(min=1e-12)[:, None], torch.zeros_like(inside))
        lift[:, p] = (ratio.sum(0) / ok.sum(0).clamp(min=1)).numpy()
    best = np.nan_to_num(lift, nan=-1.0).argmax(1)
    part = [parts[int(best[j])] if np.nan_to_num(lift[j, best[j]], nan=0) >= min_lift else None for j in range(k)]
    flat = maps.flatten(2)
    peak = flat.argmax(2)                                          # [B,k]
    # a concept's share of the image's concepts: removing any part lowers every coefficient a
    # little (less activation overall), so the raw coefficient would "know" every part
    share = cm.coefficients / cm.coefficients.sum(1, keepdim=True).clamp(min=1e-12)
    location = np.full(k, np.nan)
    existence_auc = np.full(k, np.nan)
    for j in range(k):
        if part[j] is None:
            continue
        m = masks[part[j]].flatten(1)                              # [B,HW]
        shown = m.any(1) & (mass[:, j] > 0)
        if shown.any():
            hit = m[torch.arange(B), peak[:, j]]
            location[j] = float(hit[shown].float().mean())
        existence_auc[j] = auroc(share[:, j].numpy(), m.any(1).numpy())
    # CEM: of each image's `top` concepts (matched ones with a positive weight: a concept given no
    # importance is not claimed to be there), the share whose part is present
    top = max(1, min(int(top), k))
    present = torch.stack([masks[p].flatten(1).any(1) for p in parts], 1)   # [B,P]
    hits, total = 0, 0
    for b in range(B):
        order = torch.argsort(weight[b], descending=True, stable=True).tolist()
        chosen = [j for j in order if part[j] is not None and weight[b, j] > 0][:top]
        for j in chosen:
            hits += bool(present[b, parts.index(part[j])])
            total += 1
    existence = hits / total if total else float("nan")
    cgim = float("nan")
    if part_effect is not None:
        eff = np.asarray(part_effect, dtype=np.float64)
        if eff.shape != (B, len(parts)):
            raise SaliencyError(f"part_effect must be [{B}, {len(parts)}] (images x parts, in the order "
                                f"{', '.join(parts)}), got {eff.shape}")
        by_part = np.zeros((B, len(parts)))
        for j in range(k):
            if part[j] is not None:
                by_part[:, parts.index(part[j])] += weight[:, j].numpy()
        from scipy.stats import spearmanr

        a, b_ = by_part.ravel(), eff.ravel()
        if np.ptp(a) > 0 and np.ptp(b_) > 0:
            cgim = float(spearmanr(a, b_).statistic)
    matched = sum(p is not None for p in part) / k
    return ConceptScores(parts, part, lift, location, existence_auc, existence, cgim, top, matched)


def random_bank(bank: ConceptBank, seed: int = 0) -> ConceptBank:
    """A bank of the same shape and layer with uniform random non-negative directions (seeded):
    the baseline every ground-truth score is read against."""
    g = torch.Generator().manual_seed(int(seed))
    return ConceptBank(torch.rand(bank.basis.shape, generator=g), bank.layer, method="random", seed=int(seed),
                       model=bank.model)


__all__ = ["removal_effect", "ConceptRemoval", "score_bank", "ConceptScores", "auroc", "random_bank"]
