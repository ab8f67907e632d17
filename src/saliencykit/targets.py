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

Dense targets read a model whose output has axes of its own (segmentation `[B,K,H,W]`, an
image-to-image model's `[B,C,H,W]`, a volume's `[B,K,D,H,W]`):

    Region(mask, label=c)   s = sum over the mask of out[c]        "why are these pixels c?"
                              (reduce="mean": the mean; score="prob": softmax over the class axis)
    Pixel(y, x, label=c)    Region of that one pixel
    OutputRegion(mask)      s = sum over the mask and the channels of the output
                              (change=True: of out - out(clean input); same gradient, s(x) = 0)
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
        return self._device_tables(k, device)[:2]

    def _device_tables(self, k: int, device) -> tuple:
        """(pos mask [B,k], neg mask, pos side is a group [B], neg side is a group [B]) on `device`,
        built once per class count and device: a score of any chunk then indexes them by its rows
        on the device, with no per-row Python loop and no copy or sync per chunk."""
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
                pos_group = torch.tensor([s.kind == "group" for s in self.pos], dtype=torch.bool, device=device)
                neg_group = torch.tensor([s is not None and s.kind == "group" for s in self.neg], dtype=torch.bool,
                                         device=device)
            self._cache[key] = (pos, neg, pos_group, neg_group)
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

    def _combine(self, out: torch.Tensor, mask: torch.Tensor, group_rows: torch.Tensor, any_group: bool,
                 output: str) -> torch.Tensor:
        summed = (out * mask).sum(1)
        if output == "prob" or not any_group:
            return summed
        # a group of logits combines as log-sum-exp (the group's logit); of log-probs, likewise
        lse = torch.logsumexp(out.masked_fill(~mask, float("-inf")), dim=1)
        return torch.where(group_rows, lse, summed)

    def score(self, logits: torch.Tensor, rows: torch.Tensor | None = None,
              output: str | None = None) -> torch.Tensor:
        """Per-row score. `rows[i]` = which example row i of `logits` belongs to (default: i)."""
        output = output or self.output
        out = self.transform(logits, output)
        pos, neg, pos_group, neg_group = self._device_tables(logits.shape[1], logits.device)
        if rows is not None:
            pos, neg, pos_group, neg_group = pos[rows], neg[rows], pos_group[rows], neg_group[rows]
        elif logits.shape[0] != len(self.pos):
            raise SaliencyError(f"{logits.shape[0]} outputs for {len(self.pos)} targets")
        # whether any example (not only the chunk's rows) has a group side: decided in Python, so a
        # chunk's score never waits for the device; where() picks per row either way
        s = self._combine(out, pos, pos_group, any(p.kind == "group" for p in self.pos), output)
        if any(n is not None for n in self.neg):
            has_neg = neg.any(1)
            s = s - torch.where(has_neg, self._combine(out, neg, neg_group,
                                                       any(n is not None and n.kind == "group" for n in self.neg),
                                                       output), torch.zeros_like(s))
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


# ----------------------------------------------------------------------------- dense targets

REDUCES = ("sum", "mean")


def _as_mask(mask, what: str) -> torch.Tensor:
    """A mask (tensor, array, nested list; bool or weights) as a float tensor with >= 1 axis."""
    import numpy as np

    if isinstance(mask, torch.Tensor):
        t = mask.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(mask))
        except (TypeError, ValueError, RuntimeError):
            raise SaliencyError(f"{what} mask must be a tensor or an array, got {type(mask).__name__}") from None
    if t.dim() == 0:
        raise SaliencyError(f"{what} mask must have the output's spatial axes, got a single number")
    if not t.is_floating_point():
        t = t != 0          # a bool or integer mask (a label image): nonzero is inside
    t = t.float()
    if not torch.isfinite(t).all():
        raise SaliencyError(f"{what} mask contains NaN or infinite values")
    if (t < 0).any():
        raise SaliencyError(f"{what} mask has negative entries; a mask is 0/1 (or non-negative weights)")
    return t


