"""The HTML report of a dataset run (`saliencykit summarize RUN/` -> RUN/summary.html): the table
of means with bootstrap intervals and ranks, the paired comparisons, the per-class breakdown,
the mean deletion/insertion-type curves with their 95 % bands, and the best and worst images of
each method as overlays (read back from the stored maps and the source)."""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np

from ..errors import SaliencyError

EXAMPLE_SIDE = 192


def _png_uri(fig) -> str:
    import base64

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def curve_figures(run, n_boot: int = 300, seed: int = 0) -> list[dict]:
    """One PNG per curve metric: each method's mean curve over images with a 95 % bootstrap band."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..datasets.summary import bootstrap_means
    from ..metrics import get as get_metric

    out = []
    for metric, info in sorted(run.manifest.get("curves", {}).items()):
        col = f"{metric}_curve"
        if col not in run.rows.columns:
            continue
        fig, ax = plt.subplots(figsize=(4.6, 3.2))
        for method, g in run.rows.groupby("method", sort=False):
            ys = [np.asarray(v, np.float64) for v in g[col] if v is not None and len(v)]
            if not ys or len({len(y) for y in ys}) != 1:
                continue
            Y = np.stack(ys)
            x = np.asarray(info["x"], np.float64) if len(info["x"]) == Y.shape[1] else np.linspace(0, 1, Y.shape[1])
            mean = Y.mean(0)
            boots = bootstrap_means(Y, n_boot, seed)        # [n_boot, T]
            lo, hi = np.quantile(boots, [0.025, 0.975], axis=0)
            line, = ax.plot(x, mean, label=method, linestyle="--" if method == "random" else "-")
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
        d = get_metric(metric).direction
        ax.set_title(f"{metric} ({'higher' if d == 'higher' else 'lower'} area is better)", fontsize=10)
        ax.set_xlabel(info.get("xlabel") or "fraction of pixels")
        ylabel = info.get("ylabel") or "score"
        ax.set_ylabel({"prob": "probability of the target class", "logit": "logit of the target class"}.get(
            ylabel, ylabel))
        ax.legend(fontsize=7)
        fig.tight_layout()
        out.append({"metric": metric, "uri": _png_uri(fig),
                    "caption": f"mean {metric} curve over {run.rows['image'].nunique()} images; bands: 95 % "
                               "bootstrap interval of the mean"})
        plt.close(fig)
    return out


def reopen_source(run):
    """The run's source, opened again from the manifest (None when it cannot be: a dataset object)."""
    from ..datasets.sources import open_source

    d = run.config.get("source", {})
    kind = d.get("kind")
    try:
        if kind == "folder":
            return open_source(d["root"])
        if kind == "list":
            return open_source(d["path"])
        if kind == "parts":
            from ..datasets.sources import PartsSource

            return PartsSource(d["n"], d["seed"])
        if kind == "bundled":
            return open_source("bundled:" + ",".join(d["names"]))
        if kind == "hf":
            return open_source(f"hf:{d['dataset']}" + (f"@{d['split']}" if d.get("split") else ""))
    except SaliencyError:
        return None
    return None


