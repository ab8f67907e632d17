"""What the words of every layout share: the `Verbalization` result, sentences that cite their
facts (`_Sentences`), number formats, the connected regions of a map (any number of axes), the
explained target read back from an explanation, and the wording of a measured change.

`present.verbalize` (photos) and `present.verbalize_layouts` (series, volumes, feature vectors)
both build on these.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import SaliencyError
from ..explanation import Explanation
from ..targets import ResolvedTarget, Side, as_target

_ROWS = ("upper", "middle", "lower")


_COLS = ("left", "middle", "right")


_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")


_COUNTS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def fmt_pct(v: float) -> str:
    """A share or probability in [0,1] as a whole percentage; never rounds a nonzero value to 0%."""
    p = 100.0 * float(v)
    r = int(round(p))
    if p > 0 and r == 0:
        return "<1%"
    if p < 100 and r == 100:
        return ">99%"
    return f"{r}%"


def fmt_corr(v: float) -> str:
    return f"{float(v):.2f}"


def _count_word(n: int) -> str:
    return _COUNTS[n] if 0 <= n < len(_COUNTS) else str(n)


@dataclass
class Verbalization:
    """The paragraph, the structured numbers behind it, and which numbers each sentence uses.

    `sentences[i] = {"text": ..., "numbers": [{"key": "regions.0.evidence", "value": 0.63,
    "shown": "63%"}, ...]}`; `key` is a dotted path into `facts`.
    """

    text: str
    facts: dict
    sentences: list = field(default_factory=list)
    masks: list = field(default_factory=list, repr=False)  # the described regions' [H,W] bool masks

    def __str__(self):
        return self.text

    def fact(self, key: str):
        """The fact at a dotted path, e.g. `fact("regions.0.removed")`."""
        node: Any = self.facts
        for part in key.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    def to_dict(self) -> dict:
        return {"text": self.text, "facts": self.facts, "sentences": self.sentences}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


class _Sentences:
    """Collects sentences with the facts their numbers come from (in order of appearance)."""

    def __init__(self, facts: dict):
        self.facts = facts
        self.items: list[dict] = []

    def add(self, template: str, *keys: str, corr: Sequence[str] = (), signed: Sequence[str] = ()):
        numbers = []
        shown = []
        for key in keys:
            value = _lookup(self.facts, key)
            s = fmt_corr(value) if key in corr else f"{float(value):+.2f}" if key in signed else fmt_pct(value)
            numbers.append({"key": key, "value": value, "shown": s})
            shown.append(s)
        text = template.format(*shown)
        self.items.append({"text": text, "numbers": numbers})

    def add_plain(self, text: str):
        self.items.append({"text": text, "numbers": []})


def _lookup(facts: dict, key: str):
    node: Any = facts
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _components(evidence: np.ndarray, threshold: float, min_area: float, smooth: float) -> list[np.ndarray]:
    """Connected components (8-neighbourhood; any number of axes: runs of a series, 26-neighbourhood
    of a volume) of {smoothed evidence >= threshold * its max}, strongest first.

    Pixel-level maps (gradients, IG) are speckled; a Gaussian of `smooth` x the image size joins
    neighbouring evidence into regions. The shares reported are always of the unsmoothed evidence.
    """
    from scipy import ndimage

    sm = ndimage.gaussian_filter(evidence, sigma=smooth * max(evidence.shape), mode="constant") if smooth > 0 \
        else evidence
    peak = float(sm.max())
    if peak <= 0:
        return []
    labels, n = ndimage.label(sm >= threshold * peak, structure=np.ones((3,) * evidence.ndim, dtype=int))
    comps = []
    hw = evidence.size
    for i in range(1, n + 1):
        mask = labels == i
        if mask.sum() / hw >= min_area:
            comps.append(mask)
    comps.sort(key=lambda m: (-float(evidence[m].sum()), -int(m.sum())))
    return comps


def _resolve(subject, logits, target, explanation, index) -> ResolvedTarget:
    described = explanation.target[index] if isinstance(explanation, Explanation) and explanation.target else None
    if target is None and described is not None:
        return _from_description(subject, described, logits)
    resolved = as_target(target).resolve(subject, logits)
    if described is not None:
        d = resolved.describe()[0]
        same = (sorted(d["indices"]) == sorted(described.get("indices", [])) and
                sorted(d.get("vs_indices", [])) == sorted(described.get("vs_indices", [])))
        if not same:
            raise SaliencyError(f"the explanation was made for {described.get('name')!r}, not for {d['name']!r}; "
                                "verbalize it with its own target")
    return resolved


def _from_description(subject, d: dict, logits) -> ResolvedTarget:
    kind = d.get("kind", "class")
    idx = [int(i) for i in d["indices"]]
    k = logits.shape[1]
    if any(i >= k for i in idx + [int(i) for i in d.get("vs_indices", [])]):
        raise SaliencyError("the explanation's target lies beyond the model's classes: was it made with this model?")

    def side(indices, name):
        if len(indices) == 1:
            return Side(indices, "class", subject.label(indices[0]))
        return Side(indices, "topk" if kind == "topk" else "group", name)

    if kind == "contrast":
        name, vs_name = d.get("name", ""), d.get("vs_name", "")
        pos_name = name[: -len(f" vs {vs_name}")] if vs_name and name.endswith(f" vs {vs_name}") else name
        return ResolvedTarget([side(idx, pos_name)], [side([int(i) for i in d["vs_indices"]], vs_name)],
                              "prob", "contrast")
    return ResolvedTarget([side(idx, d.get("name", ""))], [None], "prob", kind)


def _change(noun: str, before_shown: str, after_shown: str, after_value: float, before_value: float) -> str:
    if after_shown == before_shown:
        return f"leaves {noun} at {{}}"
    return f"lowers {noun} to {{}}" if after_value < before_value else f"raises {noun} to {{}}"


def _closing(s: "_Sentences", facts: dict, regs: list, kind: str, pos, neg, title: str, unit: str = "region",
             units: str = "regions") -> "_Sentences":
    """The sentences that end every description, of a photo or a series/volume: the main `units`
    hidden together, the evidence against, and the compared methods' share in the main `unit`."""
    if facts["together"] is not None:
        which = f"both {units}" if len(regs) == 2 else f"all {_count_word(len(regs))} {units}"
        s.add(f"Hiding {which} together gives {{}}; showing only them gives {{}}.", "together.removed", "together.kept")
    negative = facts["negative"]
    if negative is not None:
        against = f"*{pos.name}*" if kind != "contrast" else f"*{pos.name}* over *{neg.name}*"
        s.add(f"Evidence against {against} is strongest {negative['phrase']} ({{}} of the negative evidence).",
              "negative.evidence")
    for j, c in enumerate(facts["compare"]):
        s.add(f"{c['method_title']} puts {{}} of its positive evidence in that same main {unit} "
              f"(rank correlation with {title}: {{}}).",
              f"compare.{j}.evidence_in_main_region", f"compare.{j}.rank_correlation",
              corr=(f"compare.{j}.rank_correlation",))
    return s