class _DenseTarget(Target):
    """A score summed over part of a dense output. `mask`: the output's spatial axes (`[H,W]`,
    `[T]`, `[D,H,W]`), shared by the batch, or a list of one per example."""

    dense = True
    kind = "region"

    def _masks(self, out: torch.Tensor, spec=None) -> tuple[torch.Tensor, bool]:
        """([B, *S] float masks on out's device, whether `out` has a class axis). A list or tuple
        of tensors / arrays gives one mask per example; anything else is one mask for all."""
        import numpy as np

        b = out.shape[0]
        spec = self.mask if spec is None else spec
        if isinstance(spec, (list, tuple)) and spec and isinstance(spec[0], (torch.Tensor, np.ndarray)):
            if len(spec) != b:
                raise SaliencyError(f"{type(self).__name__}: {len(spec)} masks for a batch of {b} examples")
            masks = [_as_mask(m, type(self).__name__) for m in spec]
            if len({tuple(m.shape) for m in masks}) != 1:
                raise SaliencyError(f"{type(self).__name__}: the masks differ in shape "
                                    f"{sorted({tuple(m.shape) for m in masks})}")
            mask = torch.stack(masks)
        else:
            m = _as_mask(spec, type(self).__name__)
            mask = m.unsqueeze(0).expand(b, *m.shape)
        n = mask.dim() - 1
        if out.dim() == n + 2:
            has_classes = True
        elif out.dim() == n + 1:
            has_classes = False
        else:
            raise SaliencyError(f"{type(self).__name__}: a mask of shape {tuple(mask.shape[1:])} ({n} axes) does not fit "
                                f"the model's output of shape {tuple(out.shape)}: give a mask with the output's "
                                "spatial axes (e.g. [H,W] for [B,K,H,W])")
        if tuple(out.shape[-n:]) != tuple(mask.shape[1:]):
            raise SaliencyError(f"{type(self).__name__}: the mask is {tuple(mask.shape[1:])} but the model's output is "
                                f"{tuple(out.shape[-n:])} ({'x'.join(map(str, out.shape))}); give a mask at the output's "
                                "size")
        if not bool((mask.flatten(1).sum(1) > 0).all()):
            raise SaliencyError(f"{type(self).__name__}: the mask is empty (all zeros) for some example: there is "
                                "nothing to explain")
        return mask.to(out.device), has_classes


class Region(_DenseTarget):
    """Why the output is class `label` over `mask`: the logit of `label` summed over the mask
    (Aggregated Attribution). `reduce="mean"` averages it over the mask instead (weights: the
    mask's values); `score="prob"` sums softmax probabilities (softmax over the class axis).
    `label=None`: per example, the class predicted most often inside the mask on the clean input.
    On an output without a class axis (`[B,H,W]`), `Region(mask)` sums the output over the mask."""

    def __init__(self, mask, label=None, reduce: str = "sum", score: str = "logit"):
        self.mask, self.label = mask, label
        if reduce not in REDUCES:
            raise SaliencyError(f"Region reduce must be one of {REDUCES}, got {reduce!r}")
        if score not in ("logit", "prob", "log_prob"):
            raise SaliencyError(f"Region score must be 'logit', 'prob' or 'log_prob', got {score!r}")
        self.reduce, self.output = reduce, score

    def __repr__(self):
        return f"{type(self).__name__}(label={self.label!r}, reduce={self.reduce!r}, score={self.output!r})"

    def _mask_spec(self, out):
        return self._masks(out)

    def resolve(self, subject, logits):
        out = logits
        masks, has_classes = self._mask_spec(out)
        b = out.shape[0]
        if not has_classes:
            if self.label is not None:
                raise SaliencyError(f"{type(self).__name__}(label={self.label!r}) needs an output with a class axis "
                                    f"[B,K,...]; the model's output {tuple(out.shape)} has none (one value per "
                                    "position): use sk.OutputRegion(mask), or Region(mask) without a label")
            classes = [None] * b
        elif self.label is None:
            pred = out.argmax(1)                          # [B, *S] predicted class per position
            classes = []
            for i in range(b):
                inside = pred[i][masks[i] > 0]
                classes.append(int(torch.bincount(inside.flatten(), minlength=out.shape[1]).argmax()))
        else:
            labels = self.label if isinstance(self.label, (list, tuple)) else [self.label] * b
            if len(labels) != b:
                raise SaliencyError(f"{type(self).__name__}: {len(labels)} labels for a batch of {b} examples")
            classes = [subject.class_index(c, out.shape[1]) for c in labels]
        pixels = [int((m > 0).sum()) for m in masks]
        where = "position" if masks.dim() == 2 else "pixel"
        sides = [Side([] if c is None else [c], "region",
                      f"{'output' if c is None else subject.label(c)} over {n} {where}{'s' if n != 1 else ''}")
                 for c, n in zip(classes, pixels)]
        return DenseResolvedTarget(sides, [None] * b, self.output, self.kind, masks=masks, classes=classes,
                                   reduce=self.reduce, has_classes=has_classes)