def example_overlays(run, summary, per_method: int = 3) -> tuple[list[dict], str | None]:
    """The best and worst images of each method by the first metric with a direction."""
    from ..maps import overlay
    from .report import _data_uri, _display_copy

    metric = next((m for m, d in summary.directions.items() if d is not None), None)
    if metric is None or per_method <= 0:
        return [], None
    try:
        maps = run.maps(resolution="layer")
    except SaliencyError:
        try:
            maps = run.maps(resolution="input")
        except SaliencyError:
            return [], "no maps were stored (--maps none), so no examples are shown"
    source = reopen_source(run)
    if source is None:
        return [], "the source cannot be reopened from the manifest, so no examples are shown"
    by_id = {it.id: it for it in source.items()}
    higher = summary.directions[metric] == "higher"
    out = []
    for method, g in run.rows[run.rows["method"] != "random"].groupby("method", sort=False):
        g = g[np.isfinite(g[metric])].sort_values(metric, ascending=not higher)
        picks = [("best", r) for _, r in g.head(per_method).iterrows()]
        picks += [("worst", r) for _, r in g.tail(per_method).iloc[::-1].iterrows()] if len(g) > per_method else []
        cells = []
        for which, r in picks:
            m = maps[(maps["image"] == r["image"]) & (maps["method"] == method)]
            if m.empty or r["image"] not in by_id:
                continue
            img = _display_copy(source.decode(by_id[r["image"]]).image)
            if max(img.size) < EXAMPLE_SIDE:   # small images (the parts dataset's 64 px): enlarge, blocky
                k = EXAMPLE_SIDE / max(img.size)
                img = img.resize((round(img.size[0] * k), round(img.size[1] * k)), 0)
            ov = overlay(img, m.iloc[0]["map"], signed=bool(m.iloc[0]["signed"]))
            cells.append({"which": which, "image": r["image"], "score": float(r[metric]), "uri": _data_uri(ov),
                          "target": r["target"], "label": r.get("label"), "signed": bool(m.iloc[0]["signed"])})
        out.append({"method": method, "cells": cells})
    return out, f"best and worst images by {metric}"


def render_run_report(run, summary, examples: int = 3) -> str:
    import jinja2

    from ..metrics import get as get_metric

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "report" / "templates")),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["num"] = lambda v: "–" if v is None or not np.isfinite(v) else f"{float(v):.4f}"
    env.filters["p"] = lambda v: "–" if v is None or not np.isfinite(v) else (f"{v:.2g}" if v >= 1e-4 else "< 1e-4")
    metrics = []
    for metric, d in summary.directions.items():
        t = summary.table[summary.table["metric"] == metric].sort_values("rank", na_position="last")
        pairs = summary.pairs[summary.pairs["metric"] == metric]
        metrics.append({"name": metric, "direction": d, "rows": t.to_dict("records"),
                        "pairs": pairs.to_dict("records"), "description": get_metric(metric).description})
    per_class = None
    if len(summary.per_class) and summary.per_class["label"].nunique() > 1:
        first = next(iter(summary.directions))
        pc = summary.per_class[summary.per_class["metric"] == first]
        wide = pc.pivot_table(index="label", columns="method", values="mean", aggfunc="first")
        per_class = {"metric": first, "methods": list(wide.columns),
                     "rows": [{"label": k, "values": [float(v) for v in row]} for k, row in wide.iterrows()]}
    ex, ex_caption = example_overlays(run, summary, examples)
    cfg = run.config
    meta = {"title": "saliencykit run summary", "root": str(run.root), "model": cfg["model"],
            "methods": cfg["methods"], "metrics": cfg["metrics"], "images": int(run.rows["image"].nunique()),
            "rows": len(run.rows), "errors": run.errors.to_dict("records")[:50], "n_errors": len(run.errors),
            "seed": cfg["seed"], "target": cfg["target"] or "top-1 class", "complete": run.complete,
            "versions": run.manifest.get("versions", {}), "created": run.manifest.get("created"),
            "summarised": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "confidence": summary.confidence,
            "n_boot": summary.n_boot, "boot_seed": summary.seed}
    from .report import colour_bar

    signed = bool(ex) and any(c.get("signed") for e in ex for c in e["cells"])
    return env.get_template("run.html.j2").render(meta=meta, metrics=metrics, per_class=per_class,
                                                  curves=curve_figures(run), examples=ex, examples_caption=ex_caption,
                                                  notes=summary.notes, colour_bar=colour_bar(signed), signed=signed)


def write_run_report(run, summary, path, examples: int = 3) -> Path:
    from .report import write

    return write(path, render_run_report(run, summary, examples))


__all__ = ["render_run_report", "write_run_report", "curve_figures", "example_overlays", "reopen_source"]
