"""Plain-language verbalization of a saliency map, in which every number is measured.

`verbalize(subject, x, explanation)` turns a map into a short paragraph a non-expert can read,
following the image adaptation of saliency-map verbalization: the map is cut
into regions (thresholded connected components of the positive evidence, or caller-given part
masks), each region is described by its position on a 3x3 layout, its size and its share of the
positive evidence, and the effect of hiding it and of keeping only it is *measured* with real
forward passes through the shared perturbation runner (`engine.perturbed_scores`).

The paragraph is built sentence by sentence from `Verbalization.facts`; each sentence records
which facts its numbers come from (`Verbalization.sentences`), so the text can be checked
against the numbers mechanically.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ..engine import perturbed_scores, upsample
from ..errors import SaliencyError
from ..explanation import Explanation
from ..targets import Side, Target
from .names import METHOD_NAMES, method_title  # noqa: F401  (re-exported: they lived here)
from .words import (_ORDINALS, Verbalization, _change, _closing, _components,  # noqa: F401
                    _centroid, _count_word, _model_says, _opening, _place, _Sentences, _warning_notes, fmt_corr,
                    fmt_pct)  # noqa: F401  (fmt_corr re-exported: it lived here)

HIDE_WORDS = {
    "blur": "replacing it with a blurred copy of the photo",
    "black": "painting it black",
    "zero": "painting it black",
    "mean": "filling it with the average colour",
    "white": "painting it white",
}


# ------------------------------------------------------------------------------------- regions
def _as_map(explanation, index: int, hw) -> tuple[torch.Tensor, str, bool]:
    if isinstance(explanation, Explanation):
        if not 0 <= index < len(explanation):
            raise SaliencyError(f"index {index} is out of range for an explanation of {len(explanation)} maps")
        m, name, signed = explanation.maps[index], explanation.method, explanation.signed
    elif isinstance(explanation, torch.Tensor):
        m = explanation
        if m.dim() == 3:
            m = m[index]
        name, signed = "map", bool((m < 0).any())
    else:
        raise SaliencyError(f"verbalize needs an Explanation or a [H,W] map tensor, got {type(explanation).__name__}")
    if m.dim() != 2:
        raise SaliencyError(f"a map must be [H,W], got shape {tuple(m.shape)}")
    if not torch.isfinite(m).all():
        raise SaliencyError("the map contains NaN or infinite values")
    m = m.detach().float().cpu()
    if tuple(m.shape) != tuple(hw):
        m = upsample(m[None], hw)[0]
    return m, name, signed


def _cell_edges(n: int, cells: int) -> np.ndarray:
    return np.round(np.linspace(0, n, cells + 1)).astype(int)


def searched_regions(evidence: np.ndarray, cells: int = 7, tau: float = 0.4, k: int = 3,
                     max_overlap: float = 0.3) -> list[dict]:
    """Regions found by search over candidate sets of grid cells (the saliency-map verbalization
    search adapted to images).

    The image is cut into `cells` x `cells` cells; a cell's score is its summed positive evidence,
    normalised by the largest cell score. Candidates: *span* search, every k x k window of cells
    (k = 1, 2, 3); *convolution* search, every non-contiguous pattern of 2-4 cells inside a 3x3
    window of cells (every binary pattern, the windows themselves excepted). A candidate's value
    is the sum of its cells' scores; it is salient when value >= tau * mean(cell scores) * size.
    Salient candidates are taken greedily by value (ties: fewer cells), skipping any whose cell-set
    IoU with an already taken one exceeds `max_overlap`, until `k` are taken. After the first, a
    candidate's value counts only cells not yet described (and must still pass the salience rule):
    with the IoU rule alone a large window sharing one strong cell with the first region would be
    reported again as a "second region" holding the same evidence. Returns, best first, dicts with
    the pixel `mask`, the `cells` ((row, col) pairs), `value` (what it added), `kind` ("span" or
    "pattern") and `coverage` (share of all positive evidence in its cells).
    """
    from itertools import combinations

    h, w = evidence.shape
    cells = max(1, min(cells, h, w))
    ey, ex = _cell_edges(h, cells), _cell_edges(w, cells)
    score = np.array([[evidence[ey[i]:ey[i + 1], ex[j]:ex[j + 1]].sum() for j in range(cells)]
                      for i in range(cells)], dtype=np.float64)
    top = score.max()
    if top <= 0:
        return []
    a = score / top
    mean = float(a.mean())
    cands: dict[frozenset, str] = {}
    for size in (1, 2, 3):
        for i in range(cells - size + 1):
            for j in range(cells - size + 1):
                cands.setdefault(frozenset((i + di, j + dj) for di in range(size) for dj in range(size)), "span")
    offsets = [(di, dj) for di in range(3) for dj in range(3)]
    for i in range(max(cells - 2, 0)):
        for j in range(max(cells - 2, 0)):
            for n in (2, 3, 4):
                for pattern in combinations(offsets, n):
                    cands.setdefault(frozenset((i + di, j + dj) for di, dj in pattern), "pattern")

    def salient(value, size):
        return value > 0 and value >= tau * mean * size

    pool = [(members, kind) for members, kind in cands.items()
            if salient(float(sum(a[c] for c in members)), len(members))]
    taken: list[tuple] = []
    covered: set = set()
    while len(taken) < k:
        best = None
        for members, kind in pool:
            if any(len(members & t[1]) / len(members | t[1]) > max_overlap for t in taken):
                continue
            # value of what the candidate adds: cells already described are not counted again
            value = float(sum(a[c] for c in members - covered))
            if not salient(value, len(members)):
                continue
            key = (-value, len(members), sorted(members))
            if best is None or key < best[0]:
                best = (key, value, members, kind)
        if best is None:
            break
        taken.append(best[1:])  # (value, members, kind)
        covered |= best[2]
    total = float(score.sum())
    out = []
    for value, members, kind in taken:
        mask = np.zeros((h, w), dtype=bool)
        members = sorted(members)
        for i, j in members:
            mask[ey[i]:ey[i + 1], ex[j]:ex[j + 1]] = True
        out.append({"mask": mask, "cells": [list(c) for c in members], "value": value, "kind": kind,
                    "coverage": float(sum(score[c] for c in members)) / total})
    return out


def _part_masks(parts, hw) -> dict[str, np.ndarray]:
    if parts is None:
        return {}
    if not isinstance(parts, Mapping):
        raise SaliencyError("parts must be a mapping {name: mask [H,W]}")
    out = {}
    for name, mask in parts.items():
        t = torch.as_tensor(np.asarray(mask)).float()
        if t.dim() == 3 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 2:
            raise SaliencyError(f"part mask {name!r} must be [H,W], got shape {tuple(t.shape)}")
        if tuple(t.shape) != tuple(hw):
            t = torch.nn.functional.interpolate(t[None, None], size=tuple(hw), mode="nearest")[0, 0]
        m = t.numpy() > 0.5
        if not m.any():
            raise SaliencyError(f"part mask {name!r} is empty")
        out[str(name)] = m
    return out


def _location(mask: np.ndarray, weight: np.ndarray) -> dict:
    """Where a region is: evidence-weighted centroid on a 3x3 layout, plus border / spread cases."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cy, cx = _centroid(mask, weight)
    row, col = min(int(cy * 3), 2), min(int(cx * 3), 2)
    words = _place(row, col)
    bh = (ys.max() - ys.min() + 1) / h
    bw = (xs.max() - xs.min() + 1) / w
    band_y, band_x = max(1, round(0.1 * h)), max(1, round(0.1 * w))
    in_band = (ys < band_y) | (ys >= h - band_y) | (xs < band_x) | (xs >= w - band_x)
    border = float(in_band.mean())
    if bh > 0.8 and bw > 0.8:
        phrase = "spread over most of the image"
    elif border >= 0.6:
        phrase = f"along the image border at the {words}" if words != "centre" else "along the image border"
    else:
        phrase = f"in the {words} of the image"
    return {"centroid": [round(cy, 4), round(cx, 4)], "grid_cell": [row, col], "words": words,
            "phrase": phrase, "border_fraction": round(border, 4),
            "bbox": [int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1]}