class Pixel(Region):
    """Why position (y, x) of the output is class `label`: `Region` of that one pixel (one index
    per spatial axis of the output: `Pixel(t, label=c)` for a series, `Pixel(z, y, x, ...)` for a volume)."""

    kind = "pixel"

    def __init__(self, *position, label=None, score: str = "logit"):
        if not position or not all(isinstance(p, int) and not isinstance(p, bool) for p in position):
            raise SaliencyError(f"Pixel needs integer positions, one per spatial axis of the output; got {position!r}")
        self.position = tuple(position)
        super().__init__(None, label=label, reduce="sum", score=score)

    def __repr__(self):
        return f"Pixel{self.position}(label={self.label!r})"

    def _mask_spec(self, out):
        n = len(self.position)
        size = tuple(out.shape[-n:]) if out.dim() > n else ()
        if len(size) != n or any(not 0 <= p < s for p, s in zip(self.position, size)):
            raise SaliencyError(f"Pixel{self.position} is outside the model's output of shape {tuple(out.shape)}")
        mask = torch.zeros(size)
        mask[self.position] = 1
        return self._masks(out, mask)


class OutputRegion(_DenseTarget):
    """For image-to-image models (denoising, restoration, super-resolution): the output summed
    over `mask` and over all channels. `change=True` scores the change of that sum against the
    output of the clean input instead (zero on the clean input; a constant apart, so the same
    gradient and the same drops under occlusion)."""

    kind = "output_region"

    def __init__(self, mask, change: bool = False, reduce: str = "sum"):
        if reduce not in REDUCES:
            raise SaliencyError(f"OutputRegion reduce must be one of {REDUCES}, got {reduce!r}")
        self.mask, self.change, self.reduce, self.output = mask, bool(change), reduce, "logit"

    def __repr__(self):
        return f"OutputRegion(change={self.change}, reduce={self.reduce!r})"

    def resolve(self, subject, logits):
        masks, has_classes = self._masks(logits)
        b = logits.shape[0]
        pixels = [int((m > 0).sum()) for m in masks]
        sides = [Side([], "output_region", f"{'change of the ' if self.change else ''}output over {n} pixels")
                 for n in pixels]
        resolved = DenseResolvedTarget(sides, [None] * b, "logit", self.kind, masks=masks, classes=[None] * b,
                                       reduce=self.reduce, has_classes=has_classes, fixed_output=True)
        if self.change:
            resolved.reference = resolved.score(logits.detach()).detach()
        return resolved


@dataclass
class DenseResolvedTarget(ResolvedTarget):
    """A dense target fixed against the clean output: per example its mask and class."""

    masks: torch.Tensor | None = None       # [B, *S] float
    classes: list = field(default_factory=list)   # per example a class index, or None (no class / all channels)
    reduce: str = "sum"
    has_classes: bool = True
    fixed_output: bool = False              # OutputRegion: the output is scored as it is, never softmaxed
    reference: torch.Tensor | None = None   # [B] scores subtracted (OutputRegion(change=True))

    def transform(self, logits: torch.Tensor, output: str | None = None) -> torch.Tensor:
        """The output as scored: softmax / log-softmax over the class axis (axis 1)."""
        output = output or self.output
        if output == "logit" or self.fixed_output or not self.has_classes:
            return logits
        if output == "prob":
            return logits.softmax(1)
        if output == "log_prob":
            return logits.log_softmax(1)
        raise SaliencyError(f"unknown output {output!r}")

    def score(self, logits: torch.Tensor, rows: torch.Tensor | None = None,
              output: str | None = None) -> torch.Tensor:
        if rows is None:
            if logits.shape[0] != len(self.pos):
                raise SaliencyError(f"{logits.shape[0]} outputs for {len(self.pos)} targets")
            rows = torch.arange(logits.shape[0], device=logits.device)
        rows = rows.to(self.masks.device)
        out = logits
        if self.has_classes:
            out = self.transform(out, output)
            if self.classes[0] is None:
                out = out.sum(1)                     # every channel (an image-to-image output)
            else:
                cls = torch.tensor(self.classes, device=out.device)[rows.to(out.device)]
                index = cls.view(-1, 1, *[1] * (out.dim() - 2)).expand(-1, 1, *out.shape[2:])
                out = out.gather(1, index).squeeze(1)
        m = self.masks[rows].to(out.device, out.dtype)
        s = (out * m).flatten(1).sum(1)
        if self.reduce == "mean":
            s = s / m.flatten(1).sum(1)
        if self.reference is not None:
            s = s - self.reference.to(s.device, s.dtype)[rows.to(s.device)]
        return s

    def describe(self) -> list[dict]:
        return [{"kind": self.kind, "indices": p.indices, "name": p.name, "output": self.output,
                 "pixels": int((m > 0).sum()), "reduce": self.reduce} for p, m in zip(self.pos, self.masks)]

    def key(self) -> tuple:
        return (self.kind, self.output, self.reduce, tuple(self.classes), self.masks.data_ptr(),
                tuple(self.masks.shape), self.reference is not None)


__all__ = ["Target", "Class", "Contrast", "Group", "TopK", "ResolvedTarget", "as_target", "repeat_rows",
           "Region", "Pixel", "OutputRegion", "DenseResolvedTarget"]
