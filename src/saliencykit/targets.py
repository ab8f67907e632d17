"""What is being explained: a differentiable score per example, computed from the model output.

    Class(c)            s = out[c]                            "why c?"
    Contrast(a, vs=b)   s = S(a) - S(b)                        "why a and not b?"
    Group([...]|"dog")  s = logsumexp(out[A]) (logits)         "why any kind of dog?"
                          = sum(p[A]) (probabilities)
    TopK(k)             s = sum of the k highest classes       "why these top-k?"

`out` is the logits by default (`output="logit"`), or `"prob"` / `"log_prob"`. A target is
*resolved* once against the clean logits (the top class is fixed there and held for every
perturbed or interpolated input), giving a `ResolvedTarget` whose `score(logits, rows)` works
on batches made of repeated examples.

The contrastive/pointwise x class/group grid of the RFxG taxonomy is covered by Class, Group and
Contrast of either (Contrast(Group("dog"), vs=Group("cat")) is "why dog and not cat?").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import SaliencyError

OUTPUTS = ("logit", "prob", "log_prob")


class Target:
    """Base class. Subclasses implement `_sides(subject, logits) -> per-example side lists`."""

    output: str = "logit"

    def resolve(self, subject, logits: torch.Tensor) -> "ResolvedTarget":
        raise NotImplementedError

    def expand_batch(self, x: torch.Tensor):
        """`(x, target)` actually explained: a target that explains several things per example
        (e.g. `Text` with several prompts for one image) repeats the rows of `x` here."""
        return x, self

    def _check_output(self):
        if self.output not in OUTPUTS:
            raise SaliencyError(f"target output must be one of {OUTPUTS}, got {self.output!r}")


@dataclass
class Side:
    """A set of classes and how their scores combine: one class, a group (logsumexp/sum) or top-k (sum)."""

    indices: list[int]
    kind: str  # "class" | "group" | "topk"
    name: str


def _per_example(value, batch: int, what: str) -> list:
    """Broadcast a scalar target spec to the batch, or check a per-example list's length."""
    if isinstance(value, torch.Tensor):
        value = value.tolist() if value.dim() > 0 else value.item()
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        if len(value) != batch:
            raise SaliencyError(f"{what}: {len(value)} targets given for a batch of {batch} examples")
        return list(value)
    return [value] * batch


def _resolve_side(subject, spec, batch: int, num_classes: int, logits, what: str) -> list[Side]:
    if isinstance(spec, Group):
        return spec._sides(subject, logits)
    if isinstance(spec, Class):
        return [Side([i], "class", subject.label(i)) for i in spec._indices(subject, logits)]
    if isinstance(spec, TopK):
        return spec._sides(subject, logits)
    specs = _per_example(spec, batch, what)
    sides = []
    for s in specs:
        i = subject.class_index(s, num_classes)
        sides.append(Side([i], "class", subject.label(i)))
    return sides


class Class(Target):
    """Explain class `c` (index or label; a list gives one class per example). None = top-1."""

    def __init__(self, c=None, output: str = "logit"):
        self.c = c
        self.output = output
        self._check_output()

    def __repr__(self):
        return f"Class({self.c!r})"

    def _indices(self, subject, logits) -> list[int]:
        batch, k = logits.shape
        if self.c is None:
            return [int(i) for i in logits.argmax(1)]
        return [subject.class_index(c, k) for c in _per_example(self.c, batch, "Class")]

    def resolve(self, subject, logits):
        sides = [Side([i], "class", subject.label(i)) for i in self._indices(subject, logits)]
        return ResolvedTarget(sides, [None] * len(sides), self.output, "class")


class Contrast(Target):
    """Why `a` and not `vs`: score(a) - score(vs). Each side: label, index, Class or Group."""

    def __init__(self, a, vs, output: str = "logit"):
        self.a, self.vs, self.output = a, vs, output
        self._check_output()

    def __repr__(self):
        return f"Contrast({self.a!r}, vs={self.vs!r})"

    def resolve(self, subject, logits):
        batch, k = logits.shape
        pos = _resolve_side(subject, self.a, batch, k, logits, "Contrast")
        neg = _resolve_side(subject, self.vs, batch, k, logits, "Contrast vs")
        for p, n in zip(pos, neg):
            if p.indices == n.indices:
                raise SaliencyError(f"Contrast needs two different classes, got {p.name!r} twice")
        return ResolvedTarget(pos, neg, self.output, "contrast")


class Group(Target):
    """A set of classes explained together: a list of labels/indices, or a named group ("dog")."""

    def __init__(self, classes, output: str = "logit", name: str | None = None):
        self.classes = classes
        self.output = output
        self.name = name
        self._check_output()

    def __repr__(self):
        return f"Group({self.classes!r})"

    def _sides(self, subject, logits) -> list[Side]:
        batch, k = logits.shape
        spec = self.classes
        if isinstance(spec, str):
            groups = getattr(subject, "groups", {}) or {}
            if spec.lower() not in groups:
                import difflib

                close = difflib.get_close_matches(spec.lower(), list(groups), n=5)
                known = ", ".join(sorted(groups)) or "none for this model"
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise SaliencyError(f"unknown group {spec!r}{hint} (known groups: {known})")
            indices = list(groups[spec.lower()])
            if max(indices) >= k:
                raise SaliencyError(f"group {spec!r} has class indices beyond the model's {k} classes")
            name = self.name or spec
        else:
            if not isinstance(spec, (list, tuple)) or not spec:
                raise SaliencyError("Group needs a non-empty list of classes or a group name")
            indices = sorted({subject.class_index(c, k) for c in spec})
            name = self.name or "{" + ", ".join(subject.label(i) for i in indices[:4]) + (
                ", ..." if len(indices) > 4 else "") + "}"
        return [Side(indices, "group", name) for _ in range(batch)]

    def resolve(self, subject, logits):
        sides = self._sides(subject, logits)
        return ResolvedTarget(sides, [None] * len(sides), self.output, "group")