# ------------------------------------------------------------------------------------- targets


def _group_phrase(side: Side) -> str:
    if side.kind == "topk":
        return f"the top classes *{side.name}*"
    if side.name.startswith("{"):
        return f"one of *{side.name.strip('{}')}*"
    return f"any kind of *{side.name}*"


# ------------------------------------------------------------------------------------- main
def verbalize(subject, x: torch.Tensor, explanation, target: Target | str | int | None = None, *,
              index: int = 0, threshold: float = 0.5, max_regions: int = 3, min_area: float = 0.005,
              smooth: float = 0.02, grid: int = 14, random_regions: int = 8, seed: int = 0, regions: str = "components",
              search_cells: int = 7, parts: Mapping | None = None, compare=None,
              baseline: str | torch.Tensor | None = None, batch_size: int | None = None,
              feature_names: Sequence[str] | None = None) -> Verbalization:
    """Describe in plain words what a saliency map shows, with measured numbers only.

    Args:
        subject: the `Subject` whose output was explained.
        x: `[B,C,H,W]` input (the example `index` is described); or a series `[B,C,T]`, a volume
            `[B,C,D,H,W]`, a feature vector `[B,F]` (`present.verbalize_layouts`: stretches of time
            steps, regions by slice and 3x3x3 position, the features of most evidence).
        explanation: an `Explanation` (or a `[H,W]` / `[B,H,W]` map tensor; the input's shape
            without its channel axis on other layouts).
        target: what was explained; default the explanation's own target (or the top-1 class).
            Contrasts read "rather than B", groups "any kind of dog".
        threshold: a pixel belongs to a region when its positive evidence is at least
            `threshold` x the map's maximum (regions = connected components of those pixels).
        max_regions: how many regions are described (strongest first).
        min_area: components smaller than this share of the image are ignored.
        smooth: Gaussian sigma (fraction of the image size) applied before thresholding, so that
            speckled pixel-level maps form regions; 0 thresholds the raw map.
        grid: the rank correlation with `compare` maps is taken over the positive evidence summed
            on a `grid` x `grid` layout (pixel-level ranks of a speckled map against a smooth one
            say little).
        regions: "components" (connected components of the thresholded map), "search" (sets of
            grid cells found by the span / pattern search of `searched_regions`, up to
            `max_regions` with at most 30 % overlap; `facts["search"]` keeps each one's cells,
            value and kind) or "parts" (the given `parts` masks are the regions).
        search_cells: the grid of the "search" mode (`search_cells` x `search_cells` cells).
        parts: optional `{name: mask [H,W]}`; a region whose evidence lies mostly (>= 50 %) inside
            one part is named after it ("the head").
        compare: other Explanation(s) of the same input and target; each gets a sentence with its
            share of positive evidence inside the main region and its Spearman rank correlation.
        random_regions: how many random placements of the main region's shape (same area) are
            hidden for comparison (0 = none); their mean effect gets a sentence.
        seed: seed of those random placements; same seed, same text.
        baseline: what hidden pixels are replaced with ("blur", "black", "mean", or a tensor);
            default "blur" ("zero" for a feature vector, which has no neighbours to blur over).
        batch_size: chunk size for the perturbed forward passes.
        feature_names: names of the features of a `[B,F]` input (default `subject.feature_names`
            if it has them, else f0, f1, ...).

    Returns:
        `Verbalization` with `.text`, `.facts`, `.sentences`, `.to_json()`.
    """
    from ..methods.gradient import make_baseline

    if not 0 < threshold <= 1:
        raise SaliencyError(f"threshold must be in (0, 1], got {threshold}")
    if not isinstance(max_regions, int) or max_regions < 1:
        raise SaliencyError(f"max_regions must be a positive integer, got {max_regions!r}")
    if not 0 <= smooth < 1:
        raise SaliencyError(f"smooth must be in [0, 1), got {smooth}")
    if not isinstance(search_cells, int) or search_cells < 3:
        raise SaliencyError(f"search_cells must be an integer >= 3, got {search_cells!r}")
    if not isinstance(grid, int) or grid < 2:
        raise SaliencyError(f"grid must be an integer >= 2, got {grid!r}")
    if not isinstance(random_regions, int) or random_regions < 0:
        raise SaliencyError(f"random_regions must be a non-negative integer, got {random_regions!r}")
    if regions not in ("components", "search", "parts"):
        raise SaliencyError(f"regions must be 'components', 'search' or 'parts', got {regions!r}")
    x = subject.check_input(x)
    if not 0 <= index < x.shape[0]:
        raise SaliencyError(f"index {index} is out of range for a batch of {x.shape[0]}")
    layout = subject.layout_for(x)
    exp_layout = explanation.layout if isinstance(explanation, Explanation) else layout
    if exp_layout != layout:
        raise SaliencyError(f"the explanation is of a {exp_layout} input but x is {layout}: verbalize the input "
                            "it was made for")
    if layout != "BCHW":
        if regions != "components" or parts is not None:
            raise SaliencyError("regions='search' and parts= describe photos; a series, volume or feature vector "
                                "is described by its own stretches, regions or features")
        from .verbalize_layouts import verbalize_layout

        return verbalize_layout(subject, x, explanation, target, layout=layout, index=index, threshold=threshold,
                                max_regions=max_regions, min_area=min_area, smooth=smooth,
                                random_regions=random_regions, seed=seed, compare=compare, baseline=baseline,
                                batch_size=batch_size, feature_names=feature_names)
    if baseline is None:
        baseline = "blur"
    x = x[index:index + 1]
    hw = tuple(x.shape[-2:])
    smap, method, signed = _as_map(explanation, index, hw)
    part_masks = _part_masks(parts, hw)
    if regions == "parts" and not part_masks:
        raise SaliencyError("regions='parts' needs the parts masks")
    evidence = smap.clamp(min=0).numpy().astype(np.float64)
    total = float(evidence.sum())
    o = _opening(subject, x, explanation, target, index, lambda: make_baseline(subject, x, baseline), method, signed)
    kind, pos_side, neg_side, base, counter = o.kind, o.pos, o.neg, o.base, o.counter
    score_targets = o.score_targets

    facts: dict = {
        **o.head,
        "baseline": baseline if isinstance(baseline, str) else "tensor", "threshold": threshold,
        "threshold_used": None,
        "image_size": list(hw), "positive_evidence_total": total, "regions": [], "n_regions_found": 0,
        "together": None, "random": None, "negative": None, "compare": [],
    }

    # ---- regions
    if regions == "parts":
        found = [(name, m) for name, m in part_masks.items()]
        found.sort(key=lambda nm: -float(evidence[nm[1]].sum()))
    elif regions == "search":
        searched = searched_regions(evidence, cells=search_cells, k=max_regions) if total > 0 else []
        found = [(None, r["mask"]) for r in searched]
        facts["search"] = [{k: v for k, v in r.items() if k != "mask"} for r in searched]
    else:
        # a map whose peak is a few specks yields no component of min_area at the first threshold:
        # lower it (x1/2, x1/4) before concluding there is no region; the threshold used is a fact
        found = []
        for level in (threshold, threshold / 2, threshold / 4):
            found = [(None, m) for m in _components(evidence, level, min_area, smooth)] if total > 0 else []
            if found:
                facts["threshold_used"] = level
                break
    facts["n_regions_found"] = len(found)
    shown = found[:max_regions] if total > 0 else []
    reg_facts = []
    for rank, (name, mask) in enumerate(shown):
        loc = _location(mask, evidence)
        if name is None and part_masks:
            inside = {pn: float(evidence[mask & pm].sum()) for pn, pm in part_masks.items()}
            best = max(inside, key=inside.get)
            region_ev = float(evidence[mask].sum())
            if region_ev > 0 and inside[best] / region_ev >= 0.5:
                name = best
        reg_facts.append({"rank": rank, "name": name, "area": float(mask.mean()),
                          "evidence": float(evidence[mask].sum() / total), **loc})
    facts["regions"] = reg_facts

    # ---- measured effects: hide each region / keep only it (+ all together), one batched run
    masks_list = []
    for _, mask in shown:
        m = torch.from_numpy(mask.astype(np.float32))
        masks_list += [1 - m, m]
    if len(shown) > 1:
        union = torch.from_numpy(np.logical_or.reduce([m for _, m in shown]).astype(np.float32))
        masks_list += [1 - union, union]
    shifts = []
    if shown and random_regions:
        # the main region's exact shape moved to random places (cyclic shift): same area, same
        # shape, chance location -- the comparison that says whether hiding *that* region is special
        g = np.random.default_rng(seed)
        main_t = torch.from_numpy(shown[0][1].astype(np.float32))
        for _ in range(random_regions):
            dy, dx = int(g.integers(0, hw[0])), int(g.integers(0, hw[1]))
            shifts.append([dy, dx])
            masks_list.append(1 - torch.roll(main_t, (dy, dx), dims=(0, 1)))
    if masks_list:
        stack = torch.stack(masks_list)[:, None].to(x.device)

        def masks(start, stop):
            return torch.zeros(stop - start, dtype=torch.long, device=x.device), stack[start:stop]

        with subject.explaining():
            runs = [perturbed_scores(subject, x, base, t, masks, len(masks_list), batch_size=batch_size,
                                     counter=counter, output="prob").cpu().tolist() for t in score_targets]
        for r, rf in enumerate(reg_facts):
            rf["removed"], rf["kept"] = runs[0][2 * r], runs[0][2 * r + 1]
            if neg_side is not None:
                rf["vs_removed"], rf["vs_kept"] = runs[1][2 * r], runs[1][2 * r + 1]
        if len(shown) > 1:
            j = 2 * len(shown)
            tog = {"area": float(union.mean()), "evidence": float(sum(r["evidence"] for r in reg_facts)),
                   "removed": runs[0][j], "kept": runs[0][j + 1]}
            if neg_side is not None:
                tog.update(vs_removed=runs[1][j], vs_kept=runs[1][j + 1])
            facts["together"] = tog
        if shifts:
            j = 2 * len(shown) + (2 if len(shown) > 1 else 0)
            rnd = runs[0][j:j + len(shifts)]
            facts["random"] = {"n": len(shifts), "seed": seed, "shifts": shifts, "removed": rnd,
                               "removed_mean": float(np.mean(rnd))}
            if neg_side is not None:
                facts["random"]["vs_removed"] = runs[1][j:j + len(shifts)]

    # ---- negative evidence (signed maps)
    if signed:
        against = (-smap).clamp(min=0).numpy().astype(np.float64)
        neg_total = float(against.sum())
        comps = _components(against, threshold, min_area, smooth) if neg_total > 0 else []
        if comps:
            loc = _location(comps[0], against)
            facts["negative"] = {"evidence": float(against[comps[0]].sum() / neg_total),
                                 "area": float(comps[0].mean()), "share_of_all": neg_total / (neg_total + total),
                                 **loc}

    # ---- agreement with other methods
    others = []
    if compare is not None:
        others = list(compare.values()) if isinstance(compare, Mapping) else (
            [compare] if isinstance(compare, Explanation) else list(compare))
    if others and reg_facts:
        from scipy.stats import spearmanr

        main_mask = shown[0][1]
        for other in others:
            if not isinstance(other, Explanation):
                raise SaliencyError("compare takes Explanation objects")
            om, oname, _ = _as_map(other, index, hw)
            opos = om.clamp(min=0).numpy().astype(np.float64)
            share = float(opos[main_mask].sum() / opos.sum()) if opos.sum() > 0 else 0.0
            pooled = [torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(a)[None, None], grid).ravel().numpy()
                      for a in (evidence, opos)]
            rho = spearmanr(pooled[0], pooled[1]).statistic
            rho = 0.0 if not np.isfinite(rho) else float(rho)
            facts["compare"].append({"method": oname, "method_title": method_title(oname),
                                     "evidence_in_main_region": share, "rank_correlation": rho,
                                     "grid": grid})

    facts["passes"] = {"forward": counter.forward, "backward": counter.backward}
    sentences = _write(facts, kind, pos_side, neg_side)
    _warning_notes(sentences, facts, explanation, index)
    text = " ".join(s["text"] for s in sentences.items)
    return Verbalization(text=text, facts=facts, sentences=sentences.items, masks=[m for _, m in shown])


