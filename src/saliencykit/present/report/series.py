"""The HTML report for series `[B,C,T]`: the same page as for photos, with each series drawn as
lines and each method's map as a coloured band under them with its own colour bar
(`viz.series_plot`), the words of `verbalize_layouts`, and the metrics that read series."""
from __future__ import annotations

import base64
import io
from typing import Sequence

import torch

from ...errors import SaliencyError

PLOT_DPI = 80


def _figure_uri(fig) -> str:
    """A matplotlib figure as a PNG data URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=PLOT_DPI)
    finally:
        plt.close(fig)
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def most_different(exps) -> list[str]:
    """The method the words compare the first one with: of the others, the one whose map ranks the
    time steps least like the first's (Spearman over the steps; a flat map counts 0). [] if alone."""
    import numpy as np
    from scipy.stats import spearmanr

    names = list(exps)
    if len(names) < 2:
        return []
    lead = exps[names[0]].maps[0].double().cpu().numpy()

    def rho(name):
        other = exps[name].maps[0].double().cpu().numpy()
        if np.ptp(lead) == 0 or np.ptp(other) == 0:
            return 0.0
        r = spearmanr(lead, other).statistic
        return float(r) if np.isfinite(r) else 0.0
    return [min(names[1:], key=rho)]


def series_section(subject, x: torch.Tensor, name: str, methods: Sequence[str], target=None,
                   metrics: Sequence[str] = (), seed: int = 0, batch_size: int | None = None,
                   params: dict | None = None, layer="auto", verbalize: bool = True,
                   metric_params: dict | None = None) -> dict:
    """Everything the report shows for one series `x` `[1,C,T]` (the keys of `photo_section`)."""
    from ...methods import explain
    from ...targets import as_target
    from ..names import method_title
    from ..verbalize import verbalize as verbalize_fn
    from ..viz import series_plot
    from . import PHOTO_WARNINGS, _metric_section, metrics_available, rich_text

    if x.dim() != 3 or x.shape[0] != 1:
        raise SaliencyError(f"a series section shows one series [1,C,T], got shape {tuple(x.shape)}")
    exps = explain(subject, x, method=list(methods), target=as_target(target), layer=layer, seed=seed,
                   batch_size=batch_size, params=params)
    preds = subject.predict(x, k=5)[0]
    first = next(iter(exps.values()))
    tgt = first.target[0] if first.target else {"name": preds[0]["label"], "kind": "class"}
    cells, photo_warnings = [], []
    for mname, e in exps.items():
        own = [w for w in e.warnings if w["code"] not in PHOTO_WARNINGS]
        photo_warnings += [w["message"] for w in e.warnings if w["code"] in PHOTO_WARNINGS]
        cells.append({"method": mname, "title": method_title(mname), "signed": e.signed,
                      "overlay": _figure_uri(series_plot(x[0], e.maps[0], e.signed, mname, tgt.get("name"),
                                                         width=6.0, height=2.2)),
                      "seconds": e.seconds, "passes": e.passes, "layer": e.layer, "params": e.params, "seed": e.seed,
                      "display": "",
                      "warnings": [{"short": w.get("short", w["message"]), "message": w["message"]} for w in own]})
    section = {"kind": "series", "name": name, "photo": _figure_uri(series_plot(x[0], None, width=6.0, height=2.2)),
               "predictions": preds, "target": tgt, "cells": cells,
               "signed_present": any(c["signed"] for c in cells), "unsigned_present": any(not c["signed"] for c in cells),
               "verbalization": None,
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
                                                 target=tgt)
        else:
            section["metrics_note"] = "Metrics were requested but the evaluation package is not available."
    return section


def build_series(subject, series: Sequence[torch.Tensor], names: Sequence[str], methods: Sequence[str], target=None,
                 metrics: Sequence[str] = (), seed: int = 0, batch_size: int | None = None, params: dict | None = None,
                 layer="auto", verbalize: bool = True, progress=None, metric_params: dict | None = None) -> str:
    """Compute and render a report for `series` (tensors `[1,C,T]` or `[C,T]`, one section each)."""
    from . import render, run_meta

    if not series:
        raise SaliencyError("the report needs at least one series")
    if not methods:
        raise SaliencyError("the report needs at least one method")
    if len(names) != len(series):
        raise SaliencyError(f"{len(names)} names for {len(series)} series")
    if metrics:
        from ...metrics import get as get_metric
        from ...metrics.evaluate import check_layouts

        check_layouts({m: get_metric(m) for m in metrics}, "BCT")   # before any pass
    from ...methods import get as get_method

    for m in methods:
        get_method(m)
    items = list(zip(series, names))
    sections = []
    for x, nm in (progress(items) if progress else items):
        x = torch.as_tensor(x)
        x = x[None] if x.dim() == 2 else x
        sections.append(series_section(subject, x, nm, methods, target=target, metrics=metrics, seed=seed,
                                       batch_size=batch_size, params=params, layer=layer, verbalize=verbalize,
                                       metric_params=metric_params))
    return render(sections, run_meta(subject, methods, target, seed, metrics))
