"""A self-contained HTML report: one file, images embedded, no network, opens from disk.

Per photo: the top-5 predictions, one overlay per method on a shared colour scale with its
colour bar, the plain-language verbalization, the metric table with the better direction
marked, deletion/insertion-type curves (inline SVG), and a reproducibility footer (model,
target, seeds, parameters, passes, versions). Rendered with Jinja2 from `templates/`.

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
    """The colour bar of the shared scale as a PNG data URI (left = low, right = high)."""
    from PIL import Image

    from ..viz import colorize

    ramp = np.linspace(-1 if signed else 0, 1, width, dtype=np.float32)[None].repeat(height, 0)
    ramp[:, 0] = -1 if signed else 0  # pin the ends so colorize's own scaling is the identity
    ramp[:, -1] = 1
    return _data_uri(Image.fromarray(colorize(ramp, signed=signed)), "PNG")


def rich_text(text: str):
    """Escape `text`, then render *label* as <em>label</em> (the verbalization's emphasis)."""
    import re

    from markupsafe import Markup, escape

    parts = re.split(r"\*([^*]+)\*", text)
    out = []
    for i, p in enumerate(parts):
        out.append(f"<em>{escape(p)}</em>" if i % 2 else str(escape(p)))
    return Markup("".join(out))


def _svg_curves(curves: list[dict]) -> dict:
    """Polyline point strings for one curve panel: [{method, x[], y[]}] -> scaled SVG coordinates."""
    pad_l, pad_b, pad_t, pad_r = 34, 26, 8, 8
    ys = [v for c in curves for v in c["y"] if v is not None and math.isfinite(v)]
    lo, hi = (min(0.0, min(ys)), max(1.0, max(ys))) if ys else (0.0, 1.0)
    xs = [v for c in curves for v in c["x"]]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    x1 = x1 if x1 > x0 else x0 + 1
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
    ticks_y = [{"y": py(v), "label": f"{v:g}"} for v in np.linspace(lo, hi, 3)]
    ticks_x = [{"x": px(v), "label": f"{v:g}"} for v in np.linspace(x0, x1, 3)]
    return {"lines": lines, "ticks_x": ticks_x, "ticks_y": ticks_y, "w": CURVE_W, "h": CURVE_H,
            "left": pad_l, "bottom": CURVE_H - pad_b, "right": CURVE_W - pad_r, "top": pad_t}


def metrics_available() -> bool:
    try:
        import saliencykit.metrics  # noqa: F401
    except Exception:  # the evaluation package is optional for the report
        return False
    return True


def _metric_section(subject, x, exps: dict, metrics: Sequence[str], seed, batch_size, metric_params) -> dict:
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
            xlabel = next((r.curves.get("xlabel", "") for r in ev.results[metric].values() if r.curves), "")
            panels.append({"metric": metric, "direction": direction, "xlabel": xlabel, **_svg_curves(curves)})
    return {"columns": columns, "rows": rows, "panels": panels, "seed": d["seed"],
            "passes": {metric: {m: e["passes"] for m, e in per.items()} for metric, per in d["metrics"].items()}}


def photo_section(subject, image, name: str, methods: Sequence[str] | None = None, target=None,
                  metrics: Sequence[str] = (), seed: int = 0, batch_size: int | None = None,
                  params: dict | None = None, layer="auto", explanations: Mapping[str, Explanation] | None = None,
                  predictions: list | None = None, verbalize: bool = True, metric_params: dict | None = None) -> dict:
    """Everything the report shows for one photo (explanations are computed unless given)."""
    from ...methods import explain
    from ...images import load_image
    from ...targets import as_target
    from ..verbalize import method_title, verbalize as verbalize_fn

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
    cells = []
    for mname, e in exps.items():
        cells.append({"method": mname, "title": method_title(mname), "signed": e.signed,
                      "overlay": _data_uri(e.overlay(shown)), "seconds": e.seconds, "passes": e.passes,
                      "layer": e.layer, "params": e.params, "seed": e.seed})
    first = next(iter(exps.values()))
    section = {"name": name, "photo": _data_uri(shown), "predictions": preds,
               "target": first.target[0] if first.target else {"name": preds[0]["label"], "kind": "class"},
               "cells": cells, "signed_present": any(c["signed"] for c in cells),
               "unsigned_present": any(not c["signed"] for c in cells), "verbalization": None,
               "metrics": None, "metrics_note": None}
    if verbalize:
        names = list(exps)
        v = verbalize_fn(subject, x, exps[names[0]], compare=[exps[n] for n in names[1:2]], batch_size=batch_size)
        section["verbalization"] = {"html": rich_text(v.text), "facts": v.facts, "method": method_title(names[0])}
    if metrics:
        if metrics_available():
            section["metrics"] = _metric_section(subject, x, exps, metrics, seed, batch_size, metric_params)
        else:
            section["metrics_note"] = "Metrics were requested but the evaluation package is not available."
    return section


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
    return template.render(sections=sections, meta=meta, display_clip=_overlay_clip(),
                           colour_bar_unsigned=colour_bar(False), colour_bar_signed=colour_bar(True))


def run_meta(subject, methods, target, seed, metrics, extra: dict | None = None) -> dict:
    return {"title": "saliencykit report", "model": getattr(subject, "name", "model"), "methods": list(methods),
            "target": "top-1 class" if target is None else repr(target), "seed": seed, "metrics": list(metrics),
            "versions": package_versions(), "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            **(extra or {})}


def build(subject, photos: Sequence, methods: Sequence[str], target=None, metrics: Sequence[str] = (), seed: int = 0,
          batch_size: int | None = None, params: dict | None = None, layer="auto", names: Sequence[str] | None = None,
          verbalize: bool = True, progress=None, metric_params: dict | None = None) -> str:
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
                                      metric_params=metric_params))
    return render(sections, run_meta(subject, methods, target, seed, metrics))


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


__all__ = ["build", "render", "photo_section", "write", "run_meta", "colour_bar", "rich_text", "metrics_available"]
