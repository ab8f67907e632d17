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


def series_section(subject, x: torch.Tensor, name: str, methods: Sequence[str], target=None,
                   metrics: Sequence[str] = (), seed: int = 0, batch_size: int | None = None,
                   params: dict | None = None, layer="auto", verbalize: bool = True,
                   metric_params: dict | None = None) -> dict:
    """Everything the report shows for one series `x` `[1,C,T]` (the keys of `photo_section`)."""
    from ...methods import explain
    from ...targets import as_target
    from ..viz import series_plot
    from . import explained_section

    if x.dim() != 3 or x.shape[0] != 1:
        raise SaliencyError(f"a series section shows one series [1,C,T], got shape {tuple(x.shape)}")
    exps = explain(subject, x, method=list(methods), target=as_target(target), layer=layer, seed=seed,
                   batch_size=batch_size, params=params)
    preds = subject.predict(x, k=5)[0]
    first = next(iter(exps.values()))
    tgt = first.target[0] if first.target else {"name": preds[0]["label"], "kind": "class"}

    def draw(mname, e):
        return _figure_uri(series_plot(x[0], e.maps[0], e.signed, mname, tgt.get("name"), width=6.0, height=2.2)), ""

    head = {"kind": "series", "name": name, "photo": _figure_uri(series_plot(x[0], None, width=6.0, height=2.2))}
    return explained_section(subject, x, exps, preds, draw, head, metrics=metrics, seed=seed, batch_size=batch_size,
                             verbalize=verbalize, metric_params=metric_params)


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