# ------------------------------------------------------------------------------------- wording


def _write(facts: dict, kind: str, pos: Side, neg: Side | None) -> _Sentences:
    s = _Sentences(facts)
    title = facts["method_title"]
    _model_says(s, facts, kind, pos, neg, group=_group_phrase(pos) if pos.kind in ("group", "topk") else None)

    regs = facts["regions"]
    if not regs:
        if facts["positive_evidence_total"] > 0:
            s.add_plain(f"{title} finds positive evidence for this target only in scattered specks, none of "
                        "them forming a region.")
        else:
            s.add_plain(f"{title} finds no positive evidence for this target in the image.")
        return s
    main = regs[0]
    named = f" (the *{main['name']}*)" if main["name"] else ""
    n = facts["n_regions_found"]
    if n == 1 and main["evidence"] >= 0.5:
        lead = f"{title} finds the evidence concentrated in one region {main['phrase']}{named}"
    elif n == 1:
        lead = (f"{title} finds one region of stronger evidence {main['phrase']}{named} (the rest is spread "
                "thinly over the image)")
    else:
        lead = (f"{title} finds {_count_word(n)} separate regions of evidence; the strongest lies "
                f"{main['phrase']}{named}")
    s.add(lead + ", covering {} of the image and holding {} of the positive evidence.",
          "regions.0.area", "regions.0.evidence")
    hide = HIDE_WORDS.get(facts["baseline"], "replacing it with the baseline")
    if kind == "contrast":
        s.add(f"Hiding that region ({hide}) changes *{pos.name}* to {{}} and *{neg.name}* to {{}}; "
              f"showing only that region gives {{}} and {{}}.",
              "regions.0.removed", "regions.0.vs_removed", "regions.0.kept", "regions.0.vs_kept")
    else:
        noun = f"the probability of *{pos.name}*" if pos.kind == "class" else "their total"
        verb = _change(noun, fmt_pct(facts["prob"]), fmt_pct(main["removed"]), main["removed"], facts["prob"])
        s.add(f"Hiding that region ({hide}) {verb}; showing only that region gives {{}}.",
              "regions.0.removed", "regions.0.kept")
    if facts["random"] is not None:
        if kind == "contrast":
            s.add(f"For comparison, hiding the same shape at random places gives *{pos.name}* {{}} on average.",
                  "random.removed_mean")
        else:
            s.add("For comparison, hiding a patch of the same shape at random places gives {} on average.",
                  "random.removed_mean")
    for r in regs[1:]:
        i = r["rank"]
        ordinal = _ORDINALS[i] if i < len(_ORDINALS) else f"{i + 1}th"
        rname = f" (the *{r['name']}*)" if r["name"] else ""
        if kind == "contrast":
            s.add(f"A {ordinal}, weaker region lies {r['phrase']}{rname} ({{}} of the evidence); "
                  f"hiding it gives *{pos.name}* {{}}.", f"regions.{i}.evidence", f"regions.{i}.removed")
        else:
            s.add(f"A {ordinal}, weaker region lies {r['phrase']}{rname} ({{}} of the evidence); "
                  "hiding it gives {}.", f"regions.{i}.evidence", f"regions.{i}.removed")
    return _closing(s, facts, regs, kind, pos, neg, title)


__all__ = ["verbalize", "Verbalization", "method_title", "fmt_pct", "searched_regions"]
