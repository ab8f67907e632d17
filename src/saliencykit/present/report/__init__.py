"""A self-contained HTML report: one file, images embedded, no network, opens from disk.

Per photo: the top-5 predictions, the warnings that apply, one overlay per method (each scaled
on its own, with its colour bar), the plain-language verbalization comparing the first method
with the one that differs most, the metric table with the better direction marked,
deletion/insertion-type curves (inline SVG, round ticks, both axes labelled with what they plot),
and a reproducibility footer (model, target, seeds, parameters, passes, versions). Rendered with Jinja2 from `templates/`.

    html = report.build(subject, ["chelsea", "coffee"], methods=["gradcam", "saliency"])
    report.write("report.html", html)

`photo_section` computes what one photo needs; `render` turns sections into HTML; `build` does
both for a list of photos. Metrics come from `saliencykit.metrics.evaluate`; when that package
is not importable the report is written without them and says so.
"""
from __future__ import annotations

import base64
import io
import math
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ...errors import SaliencyError
from ...explanation import Explanation, package_versions

DISPLAY_SIZE = 320        # longest side of embedded photos/overlays, pixels
CURVE_W, CURVE_H = 300, 180
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f")


def _data_uri(pil_image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        pil_image.convert("RGB").save(buf, format="JPEG", quality=88)
        mime = "image/jpeg"
    else:
        pil_image.save(buf, format="PNG")
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _display_copy(img):
    """The decoded photo (an RGB PIL image) for display: itself, or a copy resized to DISPLAY_SIZE."""
    scale = DISPLAY_SIZE / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))))
    return img


def colour_bar(signed: bool, width: int = 256, height: int = 14) -> str:
    """The colour bar of a map's scale as a PNG data URI (left = low, right = high)."""
    from PIL import Image

    from ..viz import colour_ramp

    return _data_uri(Image.fromarray(colour_ramp(signed, width, height)), "PNG")


def rich_text(text: str):
    """Escape `text`, then render *label* as <em>label</em> (the verbalization's emphasis)."""
    import re

    from markupsafe import Markup, escape

    parts = re.split(r"\*([^*]+)\*", text)
    out = []
    for i, p in enumerate(parts):
        out.append(f"<em>{escape(p)}</em>" if i % 2 else str(escape(p)))
    return Markup("".join(out))


def nice_ticks(lo: float, hi: float, most: int = 5) -> list[tuple[float, str]]:
    """Ticks at a round step (1, 2 or 5 x 10^k) from at or below `lo` to at or above `hi`, each
    printed with as many decimals as the step needs (-0.899573 .. 0.0502133: −1.0, −0.5, 0.0, 0.5)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / max(most - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    ticks = []
    for k in range(math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9) + 1):
        v = round(k * step, decimals) + 0.0   # + 0.0: no "-0"
        ticks.append((v, f"{v:.{decimals}f}".replace("-", "−")))
    return ticks


def _svg_curves(curves: list[dict], ylabel: str = "", xlabel: str = "") -> dict:
    """One curve panel: [{method, x[], y[]}] -> polylines, round ticks and axis labels in SVG
    coordinates; the left margin is made from the widest tick label, so nothing is cut."""
    ys = [v for c in curves for v in c["y"] if v is not None and math.isfinite(v)]
    lo, hi = (min(0.0, min(ys)), max(1.0, max(ys))) if ys else (0.0, 1.0)
    xs = [v for c in curves for v in c["x"]]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    x1 = x1 if x1 > x0 else x0 + 1
    yt, xt = nice_ticks(lo, hi), nice_ticks(x0, x1, 3)
    lo, hi = min(lo, yt[0][0]), max(hi, yt[-1][0])
    widest = max(len(label) for _, label in yt)
    pad_l = 18 + 6 * widest + 6           # y label (rotated, 11 px) + tick labels (~6 px a character at 9 px)
    pad_b, pad_t, pad_r = 34, 8, 10       # x tick labels + x label
    pw, ph = CURVE_W - pad_l - pad_r, CURVE_H - pad_t - pad_b

    def px(v):
        return pad_l + (v - x0) / (x1 - x0) * pw

    def py(v):
        return pad_t + (1 - (v - lo) / (hi - lo)) * ph

    lines = []
    for i, c in enumerate(curves):
        pts = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(c["x"], c["y"]) if b is not None and math.isfinite(b))
        lines.append({"method": c["method"], "points": pts, "colour": PALETTE[i % len(PALETTE)],
                      "dashed": c["method"] == "random", "score": c.get("score")})
    ticks_y = [{"y": py(v), "label": label} for v, label in yt]
    ticks_x = [{"x": px(v), "label": label} for v, label in xt if x0 - 1e-9 <= v <= x1 + 1e-9]
    zero = py(0.0) if lo < 0 < hi else None
    return {"lines": lines, "ticks_x": ticks_x, "ticks_y": ticks_y, "w": CURVE_W, "h": CURVE_H,
            "left": pad_l, "bottom": CURVE_H - pad_b, "right": CURVE_W - pad_r, "top": pad_t, "zero": zero,
            "ylabel": ylabel, "xlabel_svg": xlabel, "ylabel_x": 11, "ylabel_y": pad_t + ph / 2,
            "xlabel_y": CURVE_H - 6, "xlabel_x": pad_l + pw / 2}


def curve_ylabel(ylabel: str, target: dict | None) -> str:
    """What a curve plots, in the target's words: p(espresso), or p(tabby) − p(Egyptian cat) for a contrast."""
    sym = {"prob": "p", "logit": "logit"}.get(ylabel)
    if not target or sym is None:
        return ylabel
    if target.get("kind") == "contrast":
        return f"{sym}({target['name'].split(' vs ')[0]}) − {sym}({target.get('vs_name', '?')})"
    return f"{sym}({target.get('name', '?')})"


