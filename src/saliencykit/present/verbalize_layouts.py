"""Words for maps of series, volumes and feature vectors: `verbalize` on a non-image layout.

The same method as the words for photos (`present.verbalize`), along the layout's own axes:

* a series `[B,C,T]`: the evidence is cut into *stretches* of time steps (thresholded runs of the
  positive evidence, smoothed by `smooth` x the length), each told by its steps ("steps 20-29"),
  its share of the series and its share of the positive evidence;
* a volume `[B,C,D,H,W]`: regions are 3-D connected components, told by their slices and their
  place on a 3x3x3 layout ("in the upper left of slices 4-9 (of 16)");
* a feature vector `[B,F]`: the `max_regions` features of the largest |attribution|, by name
  (`feature_names=`, else `subject.feature_names`, else `f0, f1, ...`) with their signed values.

Every effect is measured: each stretch / region / feature set is hidden (replaced by the
baseline on every channel) and kept alone through the shared perturbation runner
(`engine.perturbed_scores`), and compared with the same shape hidden at random places.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ..engine import perturbed_scores
from ..errors import SaliencyError
from ..explanation import Explanation
from ..metrics.base import map_shape, positions_mask
from .names import method_title
from .words import (_ORDINALS, Verbalization, _change, _closing, _components, _count_word,
                    _centroid, _model_says, _opening, _place, _Sentences, _warning_notes, fmt_pct)

WHOLE = {"BCT": "series", "BCDHW": "volume", "BTCHW": "clip", "BF": "feature vector"}
HIDE_WORDS = {
    "blur": "replacing {it} with a blurred copy of the {whole}",
    "black": "setting {it} to zero",
    "zero": "setting {it} to zero",
    "mean": "setting {it} to zero, the mean of the normalised input",
}
_DEPTH = ("front", "middle", "back")


def layout_baseline(subject, x: torch.Tensor, layout: str, baseline) -> torch.Tensor:
    """What hidden positions are replaced with: "blur" (a Gaussian of 1/16 of the longest map axis,
    along time for a series, along depth, height and width for a volume), else as the methods'
    baselines ("zero", "mean", a value, a tensor). A feature vector cannot be blurred."""
    from ..methods.gradient import make_baseline

    if isinstance(baseline, str) and baseline == "blur":
        if layout == "BF":
            raise SaliencyError("a feature vector has no neighbouring positions to blur over: pass baseline='zero', "
                                "'mean', a value or a tensor")
        if layout == "BCT":
            from ..methods.domains import blur_series

            return blur_series(x, sigma=max(1.0, x.shape[-1] / 16))
        from ..metrics.base import blur_axes

        sigma = max(1.0, max(x.shape[2:]) / 16)
        radius = int(np.ceil(3 * sigma))
        return blur_axes(x, layout, size=2 * radius + 1, sigma=sigma)
    return make_baseline(subject, x, baseline)


def _steps(lo: int, hi: int) -> str:
    return f"step {lo}" if lo == hi else f"steps {lo}-{hi}"


def _series_location(mask: np.ndarray) -> dict:
    ts = np.flatnonzero(mask)
    lo, hi = int(ts.min()), int(ts.max())
    runs = int(1 + (np.diff(ts) > 1).sum())
    where = _steps(lo, hi) if runs == 1 else f"{runs} runs between steps {lo} and {hi}"
    return {"steps": [lo, hi], "runs": runs, "words": where, "phrase": f"in {where}"}


def _volume_location(mask: np.ndarray, weight: np.ndarray) -> dict:
    d, h, w = mask.shape
    zs, ys, xs = np.nonzero(mask)
    c = _centroid(mask, weight)
    cell = [min(int(v * 3), 2) for v in c]
    plane = _place(cell[1], cell[2])
    lo, hi = int(zs.min()), int(zs.max())
    slices = f"slice {lo}" if lo == hi else f"slices {lo}-{hi}"
    bbox = [int(zs.min()), int(ys.min()), int(xs.min()), int(zs.max()) + 1, int(ys.max()) + 1, int(xs.max()) + 1]
    spread = all((bbox[i + 3] - bbox[i]) / n > 0.8 for i, n in enumerate((d, h, w)))
    phrase = "spread over most of the volume" if spread else f"in the {plane} of {slices} of {d}"
    return {"centroid": [round(v, 4) for v in c], "grid_cell": cell, "depth": _DEPTH[cell[0]], "words": plane,
            "slices": [lo, hi], "phrase": phrase, "bbox": bbox}


def _location(layout: str, mask: np.ndarray, weight: np.ndarray) -> dict:
    return _series_location(mask) if layout == "BCT" else _volume_location(mask, weight)


def _feature_names(subject, n: int, feature_names) -> list[str]:
    names = feature_names if feature_names is not None else getattr(subject, "feature_names", None)
    if names is None:
        return [f"f{i}" for i in range(n)]
    names = [str(v) for v in names]
    if len(names) != n:
        raise SaliencyError(f"{len(names)} feature names for {n} features: give one name per feature")
    return names


def verbalize_layout(subject, x: torch.Tensor, explanation, target, *, layout: str, index: int, threshold: float,
                     max_regions: int, min_area: float, smooth: float, random_regions: int, seed: int, compare,
                     baseline, batch_size, feature_names: Sequence[str] | None = None) -> Verbalization:
    """`verbalize` for a BCT, BCDHW or BF input (its arguments, checked there)."""
    if layout not in ("BCT", "BCDHW", "BF"):
        raise SaliencyError(f"verbalize describes photos, series, volumes and feature vectors; a {layout} input "
                            "has no words yet")
    x = x[index:index + 1]
    shape = map_shape(x, layout)
    if isinstance(explanation, Explanation):
        if not 0 <= index < len(explanation):
            raise SaliencyError(f"index {index} is out of range for an explanation of {len(explanation)} maps")
        m, method, signed = explanation.maps[index], explanation.method, explanation.signed
    elif isinstance(explanation, torch.Tensor):
        m = explanation[index] if explanation.dim() == len(shape) + 1 else explanation
        method, signed = "map", bool((m < 0).any())
    else:
        raise SaliencyError(f"verbalize needs an Explanation or a map tensor, got {type(explanation).__name__}")
    if tuple(m.shape) != shape:
        raise SaliencyError(f"the map has shape {tuple(m.shape)}; a {layout} input {tuple(x.shape)} needs a map "
                            f"{list(shape)} (the input without its channel axis)")
    if not torch.isfinite(m).all():
        raise SaliencyError("the map contains NaN or infinite values")
    smap = m.detach().double().cpu()
    evidence = smap.clamp(min=0).numpy()
    total = float(evidence.sum())
    base_name = baseline if baseline is not None else ("zero" if layout == "BF" else "blur")
    o = _opening(subject, x, explanation, target, index, lambda: layout_baseline(subject, x, layout, base_name),
                 method, signed)
    kind, pos_side, neg_side, base, counter = o.kind, o.pos, o.neg, o.base, o.counter
    score_targets = o.score_targets
    facts: dict = {
        "layout": layout, **o.head,
        "baseline": base_name if isinstance(base_name, str) else "tensor", "threshold": threshold,
        "threshold_used": None, "map_shape": list(shape), "positive_evidence_total": total, "regions": [],
        "n_regions_found": 0, "together": None, "random": None, "negative": None, "compare": [], "features": None,
    }
    g = np.random.default_rng(seed)
    hide: list[np.ndarray] = []          # masks of positions to hide (True = hidden), then kept alone
    random_hidden: list[np.ndarray] = []
    shown: list[np.ndarray] = []
    if layout == "BF":
        n = shape[0]
        names = _feature_names(subject, n, feature_names)
        mag = np.abs(smap.numpy())
        k = min(max_regions, n)
        order = np.argsort(-mag, kind="stable")[:k]
        feats = [{"index": int(i), "name": names[int(i)], "value": float(smap[int(i)]),
                  "share": float(mag[int(i)] / mag.sum()) if mag.sum() > 0 else 0.0} for i in order]
        chosen = np.zeros(n, dtype=bool)
        chosen[order] = True
        facts["features"] = {"top": feats, "k": k, "n": n, "share": float(mag[chosen].sum() / mag.sum())
                             if mag.sum() > 0 else 0.0}
        if mag.sum() > 0:
            shown = [chosen]
            for _ in range(random_regions):
                r = np.zeros(n, dtype=bool)
                r[g.choice(n, size=k, replace=False)] = True
                random_hidden.append(r)
    else:
        found: list[np.ndarray] = []
        for level in (threshold, threshold / 2, threshold / 4):
            found = _components(evidence, level, min_area, smooth) if total > 0 else []
            if found:
                facts["threshold_used"] = level
                break
        facts["n_regions_found"] = len(found)
        shown = found[:max_regions]
        for rank, mask in enumerate(shown):
            facts["regions"].append({"rank": rank, "area": float(mask.mean()),
                                     "evidence": float(evidence[mask].sum() / total), **_location(layout, mask, evidence)})
        if shown:
            for _ in range(random_regions):   # the main region's shape moved cyclically: same size, chance place
                shift = tuple(int(g.integers(0, v)) for v in shape)
                random_hidden.append(np.roll(shown[0], shift, axis=tuple(range(len(shape)))))
    attributions = getattr(explanation, "attributions", None) if isinstance(explanation, Explanation) else None
    if layout != "BF" and shown and attributions is not None and attributions.shape[1] > 1 \
            and tuple(attributions.shape[2:]) == shape:
        # which channel carries the main region: each channel's share of |attribution| inside it
        inside = attributions[index].detach().double().abs().cpu().numpy()[:, shown[0]].sum(1)
        if inside.sum() > 0:
            shares = inside / inside.sum()
            facts["regions"][0]["channels"] = [float(v) for v in shares]
            facts["regions"][0]["channel"] = int(np.argmax(shares))
            facts["regions"][0]["channel_share"] = float(shares.max())
    for mask in shown:
        hide += [mask, ~mask]
    union = np.logical_or.reduce(shown) if len(shown) > 1 else None
    if union is not None:
        hide += [union, ~union]
    hide += random_hidden
    if hide:
        keep = torch.from_numpy(~np.stack(hide)).to(x.device, x.dtype)
        stack = positions_mask(keep, layout, shape)

        def masks(start, stop):
            return torch.zeros(stop - start, dtype=torch.long, device=x.device), stack[start:stop]

        with subject.explaining():
            runs = [perturbed_scores(subject, x, base, t, masks, len(hide), batch_size=batch_size, counter=counter,
                                     output="prob").cpu().tolist() for t in score_targets]
        targets_of = [facts["features"]] if layout == "BF" else facts["regions"]
        for r, rf in enumerate(targets_of):
            rf["removed"], rf["kept"] = runs[0][2 * r], runs[0][2 * r + 1]
            if neg_side is not None:
                rf["vs_removed"], rf["vs_kept"] = runs[1][2 * r], runs[1][2 * r + 1]
        j = 2 * len(shown)
        if union is not None:
            facts["together"] = {"area": float(union.mean()),
                                 "evidence": float(sum(r["evidence"] for r in facts["regions"])),
                                 "removed": runs[0][j], "kept": runs[0][j + 1]}
            if neg_side is not None:
                facts["together"].update(vs_removed=runs[1][j], vs_kept=runs[1][j + 1])
            j += 2
        if random_hidden:
            rnd = runs[0][j:j + len(random_hidden)]
            facts["random"] = {"n": len(rnd), "seed": seed, "removed": rnd, "removed_mean": float(np.mean(rnd))}
    if signed and layout != "BF":
        against = (-smap).clamp(min=0).numpy()
        neg_total = float(against.sum())
        comps = _components(against, threshold, min_area, smooth) if neg_total > 0 else []
        if comps:
            facts["negative"] = {"evidence": float(against[comps[0]].sum() / neg_total), "area": float(comps[0].mean()),
                                 "share_of_all": neg_total / (neg_total + total), **_location(layout, comps[0], against)}
    others = []
    if compare is not None:
        others = list(compare.values()) if isinstance(compare, Mapping) else (
            [compare] if isinstance(compare, Explanation) else list(compare))
    if others and shown:
        from scipy.stats import spearmanr

        for other in others:
            if not isinstance(other, Explanation) or tuple(other.maps.shape[1:]) != shape:
                raise SaliencyError(f"compare takes Explanations of the same {layout} input (maps {list(shape)})")
            om = other.maps[index].detach().double().cpu()
            opos = om.clamp(min=0).numpy()
            share = float(opos[shown[0]].sum() / opos.sum()) if opos.sum() > 0 else 0.0
            rho = spearmanr(evidence.ravel(), opos.ravel()).statistic if layout != "BF" else \
                spearmanr(np.abs(smap.numpy()), np.abs(om.numpy())).statistic
            facts["compare"].append({"method": other.method, "method_title": method_title(other.method),
                                     "evidence_in_main_region": share,
                                     "rank_correlation": 0.0 if not np.isfinite(rho) else float(rho)})
    facts["passes"] = {"forward": counter.forward, "backward": counter.backward}
    sentences = _write(facts, layout, kind, pos_side, neg_side)
    _warning_notes(sentences, facts, explanation, index)
    text = " ".join(s["text"] for s in sentences.items)
    return Verbalization(text=text, facts=facts, sentences=sentences.items, masks=list(shown))


# ------------------------------------------------------------------------------------- wording
def _write(facts: dict, layout: str, kind: str, pos, neg) -> _Sentences:
    s = _Sentences(facts)
    title = facts["method_title"]
    whole = WHOLE[layout]
    _model_says(s, facts, kind, pos, neg)
    it = "them" if layout in ("BCT", "BF") else "it"
    hide = HIDE_WORDS.get(facts["baseline"], "replacing {it} with the baseline").format(it=it, whole=whole)
    noun = f"the probability of *{pos.name}*" if pos.kind == "class" else "their total"
    if layout == "BF":
        return _write_features(s, facts, kind, pos, neg, title, noun, hide)
    unit, units = ("stretch", "stretches") if layout == "BCT" else ("region", "regions")
    regs = facts["regions"]
    if not regs:
        if facts["positive_evidence_total"] > 0:
            s.add_plain(f"{title} finds positive evidence for this target only in scattered specks, none of "
                        f"them forming a {unit}.")
        else:
            s.add_plain(f"{title} finds no positive evidence for this target in the {whole}.")
        return s
    main = regs[0]
    n = facts["n_regions_found"]
    if n == 1 and main["evidence"] >= 0.5:
        lead = f"{title} finds the evidence for *{pos.name}* {main['phrase']}"
    elif n == 1:
        lead = (f"{title} finds one {unit} of stronger evidence for *{pos.name}* {main['phrase']} (the rest is "
                f"spread thinly over the {whole})")
    else:
        lead = (f"{title} finds {_count_word(n)} separate {units} of evidence for *{pos.name}*; the strongest lies "
                f"{main['phrase']}")
    s.add(lead + f", covering {{}} of the {whole} and holding {{}} of the positive evidence.",
          "regions.0.area", "regions.0.evidence")
    what = "those steps" if layout == "BCT" else "that region"
    if kind == "contrast":
        s.add(f"Hiding {what} ({hide}) changes *{pos.name}* to {{}} and *{neg.name}* to {{}}; "
              f"showing only {what} gives {{}} and {{}}.",
              "regions.0.removed", "regions.0.vs_removed", "regions.0.kept", "regions.0.vs_kept")
    else:
        verb = _change(noun, fmt_pct(facts["prob"]), fmt_pct(main["removed"]), main["removed"], facts["prob"])
        s.add(f"Hiding {what} ({hide}) {verb}; showing only {what} gives {{}}.", "regions.0.removed", "regions.0.kept")
    if "channel" in main:
        s.add(f"Within {what}, channel {main['channel']} carries {{}} of the attribution's magnitude.",
              "regions.0.channel_share")
    if facts["random"] is not None:
        shape = "a stretch of the same length" if layout == "BCT" else "a region of the same shape"
        s.add(f"For comparison, hiding {shape} at random places gives {{}} on average.", "random.removed_mean")
    for r in regs[1:]:
        i = r["rank"]
        ordinal = _ORDINALS[i] if i < len(_ORDINALS) else f"{i + 1}th"
        s.add(f"A {ordinal}, weaker {unit} lies {r['phrase']} ({{}} of the evidence); hiding it gives {{}}.",
              f"regions.{i}.evidence", f"regions.{i}.removed")
    return _closing(s, facts, regs, kind, pos, neg, title, unit, units)


def _write_features(s: _Sentences, facts: dict, kind: str, pos, neg, title: str, noun: str,
                    hide: str) -> _Sentences:
    feats = facts["features"]
    top = feats["top"]
    if not top or feats["share"] == 0:
        s.add_plain(f"{title} gives every feature zero attribution for this target.")
        return s
    k = len(top)
    signed = facts["signed"]
    parts = [f"{f['name']} ({{}})" for f in top]
    listed = parts[0] if k == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    head = "the feature that carries" if k == 1 else f"the {_count_word(k)} features that carry"
    keys = [f"features.top.{i}.value" for i in range(k)]
    s.add(f"{title}: {head} most of the evidence for *{pos.name}* are {listed}, together {{}} of the absolute "
          "attribution." if k > 1 else
          f"{title}: {head} most of the evidence for *{pos.name}* is {listed}, {{}} of the absolute attribution.",
          *keys, "features.share", signed=keys if signed else (), corr=() if signed else keys)
    them = "it" if k == 1 else "them"
    hide = hide.replace("them", them)
    if "removed" in feats:
        if kind == "contrast":
            s.add(f"Hiding {them} ({hide}) changes *{pos.name}* to {{}} and *{neg.name}* to {{}}; keeping only "
                  f"{them} gives {{}} and {{}}.", "features.removed", "features.vs_removed", "features.kept",
                  "features.vs_kept")
        else:
            verb = _change(noun, fmt_pct(facts["prob"]), fmt_pct(feats["removed"]), feats["removed"], facts["prob"])
            s.add(f"Hiding {them} ({hide}) {verb}; keeping only {them} gives {{}}.", "features.removed",
                  "features.kept")
    if facts["random"] is not None:
        s.add(f"For comparison, hiding {_count_word(k)} features chosen at random gives {{}} on average.",
              "random.removed_mean")
    against = [f for f in top if f["value"] < 0]
    if signed and against:
        names = [f["name"] for f in against]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        s.add_plain(f"{listed} speak{'s' if len(names) == 1 else ''} against *{pos.name}*.")
    for j, c in enumerate(facts["compare"]):
        s.add(f"{c['method_title']} gives those features {{}} of its positive evidence (rank correlation of the "
              f"magnitudes with {title}: {{}}).", f"compare.{j}.evidence_in_main_region",
              f"compare.{j}.rank_correlation", corr=(f"compare.{j}.rank_correlation",))
    return s