@dataclass
class _Opening:
    """The clean pass every description starts from: the resolved target's two sides, the scores the
    hiding experiments read (a side's probability each), the baseline, and the facts' first keys."""
    logits: Any
    kind: str
    pos: Side
    neg: Side | None
    score_targets: list
    base: Any
    counter: Any
    head: dict


def _opening(subject, x, explanation, target, index: int, make_base, method: str, signed: bool) -> _Opening:
    """One forward of `x` (counted), the target resolved as the explanation's, the baseline from
    `make_base()` (inside `subject.explaining()`), and the facts on the target and the model's answer."""
    from ..engine import PassCounter, forward_logits
    from .names import method_title

    counter = PassCounter()
    with subject.explaining():
        logits = forward_logits(subject, x, counter=counter)
        resolved = _resolve(subject, logits, target, explanation, index if isinstance(explanation, Explanation) else 0)
        base = make_base()
    probs = logits.softmax(-1)[0]
    top = int(probs.argmax())
    pos, neg = resolved.pos[0], resolved.neg[0]
    # scores are read as probabilities: a class's probability, a group's summed probability, and for a
    # contrast the two sides' probabilities separately
    score_targets = [ResolvedTarget([pos], [None], "prob", "class")]
    if neg is not None:
        score_targets.append(ResolvedTarget([neg], [None], "prob", "class"))
    clean = [float(t.score(logits, output="prob")[0]) for t in score_targets]
    head = {
        "method": method, "method_title": method_title(method), "signed": bool(signed),
        "target": {"kind": resolved.kind, "name": pos.name, "indices": list(pos.indices),
                   **({"vs_name": neg.name, "vs_indices": list(neg.indices)} if neg else {})},
        "top": {"index": top, "label": subject.label(top), "prob": float(probs[top])},
        "prob": clean[0], **({"vs_prob": clean[1]} if neg is not None else {}),
    }
    return _Opening(logits, resolved.kind, pos, neg, score_targets, base, counter, head)