def metrics_available() -> bool:
    try:
        import saliencykit.metrics  # noqa: F401
    except Exception:  # the evaluation package is optional for the report
        return False
    return True


def _metric_section(subject, x, exps: dict, metrics: Sequence[str], seed, batch_size, metric_params,
                    target: dict | None = None) -> dict:
    from ...metrics import evaluate

    ev = evaluate(subject, x, exps, metrics=list(metrics), seed=seed, batch_size=batch_size,
                  params=metric_params or None)
    d = ev.to_dict()
    methods = ev.methods
    rows = []
    best = {}
    for metric, per in d["metrics"].items():
        vals = {m: per[m]["mean"] for m in per if per[m]["mean"] is not None and math.isfinite(per[m]["mean"])}
        direction = d["directions"].get(metric)
        if vals and direction in ("higher", "lower"):
            pick = max if direction == "higher" else min
            best[metric] = pick(vals, key=vals.get)
    for m in methods:
        cells = []
        for metric, per in d["metrics"].items():
            v = per.get(m, {}).get("mean")
            cells.append({"value": "—" if v is None or not math.isfinite(v) else f"{v:.3f}",
                          "best": best.get(metric) == m})
        rows.append({"method": m, "cells": cells})
    columns = [{"name": metric, "direction": d["directions"].get(metric),
                "arrow": {"higher": "↑", "lower": "↓"}.get(d["directions"].get(metric), "")}
               for metric in d["metrics"]]
    panels = []
    for metric, per in d["metrics"].items():
        curves = [{"method": m, "x": e["curve_x"], "y": e["curve_y"][0], "score": e["mean"]}
                  for m, e in per.items() if "curve_x" in e]
        if curves:
            direction = d["directions"].get(metric)
            first = next((r.curves for r in ev.results[metric].values() if r.curves), {})
            xlabel, ylabel = first.get("xlabel", ""), curve_ylabel(first.get("ylabel", ""), target)
            panels.append({"metric": metric, "direction": direction, "xlabel": xlabel,
                           "contrast": bool(target and target.get("kind") == "contrast"),
                           **_svg_curves(curves, ylabel, xlabel)})
    return {"columns": columns, "rows": rows, "panels": panels, "seed": d["seed"],
            "passes": {metric: {m: e["passes"] for m, e in per.items()} for metric, per in d["metrics"].items()}}