class TopK(Target):
    """The sum of the scores of the k classes ranked highest on the clean input."""

    def __init__(self, k: int = 1, output: str = "logit"):
        if not isinstance(k, int) or k < 1:
            raise SaliencyError(f"TopK needs k >= 1, got {k!r}")
        self.k, self.output = k, output
        self._check_output()

    def __repr__(self):
        return f"TopK({self.k})"

    def _sides(self, subject, logits):
        if self.k > logits.shape[1]:
            raise SaliencyError(f"TopK({self.k}) but the model has only {logits.shape[1]} classes")
        top = logits.topk(self.k, dim=1).indices
        return [Side([int(i) for i in row], "topk" if self.k > 1 else "class",
                     " + ".join(subject.label(int(i)) for i in row)) for row in top]

    def resolve(self, subject, logits):
        sides = self._sides(subject, logits)
        return ResolvedTarget(sides, [None] * len(sides), self.output, "topk")


def as_target(target) -> Target:
    """Accept a Target, None (top-1), a label/index, or a per-example list of them."""
    if target is None:
        return Class(None)
    if isinstance(target, Target):
        return target
    return Class(target)


@dataclass
class ResolvedTarget:
    pos: list[Side]
    neg: list  # list[Side | None]
    output: str = "logit"
    kind: str = "class"
    _cache: dict = field(default_factory=dict, repr=False)

    def __len__(self):
        return len(self.pos)

    def _masks(self, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (k, str(device))
        if key not in self._cache:
            # built outside inference mode: the cached masks are reused by gradient passes, and
            # inference tensors cannot be saved for backward
            with torch.inference_mode(False):
                pos = torch.zeros(len(self.pos), k, dtype=torch.bool, device=device)
                neg = torch.zeros_like(pos)
                for b, side in enumerate(self.pos):
                    pos[b, side.indices] = True
                for b, side in enumerate(self.neg):
                    if side is not None:
                        neg[b, side.indices] = True
            self._cache[key] = (pos, neg)
        return self._cache[key]

    def transform(self, logits: torch.Tensor, output: str | None = None) -> torch.Tensor:
        output = output or self.output
        if output == "logit":
            return logits
        if output == "prob":
            return logits.softmax(-1)
        if output == "log_prob":
            return logits.log_softmax(-1)
        raise SaliencyError(f"unknown output {output!r}")

    def _combine(self, out: torch.Tensor, mask: torch.Tensor, sides, output: str) -> torch.Tensor:
        group_rows = torch.tensor([s is not None and s.kind == "group" for s in sides], device=out.device)
        summed = (out * mask).sum(1)
        if output == "prob" or not bool(group_rows.any()):
            return summed
        # a group of logits combines as log-sum-exp (the group's logit); of log-probs, likewise
        lse = torch.logsumexp(out.masked_fill(~mask, float("-inf")), dim=1)
        return torch.where(group_rows, lse, summed)

    def score(self, logits: torch.Tensor, rows: torch.Tensor | None = None,
              output: str | None = None) -> torch.Tensor:
        """Per-row score. `rows[i]` = which example row i of `logits` belongs to (default: i)."""
        output = output or self.output
        out = self.transform(logits, output)
        pos, neg = self._masks(logits.shape[1], logits.device)
        if rows is not None:
            pos, neg = pos[rows], neg[rows]
            pos_sides = [self.pos[int(r)] for r in rows]
            neg_sides = [self.neg[int(r)] for r in rows]
        else:
            if logits.shape[0] != len(self.pos):
                raise SaliencyError(f"{logits.shape[0]} outputs for {len(self.pos)} targets")
            pos_sides, neg_sides = self.pos, self.neg
        s = self._combine(out, pos, pos_sides, output)
        if any(n is not None for n in self.neg):
            has_neg = neg.any(1)
            s = s - torch.where(has_neg, self._combine(out, neg, neg_sides, output), torch.zeros_like(s))
        return s

    def describe(self) -> list[dict]:
        out = []
        for p, n in zip(self.pos, self.neg):
            d = {"kind": self.kind, "indices": p.indices, "name": p.name, "output": self.output}
            if n is not None:
                d.update(vs_indices=n.indices, vs_name=n.name, name=f"{p.name} vs {n.name}")
            out.append(d)
        return out

    def key(self) -> tuple:
        return (self.output, tuple((tuple(p.indices), p.kind, None if n is None else (tuple(n.indices), n.kind))
                                   for p, n in zip(self.pos, self.neg)))


def repeat_rows(batch: int, times: int, device=None) -> torch.Tensor:
    """Row -> example map for an input repeated `times` per example (repeat_interleave layout)."""
    return torch.arange(batch, device=device).repeat_interleave(times)


__all__ = ["Target", "Class", "Contrast", "Group", "TopK", "ResolvedTarget", "as_target", "repeat_rows"]