def _model_says(s: "_Sentences", facts: dict, kind: str, pos, neg, group: str | None = None) -> None:
    """The first sentence of every description: what the model says of the target (a contrast's
    two sides, a group's total, the class and, when it is not the top answer, the top answer);
    `group` names a group (default: its name in italics)."""
    top_label = facts["top"]["label"]
    if kind == "contrast":
        s.add(f"The question is why the model says *{pos.name}* ({{}}) rather than *{neg.name}* ({{}}).",
              "prob", "vs_prob")
    elif pos.kind in ("group", "topk"):
        s.add(f"The explained target is {group or f'*{pos.name}*'}: together those classes get {{}} "
              f"(the top answer is *{top_label}*, {{}}).", "prob", "top.prob")
    elif pos.indices[0] == facts["top"]["index"]:
        s.add(f"The model says *{pos.name}* ({{}}).", "prob")
    else:
        s.add(f"The model gives *{pos.name}* {{}}; its top answer is *{top_label}* ({{}}).", "prob", "top.prob")


def _centroid(mask: np.ndarray, weight: np.ndarray) -> list[float]:
    """The evidence-weighted centre of a region, per axis as a share of that axis's length (the
    region's own pixels or voxels counted alike when it holds no positive evidence)."""
    at = np.nonzero(mask)
    wts = weight[at].astype(np.float64)
    if wts.sum() <= 0:
        wts = np.ones_like(wts)
    return [float((v + 0.5) @ wts / wts.sum()) / n for v, n in zip(at, mask.shape)]


def _place(row: int, col: int) -> str:
    """A cell of a 3x3 layout in words: "centre", "middle left", "upper right", ..."""
    if (row, col) == (1, 1):
        return "centre"
    if row == 1:
        return f"middle {_COLS[col]}"
    return f"{_ROWS[row]} {_COLS[col]}"


def _warning_notes(s: "_Sentences", facts: dict, explanation, index: int) -> None:
    """The Explanation's warnings as closing notes (`facts["warnings"]`), each number cited like every
    other; a warning whose message carries a number without a sentence of its own is left out."""
    facts["warnings"] = explanation[index].warnings if isinstance(explanation, Explanation) else []
    for i, w in enumerate(facts["warnings"]):
        if w["code"] == "completeness":
            s.add(f"Note: the {facts['method_title']} attributions miss the score difference by {{}}, so "
                  "the map is a coarse estimate; more integration steps make it finer.", f"warnings.{i}.value")
        elif w["code"] == "unsure":
            s.add("Note: the model is unsure ({} for its top answer), so the map explains a guess.",
                  f"warnings.{i}.value")
        elif not any(ch.isdigit() for ch in w["message"]):
            s.add_plain(f"Note: {w['message']}.")