def photo_section(subject, image, name: str, methods: Sequence[str] | None = None, target=None,
                  metrics: Sequence[str] = (), seed: int = 0, batch_size: int | None = None,
                  params: dict | None = None, layer="auto", explanations: Mapping[str, Explanation] | None = None,
                  predictions: list | None = None, verbalize: bool = True, metric_params: dict | None = None,
                  bank=None) -> dict:
    """Everything the report shows for one photo (explanations are computed unless given); with a
    concept `bank`, also the sentences on its concepts in this photo and where they sit."""
    from ...methods import explain
    from ...images import load_image
    from ...targets import as_target
    from ..viz import CLIP, display_options, overlay

    img = load_image(image)
    x = subject.preprocess(img)
    if explanations is None:
        if not methods:
            raise SaliencyError("the report needs at least one method")
        explanations = explain(subject, x, method=list(methods), target=as_target(target), layer=layer, seed=seed,
                               batch_size=batch_size, params=params)
    exps = dict(explanations)
    if not exps:
        raise SaliencyError("the report needs at least one explanation per photo")
    preds = predictions if predictions is not None else subject.predict(x, k=5)[0]
    shown = _display_copy(img)

    def draw(mname, e):
        opts = display_options(mname)
        return (_data_uri(overlay(shown, e.maps[0], signed=e.signed, **opts)),
                f"clipped at {opts['clip']:g}th pct." if opts["clip"] != CLIP else "")

    section = explained_section(subject, x, exps, preds, draw, {"name": name, "photo": _data_uri(shown)},
                                metrics=metrics, seed=seed, batch_size=batch_size, verbalize=verbalize,
                                metric_params=metric_params)
    if bank is not None:
        section["concepts"] = concept_section(subject, x, bank, shown)
    return section


def explained_section(subject, x: torch.Tensor, exps: dict, preds: list, draw, head: dict, metrics=(), seed: int = 0,
                      batch_size: int | None = None, verbalize: bool = True, metric_params: dict | None = None) -> dict:
    """One input's section, whatever its kind (a photo, a series): a cell per explanation (its picture
    from `draw(method, explanation)` -> (uri, display note), passes, settings, warnings), the words
    on the first method, the metrics; `head` holds the kind's own keys (name, photo, kind)."""
    from ..names import method_title
    from ..verbalize import verbalize as verbalize_fn

    cells, photo_warnings = [], []
    for mname, e in exps.items():
        own = [w for w in e.warnings if w["code"] not in PHOTO_WARNINGS]
        photo_warnings += [w["message"] for w in e.warnings if w["code"] in PHOTO_WARNINGS]
        uri, display = draw(mname, e)
        cells.append({"method": mname, "title": method_title(mname), "signed": e.signed, "overlay": uri,
                      "seconds": e.seconds, "passes": e.passes, "layer": e.layer, "params": e.params, "seed": e.seed,
                      "display": display,
                      "warnings": [{"short": w.get("short", w["message"]), "message": w["message"]} for w in own]})
    first = next(iter(exps.values()))
    section = {**head, "predictions": preds,
               "target": first.target[0] if first.target else {"name": preds[0]["label"], "kind": "class"},
               "cells": cells, "signed_present": any(c["signed"] for c in cells),
               "unsigned_present": any(not c["signed"] for c in cells), "verbalization": None,
               "warnings": list(dict.fromkeys(photo_warnings)) + [f"{c['title']}: {w['message']}" for c in cells
                                                                   for w in c["warnings"]],
               "metrics": None, "metrics_note": None, "concepts": None}
    if verbalize:
        names = list(exps)
        v = verbalize_fn(subject, x, exps[names[0]], compare=[exps[n] for n in most_different(exps)],
                         batch_size=batch_size)
        section["verbalization"] = {"html": rich_text(v.text), "facts": v.facts, "method": method_title(names[0])}
    if metrics:
        if metrics_available():
            section["metrics"] = _metric_section(subject, x, exps, metrics, seed, batch_size, metric_params,
                                                 target=section["target"])
        else:
            section["metrics_note"] = "Metrics were requested but the evaluation package is not available."
    return section


def concept_section(subject, x, bank, shown, top: int = 3) -> dict:
    """The concepts of one photo: the sentences of `atlas.verbalize_concepts` (k + 1 forwards) and
    a strip of the maps of the concepts they name."""
    from PIL import Image

    from ...concepts.bank import concept_maps
    from ..atlas import verbalize_concepts
    from ..viz import overlay

    cm = concept_maps(subject, bank, x)
    v = verbalize_concepts(subject, bank, x, 0, top=top, maps=cm)
    side = 160
    tiles = [overlay(shown.resize((side, side)), cm.maps[0, c["concept"]].clamp(min=0), alpha=0.6)
             for c in v.facts["concepts"]]
    strip = Image.new("RGB", (len(tiles) * (side + 4), side), "white")
    for i, t in enumerate(tiles):
        strip.paste(t, (i * (side + 4), 0))
    return {"text": v.text, "facts": v.facts, "strip": _data_uri(strip), "layer": bank.layer,
            "bank": f"{bank.method}, {bank.n_concepts} concepts"}


PHOTO_WARNINGS = ("unsure", "alpha")  # about the photo or the prediction, not one method: said once


