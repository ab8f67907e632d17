"""Concepts for people: the concept atlas (each concept: its top patches, its importance, where it
sits in a few images), the picture of a class's summaries, and sentences that name concepts by
what is measured about them ("concept 3, whose patches are mostly the beak part, sits in the
upper left; removing it drops the score by 41 %").

Top patches: for each concept, the images where its coefficient peaks highest (one patch per
image), cut around the peak's layer cell, `patch` x the image side wide. The maps are the NNLS
coefficient maps of `concepts.concept_maps`, upsampled to the input.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..errors import SaliencyError
from ..maps import overlay
from .verbalize import Verbalization, _Sentences, _location, fmt_pct
from .viz import _font, fit_lines

TILE = 72
LABEL_W = 190
GAP = 6


def _pil_images(subject, x: torch.Tensor) -> list:
    from PIL import Image

    pix = subject.unnormalize(x.detach().float().cpu()).clamp(0, 1)
    arr = (pix.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def top_patches(layer_maps: torch.Tensor, size, j: int, n: int = 6, patch: float = 0.35) -> list:
    """The `n` (image, (top, left, bottom, right)) where concept `j` peaks highest, one per image;
    `layer_maps` [N,k,h,w], `size` the input (H, W)."""
    N, _, h, w = layer_maps.shape
    H, W = size
    m = layer_maps[:, j].flatten(1)
    peak, where = m.max(1)
    side = max(2, int(round(patch * min(H, W))))
    out = []
    for i in torch.argsort(peak, descending=True, stable=True)[:n].tolist():
        if peak[i] <= 0:
            break
        cy = (int(where[i]) // w + 0.5) * H / h
        cx = (int(where[i]) % w + 0.5) * W / w
        t = int(min(max(cy - side / 2, 0), H - side))
        l_ = int(min(max(cx - side / 2, 0), W - side))
        out.append((i, (t, l_, t + side, l_ + side)))
    return out


def _tile(pil, box=None):
    from PIL import Image

    if box is not None:
        t, l_, b, r = box
        pil = pil.crop((l_, t, r, b))
    return pil.resize((TILE, TILE), Image.BILINEAR)


def _label_panel(lines: Sequence[tuple], height: int, bar: float | None = None):
    """A white panel of LABEL_W x height with lines of (text, size, bold, colour) and an optional
    importance bar (a share in [0, 1])."""
    from PIL import Image, ImageDraw

    panel = Image.new("RGB", (LABEL_W, height), "white")
    d = ImageDraw.Draw(panel)
    y = 4
    for text, size, bold, colour in lines:
        wrapped, font = fit_lines(text, LABEL_W - 12, size, bold=bold)
        for line in wrapped:
            d.text((6, y), line, fill=colour, font=font)
            y += font.size + 3
    if bar is not None and np.isfinite(bar):
        y += 2
        d.rectangle((6, y, LABEL_W - 12, y + 7), outline="#999")
        d.rectangle((6, y, 6 + int((LABEL_W - 18) * min(max(bar, 0.0), 1.0)), y + 7), fill="#c0392b")
    return panel


def concept_atlas(subject, bank, x: torch.Tensor, importance=None, parts: Sequence | None = None,
                  removal: torch.Tensor | None = None, n_patches: int = 6, n_maps: int = 3, patch: float = 0.35,
                  max_concepts: int | None = None, path=None, maps=None):
    """The atlas of `bank` on images `x` [N,3,H,W]: one row per concept, most important first.

    `importance` [k] (e.g. the mean Sobol index, `ConceptImportance.sobol.mean(0)`) orders the rows
    and draws their bars; `parts` [k] (names from `concepts.score_bank(...).part`) labels what a
    concept's patches are; `removal` [k] (the mean relative drop of `concepts.removal_effect`) is
    quoted per row; `maps` the `concept_maps` of `x` when the caller has them already. Returns the
    PIL image, or the path written when `path` is given."""
    from PIL import Image, ImageDraw

    from ..concepts.bank import concept_maps

    x = subject.check_input(x)
    cm = maps if maps is not None else concept_maps(subject, bank, x)
    k = bank.n_concepts
    imp = None if importance is None else torch.as_tensor(importance, dtype=torch.float32).flatten()
    if imp is not None and imp.numel() != k:
        raise SaliencyError(f"importance must give one value per concept ({k}), got {imp.numel()}")
    order = list(range(k)) if imp is None else torch.argsort(imp, descending=True, stable=True).tolist()
    if max_concepts is not None:
        order = order[:max(1, int(max_concepts))]
    pics = _pil_images(subject, x)
    H, W = x.shape[-2:]
    shown = list(range(min(n_maps, x.shape[0])))
    top = max(float(imp.max()), 1e-12) if imp is not None else 1.0
    width = LABEL_W + n_patches * (TILE + 2) + GAP * 3 + len(shown) * (TILE + 2)
    head_h = 22
    rows = []
    for j in order:
        lines = [(f"concept {j}", 14, True, "#111")]
        if imp is not None:
            lines.append((f"importance {float(imp[j]):.3f}", 11, False, "#333"))
        if parts is not None and parts[j]:
            lines.append((f"mostly the {parts[j]}", 11, False, "#333"))
        if removal is not None:
            change = _signed_pct(-float(removal[j]))
            lines.append((f"removing it: {'score ' if change[0] in '+−' else ''}{change}", 11, False, "#333"))
        row = Image.new("RGB", (width, TILE + 8), "white")
        row.paste(_label_panel(lines, TILE + 8, None if imp is None else float(imp[j]) / top), (0, 0))
        xo = LABEL_W
        for i, box in top_patches(cm.layer_maps, (H, W), j, n_patches, patch):
            row.paste(_tile(pics[i], box), (xo, 4))
            xo += TILE + 2
        xo = LABEL_W + n_patches * (TILE + 2) + GAP * 3
        for i in shown:
            row.paste(_tile(overlay(pics[i], cm.maps[i, j], alpha=0.6)), (xo, 4))
            xo += TILE + 2
        rows.append(row)
    atlas = Image.new("RGB", (width, head_h + len(rows) * (TILE + 8)), "white")
    d = ImageDraw.Draw(atlas)
    f = _font(11, bold=True)
    d.text((6, 5), f"{bank.method} concepts at {bank.layer}", fill="#111", font=f)
    d.text((LABEL_W, 5), "where each concept is strongest", fill="#333", font=f)
    d.text((LABEL_W + n_patches * (TILE + 2) + GAP * 3, 5), "where it sits", fill="#333", font=f)
    for r, row in enumerate(rows):
        atlas.paste(row, (0, head_h + r * (TILE + 8)))
    if path is not None:
        from .viz import save_png

        return save_png(atlas, path)
    return atlas


def summary_figure(summary, subject, n: int = 6, path=None):
    """The summaries of a class (`concepts.summarize_class`): one row per summary with its share
    of the images and the salient regions of its members closest to its centre."""
    from PIL import Image, ImageDraw

    pics = _pil_images(subject, summary.x)
    width = LABEL_W + n * (TILE + 2)
    rows = []
    for r, s in enumerate(summary.summaries):
        row = Image.new("RGB", (width, TILE + 8), "white")
        row.paste(_label_panel([(f"summary {r + 1}", 14, True, "#111"),
                                (f"{fmt_pct(s.frequency)} of the images ({len(s.members)})", 11, False, "#333")],
                               TILE + 8, s.frequency), (0, 0))
        for c, (i, box) in enumerate(zip(s.members[:n], s.boxes[:n])):
            row.paste(_tile(pics[i], box), (LABEL_W + c * (TILE + 2), 4))
        rows.append(row)
    head_h = 22
    fig = Image.new("RGB", (width, head_h + len(rows) * (TILE + 8)), "white")
    from .names import method_title

    label = (summary.target[0].get("name") if summary.target else None) or f"class {summary.cls}"
    ImageDraw.Draw(fig).text((6, 5), f"what the {method_title(summary.method)} maps of {label} have in common",
                             fill="#111", font=_font(11, bold=True))
    for r, row in enumerate(rows):
        fig.paste(row, (0, head_h + r * (TILE + 8)))
    if path is not None:
        from .viz import save_png

        return save_png(fig, path)
    return fig


def _signed_pct(v: float) -> str:
    if abs(v) < 0.005:
        return "<1% change" if v else "no change"
    return ("+" if v > 0 else "−") + fmt_pct(abs(v))


def verbalize_concepts(subject, bank, x: torch.Tensor, index: int = 0, removal=None, parts: Sequence | None = None,
                       top: int = 3, class_name: str | None = None, maps=None) -> Verbalization:
    """Sentences on the `top` concepts of image `index` of `x`, ordered by how much removing each
    drops the target's score (`removal`: a `concepts.ConceptRemoval` for `x`; computed when None,
    k + 1 forwards per image). `parts` [k] names what a concept's patches are when known; `maps`
    the `concept_maps` of `x` when the caller has them (no pass then)."""
    from ..concepts.bank import concept_maps
    from ..concepts.metrics import removal_effect

    x = subject.check_input(x)
    if not 0 <= index < x.shape[0]:
        raise SaliencyError(f"index {index} is not an image of the batch (0..{x.shape[0] - 1})")
    if removal is None:
        removal = removal_effect(subject, bank, x[index:index + 1])
        row = 0
    else:
        row = index
    if maps is None:
        cm = concept_maps(subject, bank, x[index:index + 1])
        one = 0
    else:
        cm, one = maps, index
    drop = removal.drop[row]
    order = torch.argsort(drop, descending=True, stable=True).tolist()[:max(1, int(top))]
    target = removal.target[row] if removal.target else {}
    name = class_name or (target.get("name") if isinstance(target, dict) else None) or "the predicted class"
    facts = {"class": name, "score": float(removal.clean[row]), "concepts": []}
    for j in order:
        m = cm.maps[one, j].clamp(min=0).numpy()
        mask = m >= 0.5 * m.max() if m.max() > 0 else np.ones_like(m, bool)
        facts["concepts"].append({"concept": j, "removed_drop": float(drop[j]), "coefficient": float(cm.coefficients[one, j]),
                                  "part": None if parts is None else parts[j], "location": _location(mask, m)})
    s = _Sentences(facts)
    for r, c in enumerate(facts["concepts"]):
        what = f", whose patches are mostly the {c['part']} part," if c["part"] else ""
        where = c["location"]["phrase"]
        key = f"concepts.{r}.removed_drop"
        if abs(c["removed_drop"]) < 0.005:
            s.add_plain(f"Concept {c['concept']}{what} sits {where}; removing it leaves the score of {name} "
                        "nearly unchanged (less than 1%).")
        elif c["removed_drop"] > 0:
            s.add(f"The model sees concept {c['concept']}{what} {where}; removing it drops the score of "
                  f"{name} by {{}}.", key)
        else:
            facts["concepts"][r]["removed_rise"] = -c["removed_drop"]
            s.add(f"Concept {c['concept']}{what} sits {where}; removing it raises the score of {name} by {{}}.",
                  f"concepts.{r}.removed_rise")
    text = " ".join(i["text"] for i in s.items)
    return Verbalization(text, facts, s.items)





__all__ = ["concept_atlas", "summary_figure", "verbalize_concepts", "top_patches"]
