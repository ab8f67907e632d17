"""`evaluate()`: several metrics over several explanations of the same inputs, one result table."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..engine import PassCounter, Progress, forward_logits
from ..errors import SaliencyError, resolve_seed
from ..hooks import model_lock
from ..methods.base import check_finite_output, get as get_method
from ..explanation import Explanation
from ..targets import Class, as_target
from .base import EvalContext, MetricResult, get, map_shape

DEFAULT_METRICS = ("deletion", "insertion", "saco", "sparseness")
ARROW = {"higher": "↑", "lower": "↓", None: "·"}


class Table(list):
    """Rows (dicts) with `image`, `method` and one column per metric; `directions` says which way
    each metric is better. `str(table)` is an aligned text table."""

    def __init__(self, rows, columns, directions):
        super().__init__(rows)
        self.columns = list(columns)
        self.directions = dict(directions)

    def __str__(self):
        return format_rows(self, self.columns, self.directions)

    def to_csv(self, path) -> Path:
        import csv
        import io

        from ..files import atomic_write

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        w.writeheader()
        for row in self:
            w.writerow({k: _fmt_csv(row.get(k)) for k in self.columns})
        return atomic_write(path, lambda p: Path(p).write_text(buf.getvalue()))


def _fmt_csv(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return v


def format_rows(rows, columns, directions) -> str:
    head = [c if c not in directions else f"{c} {ARROW[directions[c]]}" for c in columns]
    body = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return "" if v is None else str(v)


class EvaluationResult:
    """Scores of every (metric, method) pair: `results[metric][method]` is a `MetricResult`."""

    def __init__(self, results: dict, image_names: list[str], target: list, shared_passes: dict,
                 seconds: dict, seed, params: dict, logits: torch.Tensor | None = None):
        self.results = results
        self.logits = logits   # [B, classes] of the clean pass: predictions without another forward
        self.image_names = list(image_names)
        self.target = target
        self.shared_passes = shared_passes
        self.seconds = seconds
        self.seed = seed
        self.params = params

    @property
    def metrics(self) -> list[str]:
        return list(self.results)

    @property
    def methods(self) -> list[str]:
        seen = []
        for per in self.results.values():
            for m in per:
                if m not in seen:
                    seen.append(m)
        return seen

    @property
    def directions(self) -> dict:
        return {m: next(iter(per.values())).direction if per else None for m, per in self.results.items()}

    def __getitem__(self, key) -> dict[str, MetricResult]:
        return self.results[key]

    def __repr__(self):
        return (f"EvaluationResult(metrics={self.metrics}, methods={self.methods}, "
                f"images={len(self.image_names)})")

    def score(self, metric: str, method: str) -> torch.Tensor:
        return self.results[metric][method].scores

    def table(self) -> Table:
        """One row per (image, method): `image`, `method`, then one column per metric."""
        rows = []
        for b, image in enumerate(self.image_names):
            for method in self.methods:
                row = {"image": image, "method": method}
                for metric, per in self.results.items():
                    r = per.get(method)
                    row[metric] = float(r.scores[b]) if r is not None else float("nan")
                rows.append(row)
        return Table(rows, ["image", "method"] + self.metrics, self.directions)

    def summary(self) -> Table:
        """One row per method with each metric's mean over images (NaN-skipping), ranked by the
        first metric that has a direction (best first)."""
        rows = []
        for method in self.methods:
            row = {"method": method}
            for metric, per in self.results.items():
                row[metric] = per[method].mean() if method in per else float("nan")
            rows.append(row)
        key = next((m for m in self.metrics if self.directions[m] is not None), None)
        if key is not None:
            sign = -1.0 if self.directions[key] == "higher" else 1.0
            rows.sort(key=lambda r: (math.isnan(r[key]), sign * r[key] if not math.isnan(r[key]) else 0.0))
        return Table(rows, ["method"] + self.metrics, self.directions)

    def to_dict(self) -> dict:
        out = {"images": self.image_names, "target": self.target, "seed": self.seed, "params": _plain(self.params),
               "directions": self.directions, "shared_passes": self.shared_passes, "seconds": self.seconds,
               "metrics": {}}
        for metric, per in self.results.items():
            out["metrics"][metric] = {}
            for method, r in per.items():
                entry = {"scores": [_num(v) for v in r.scores.tolist()], "mean": _num(r.mean()),
                         "direction": r.direction, "passes": r.passes, "extras": _plain(r.extras)}
                if r.curves:
                    entry["curve_x"] = r.curves["x"].tolist()
                    entry["curve_y"] = [[_num(v) for v in row] for row in r.curves["y"].tolist()]
                out["metrics"][metric][method] = entry
        return out

    def to_csv(self, path) -> Path:
        return self.table().to_csv(path)

    def to_json(self, path) -> Path:
        from ..files import atomic_write

        text = json.dumps(self.to_dict(), indent=2)
        return atomic_write(path, lambda p: Path(p).write_text(text))

    def curve_metrics(self) -> list[str]:
        return [m for m, per in self.results.items() if any(r.curves for r in per.values())]

    def plot_curves(self, path, metrics=None) -> Path | None:
        """One panel per curve metric (deletion, insertion, ROAD, ...), one line per method: the
        mean curve over images, with each method's mean score in the legend. None if no curves."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        from ..files import atomic_write

        names = [m for m in (metrics or self.curve_metrics()) if m in self.results]
        names = [m for m in names if any(r.curves for r in self.results[m].values())]
        if not names:
            return None
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
        for ax, metric in zip(axes[0], names):
            for method, r in self.results[metric].items():
                if not r.curves:
                    continue
                y = r.curves["y"].double()
                ax.plot(r.curves["x"].numpy(), torch.nanmean(y, 0).numpy(), label=f"{method} ({r.mean():.3f})",
                        linestyle="--" if method == "random" else "-")
            d = self.directions[metric]
            ax.set_title(f"{metric} ({'higher' if d == 'higher' else 'lower'} is better)")
            first = next(r for r in self.results[metric].values() if r.curves)
            ax.set_xlabel(first.curves.get("xlabel", ""))
            ax.set_ylabel(first.curves.get("ylabel", "score"))
            ax.legend(fontsize=7)
        fig.tight_layout()

        def write(p):
            fig.savefig(p, dpi=110, format="png")

        try:
            return atomic_write(path, write)
        finally:
            plt.close(fig)