def most_different(exps: Mapping[str, Explanation]) -> list[str]:
    """The method the words compare the first one with: of the others, the one whose map agrees
    least with the first's (rank correlation); comparing Grad-CAM with Grad-CAM++ at 1.00 tells
    the reader nothing. [] when there is no other method."""
    from ..viz import rank_agreement

    names = list(exps)
    if len(names) < 2:
        return []
    lead = exps[names[0]].maps[0]
    return [min(names[1:], key=lambda n: rank_agreement(lead, exps[n].maps[0]))]


def _overlay_clip():
    """The percentile at which `viz.overlay` saturates maps by default (None = no clipping)."""
    import inspect

    from .. import viz

    p = inspect.signature(viz.overlay).parameters.get("clip")
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def render(sections: Sequence[dict], meta: dict) -> str:
    """The report HTML from photo sections and run metadata (model, seed, methods, ...)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["pct"] = lambda v: f"{100 * float(v):.1f}%"
    env.filters["num"] = lambda v: f"{float(v):.2f}"
    template = env.get_template("report.html.j2")
    sections = [dict(sec, index=i + 1) for i, sec in enumerate(sections)]
    from ..viz import SPECKLE_CLIP

    return template.render(sections=sections, meta=meta, display_clip=_overlay_clip(), speckle_clip=SPECKLE_CLIP,
                           colour_bar_unsigned=colour_bar(False), colour_bar_signed=colour_bar(True))


def run_meta(subject, methods, target, seed, metrics, extra: dict | None = None) -> dict:
    return {"title": "saliencykit report", "model": getattr(subject, "name", "model"), "methods": list(methods),
            "target": "top-1 class" if target is None else repr(target), "seed": seed, "metrics": list(metrics),
            "versions": package_versions(), "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            **(extra or {})}


def build(subject, photos: Sequence, methods: Sequence[str], target=None, metrics: Sequence[str] = (), seed: int = 0,
          batch_size: int | None = None, params: dict | None = None, layer="auto", names: Sequence[str] | None = None,
          verbalize: bool = True, progress=None, metric_params: dict | None = None, bank=None) -> str:
    """Compute and render a report for `photos` (paths, PIL images or bundled photo names)."""
    from ... import data

    if not photos:
        raise SaliencyError("the report needs at least one photo")
    if not methods:
        raise SaliencyError("the report needs at least one method")
    if metrics and metrics_available():
        from ...metrics import get as get_metric

        for m in metrics:
            get_metric(m)  # an unknown metric fails before any work
    from ...methods import get as get_method

    for m in methods:
        get_method(m)
    sections = []
    items = list(photos)
    iterator = progress(items) if progress else items
    for i, p in enumerate(iterator):
        if isinstance(p, str) and not Path(p).exists() and p in data.names():
            img, nm = data.image(p), p
        else:
            img, nm = p, Path(p).stem if isinstance(p, (str, Path)) else f"photo {i + 1}"
        if names is not None:
            nm = names[i]
        sections.append(photo_section(subject, img, nm, methods, target=target, metrics=metrics, seed=seed,
                                      batch_size=batch_size, params=params, layer=layer, verbalize=verbalize,
                                      metric_params=metric_params, bank=bank))
    return render(sections, run_meta(subject, methods, target, seed, metrics))


def render_concepts_page(meta: dict, concepts: list, words: list, atlas, summaries=None, notes: Sequence[str] = ()) -> str:
    """The HTML page of `saliencykit concepts`: words, the atlas, the per-concept table, the class
    summaries and how it was made (pictures embedded, so the page is one file to share)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["num"] = lambda v: "–" if v is None or not np.isfinite(v) else f"{float(v):.3f}"
    return env.get_template("concepts.html.j2").render(
        meta=meta, concepts=concepts, words=words, notes=list(notes), atlas=_data_uri(atlas, "PNG"),
        summaries=None if summaries is None else _data_uri(summaries, "PNG"))


def write(path, html: str) -> Path:
    """Write the report atomically (no partial file if anything fails)."""
    import os

    from ...files import atomic_write

    def _write(p):
        Path(p).write_text(html, encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(p, 0o666 & ~umask)  # a report is meant to be shared: not the temp file's 0600

    return atomic_write(path, _write)


__all__ = ["build", "render", "photo_section", "render_concepts_page", "concept_section", "write", "run_meta", "colour_bar", "rich_text", "metrics_available",
           "nice_ticks", "curve_ylabel", "most_different"]