def _num(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _plain(v):
    from ..explanation import _jsonable

    return _jsonable(v)


def _target_from_explanations(exps: dict[str, Explanation], batch: int):
    """The target the explanations were made for, when they all agree on it: one class per image,
    or one `Contrast(a, vs=b)` of single classes per image. Else the top-1 class."""
    from ..targets import Contrast

    picked, kind = None, None
    for exp in exps.values():
        t = exp.target
        if not t or len(t) != batch:
            continue
        if all(d.get("kind") == "class" and len(d.get("indices", [])) == 1 for d in t):
            key = ("class", tuple(int(d["indices"][0]) for d in t))
        elif all(d.get("kind") == "contrast" and len(d.get("indices", [])) == 1
                 and len(d.get("vs_indices", [])) == 1 for d in t):
            key = ("contrast", tuple((int(d["indices"][0]), int(d["vs_indices"][0])) for d in t))
        else:
            continue
        if picked is None:
            picked = key
        elif picked != key:
            raise SaliencyError("the explanations were made for different targets; pass target=... to evaluate")
    if picked is None:
        return Class(None)
    if picked[0] == "class":
        return Class(list(picked[1]))
    return Contrast([a for a, _ in picked[1]], vs=[b for _, b in picked[1]])


def check_layouts(classes: dict, layout: str) -> None:
    """Refuse, before any pass, metrics that cannot read maps of a `layout` input, naming those
    that can."""
    bad = sorted(m for m, cls in classes.items() if cls.layouts and layout not in cls.layouts)
    if bad:
        from .base import REGISTRY

        ok = sorted(m for m, cls in REGISTRY.items() if not cls.layouts or layout in cls.layouts)
        need = sorted({lay for m in bad for lay in classes[m].layouts})
        raise SaliencyError(f"metric(s) {', '.join(bad)} cannot score maps of a {layout} input: they work on "
                            f"{', '.join(need)} images only; for {layout} use {', '.join(ok)}")


def _changes_model(method: str) -> bool:
    try:
        return get_method(method).changes_model
    except SaliencyError:  # an explanation made elsewhere, under a name no method has
        return False


def evaluate(subject, x: torch.Tensor, explanations, metrics=DEFAULT_METRICS, target=None, seed: int | None = 0,
             masks=None, batch_size: int | None = None, params: dict | None = None, progress: bool = False,
             image_names=None, random_baseline: bool = True) -> EvaluationResult:
    """Score explanations of `x` with several metrics.

    Args:
        subject: the `Subject` the explanations were made for.
        x: the input the explanations explain: `[B,C,H,W]` images, or any layout of
            `subject.LAYOUTS` (series `[B,C,T]`, volumes `[B,C,D,H,W]`, clips, features `[B,F]`).
        explanations: one `Explanation` or a dict name -> Explanation (maps `[B,H,W]` each, or
            the input's shape without its channel axis: `[B,T]`, `[B,D,H,W]`, `[B,F]`).
        metrics: registered metric names (`available()`).
        target: what the metrics score (a Target, label or index). Default: the class the
            explanations were made for (if they all say one class per image), else the top-1 class.
        seed: seed of every random draw (tie-breaks, perturbations); same seed, same numbers; None
            draws a fresh seed and records it.
        masks: boolean object masks of the maps' shape (`[B,H,W]`; `[B,T]`, `[B,D,H,W]`, `[B,F]`),
            for the localisation metrics.
        params: per-metric parameters, `{"deletion": {"step": 8}}`.
        random_baseline: add `Explanation.random_like` as method "random" when no explanation
            is called that, so every table has its chance level.
    """
    from ..subject import Subject

    if not isinstance(subject, Subject):
        if isinstance(subject, torch.nn.Module):
            subject = Subject(subject)
        else:
            raise SaliencyError(f"evaluate needs a Subject or nn.Module, got {type(subject).__name__}")
    view = getattr(target, "subject_view", None)   # a target scored on a view of the model (a Concept)
    if callable(view):
        subject, target = view(subject)
    x = subject.check_input(x)
    seed = resolve_seed(seed)  # None: a fresh seed, recorded in the result so the run can be repeated
    if isinstance(explanations, Explanation):
        exps = {explanations.method: explanations}
    elif isinstance(explanations, dict) and explanations:
        exps = dict(explanations)
    else:
        raise SaliencyError("evaluate needs an Explanation or a non-empty dict name -> Explanation")
    for name, e in exps.items():
        if not isinstance(e, Explanation):
            raise SaliencyError(f"explanation {name!r} is a {type(e).__name__}, not an Explanation")
    if isinstance(metrics, str):
        metrics = [metrics]
    metrics = list(metrics)
    if not metrics:
        raise SaliencyError("no metric given")
    classes = {m: get(m) for m in metrics}   # unknown names fail here, before any work
    params = dict(params or {})
    unknown = set(params) - set(classes)
    if unknown:
        raise SaliencyError(f"parameters given for metric(s) not requested: {sorted(unknown)}")
    for m, cls in classes.items():
        bad = set(params.get(m, {})) - set(cls.defaults)
        if bad:
            raise SaliencyError(f"unknown parameter(s) {sorted(bad)} for metric {m!r}; accepted: {sorted(cls.defaults)}")
    if random_baseline and "random" not in exps:
        first = next(iter(exps.values()))
        exps["random"] = Explanation.random_like(first, seed=0 if seed is None else seed)
    B = x.shape[0]
    layout = subject.layout_for(x)
    layouts = {getattr(e, "layout", "BCHW") for e in exps.values()}
    if layouts != {layout}:
        raise SaliencyError(f"the input is {layout} but the explanations are of {', '.join(sorted(layouts))} "
                            "inputs; score explanations of the input they were made for")
    check_layouts(classes, layout)
    shape = map_shape(x, layout)
    if masks is not None:
        masks = torch.as_tensor(masks)
        if masks.dim() == len(shape):
            masks = masks.unsqueeze(0)
        if masks.dim() != len(shape) + 1 or masks.shape[0] != B or tuple(masks.shape[1:]) != shape:
            raise SaliencyError(f"masks have shape {tuple(masks.shape)}; expected "
                                f"[{', '.join(str(v) for v in (B,) + shape)}] (one boolean mask per example "
                                f"at the map's size, the {layout} input without its channel axis)")
        masks = masks.bool().to(x.device)
    names = list(image_names) if image_names is not None else [f"image{i}" for i in range(B)]
    if len(names) != B:
        raise SaliencyError(f"{len(names)} image names for {B} images")
    tgt = as_target(target) if target is not None else _target_from_explanations(exps, B)
    results: dict = {}
    seconds: dict = {}
    shared = PassCounter()
    # re-explaining with a method that changes the weights for a moment (LRP) needs the model to itself:
    # taken for the whole evaluation, as two evaluations each waiting to have it would wait for ever
    exclusive = any(_changes_model(e.method) for e in exps.values())
    with model_lock(subject.model)(exclusive), subject.explaining():
        logits = forward_logits(subject, x, batch_size, shared)
        check_finite_output(logits, subject)
        resolved = tgt.resolve(subject, logits)
        if len(resolved) != B:
            raise SaliencyError(f"target resolved to {len(resolved)} examples for a batch of {B}")
        ctx = EvalContext(subject, x, resolved, logits, seed=seed, batch_size=batch_size, progress=progress,
                          masks=masks, shared=shared, layout=layout)
        # one bar for the phase (a step per metric), the runner's own bar under it for each metric's chunks
        with Progress(len(classes), "scoring", enabled=progress, leave=True, unit="metric") as bar:
            for m, cls in classes.items():
                if bar.bar is not None:
                    bar.bar.set_postfix_str(m)
                inst = cls()
                if "masks" in cls.needs and masks is None:
                    raise SaliencyError(f"metric {m!r} needs ground-truth object masks or boxes (masks=...)")
                t0 = time.perf_counter()
                p = {**cls.defaults, **params.get(m, {})}
                results[m] = inst.compute(ctx, exps, **p)
                seconds[m] = time.perf_counter() - t0
                bar.step()
    return EvaluationResult(results, names, resolved.describe(), shared.per_image(B), seconds, seed,
                            {m: {**classes[m].defaults, **params.get(m, {})} for m in classes},
                            logits=logits.detach().cpu())
