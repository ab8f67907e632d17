"""Summaries of a run that people read: per method and metric the mean with a bootstrap 95 %
interval and a rank, paired comparisons between methods (Wilcoxon signed-rank test, Holm's
correction over the pairs of each metric), the random-map baseline, and a per-class breakdown.

The intervals are percentile bootstrap intervals over images (seeded; the seed is recorded). A
paired comparison uses only the images where both methods have a finite score.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import SaliencyError

N_BOOT = 2000


def bootstrap_means(values, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """`n_boot` bootstrap resamples of the mean of `values` ([n] or [n, ...]: rows resampled):
    `[n_boot, ...]`. Each resample is a multinomial count of the rows, so the memory is
    n_boot x n counts, not n_boot copies of the data (curves of thousands of images stay small)."""
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[0]
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot)   # [n_boot, n]
    return (counts @ v.reshape(n, -1)).reshape((n_boot,) + v.shape[1:]) / n


def bootstrap_ci(values, n_boot: int = N_BOOT, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (NaNs dropped); (nan, nan) if empty."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float(v[0])
    a = (1 - confidence) / 2
    lo, hi = np.quantile(bootstrap_means(v, n_boot, seed), [a, 1 - a])
    return float(lo), float(hi)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of p-values (family-wise error), NaNs left as they are."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.where(np.isfinite(p))[0]
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def paired_test(a, b) -> dict:
    """Wilcoxon signed-rank test of paired scores (two-sided), on the pairs where both are finite."""
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    out = {"n": int(d.size), "mean_difference": float(d.mean()) if d.size else float("nan"),
           "a_wins": float((d > 0).mean()) if d.size else float("nan"),
           "b_wins": float((d < 0).mean()) if d.size else float("nan")}
    if d.size < 2 or not np.any(d != 0):
        out["p"] = 1.0 if d.size >= 2 else float("nan")
        return out
    out["p"] = float(wilcoxon(a, b, zero_method="wilcox", alternative="two-sided").pvalue)
    return out


@dataclass
class Summary:
    """`table`: one row per (metric, method) with mean, interval, n and rank; `pairs`: one row per
    (metric, method a, method b); `per_class`: mean per (metric, label, method)."""

    table: object
    pairs: object
    per_class: object
    directions: dict
    seed: int
    confidence: float
    n_boot: int
    notes: list = field(default_factory=list)

    def text(self, metrics=None) -> str:
        """The table as aligned text: one block per metric, best method first."""
        lines = []
        for metric in metrics or list(self.directions):
            t = self.table[self.table["metric"] == metric]
            if t.empty:
                continue
            d = self.directions[metric]
            arrow = {"higher": "↑ higher is better", "lower": "↓ lower is better"}.get(d, "no better direction")
            lines.append(f"{metric} ({arrow}; mean over images, {int(self.confidence * 100)} % bootstrap interval)")
            width = max(len(m) for m in t["method"])
            for _, r in t.sort_values("rank", na_position="last").iterrows():
                rank = "" if not np.isfinite(r["rank"]) else f"{int(r['rank'])}."
                lines.append(f"  {rank:>3} {r['method']:<{width}}  {_f(r['mean'])}  [{_f(r['ci_low'])}, "
                             f"{_f(r['ci_high'])}]  n={int(r['n'])}")
            sig = self.pairs[(self.pairs["metric"] == metric) & self.pairs["significant"]]
            if len(sig):
                better = [f"{r['better']} > {r['worse']}" for _, r in sig.iterrows()]
                lines.append(f"  significant (Wilcoxon signed-rank, Holm-corrected p < 0.05): {'; '.join(better)}")
            else:
                lines.append("  no difference between methods is significant (Wilcoxon signed-rank, Holm, p < 0.05)")
            lines.append("")
        lines += self.notes
        return "\n".join(lines).rstrip()

    def __str__(self):
        return self.text()


def _f(v) -> str:
    return "nan" if not np.isfinite(v) else f"{v:.4f}"


def summarize(run, metrics=None, seed: int = 0, n_boot: int = N_BOOT, confidence: float = 0.95,
              alpha: float = 0.05) -> Summary:
    """Summarise a `Run` (`load_run`) or a rows DataFrame with the run's metrics."""
    import pandas as pd

    from ..metrics import get as get_metric

    rows = run.rows if hasattr(run, "rows") else run
    metrics = list(metrics or (run.metrics if hasattr(run, "metrics") else []))
    if not metrics:
        raise SaliencyError("the run has no metric columns to summarise (it was made without --metric)")
    missing = [m for m in metrics if m not in rows.columns]
    if missing:
        raise SaliencyError(f"no column for metric(s) {missing} in the run (columns: {list(rows.columns)})")
    if rows.empty:
        raise SaliencyError("the run has no rows yet: no shard has finished")
    directions = {m: get_metric(m).direction for m in metrics}
    methods = list(dict.fromkeys(rows["method"]))
    key = ["image", "target"] if "target" in rows.columns else ["image"]
    table, pairs, per_class = [], [], []
    for mi, metric in enumerate(metrics):
        wide = rows.pivot_table(index=key, columns="method", values=metric, aggfunc="first", dropna=False)
        for j, method in enumerate(methods):
            v = wide[method].to_numpy(np.float64) if method in wide else np.array([])
            finite = v[np.isfinite(v)]
            lo, hi = bootstrap_ci(finite, n_boot, confidence, seed + 7919 * mi + j)
            table.append({"metric": metric, "method": method, "mean": float(finite.mean()) if finite.size else math.nan,
                          "ci_low": lo, "ci_high": hi, "n": int(finite.size), "direction": directions[metric],
                          "baseline": method == "random"})
        group = []
        for a_i, a in enumerate(methods):
            for b in methods[a_i + 1:]:
                if a not in wide or b not in wide:
                    continue
                r = paired_test(wide[a].to_numpy(np.float64), wide[b].to_numpy(np.float64))
                group.append({"metric": metric, "a": a, "b": b, **r})
        for r, p_adj in zip(group, holm([g["p"] for g in group])):
            r["p_holm"] = p_adj
            d = directions[metric]
            r["significant"] = bool(np.isfinite(p_adj) and p_adj < alpha and d is not None and r["mean_difference"] != 0)
            a_better = (r["mean_difference"] > 0) == (d == "higher")
            r["better"], r["worse"] = (r["a"], r["b"]) if a_better else (r["b"], r["a"])
            r["test"] = "Wilcoxon signed-rank (two-sided), Holm-corrected over the pairs of this metric"
        pairs += group
        if "label" in rows.columns and rows["label"].notna().any():
            g = rows.groupby(["label", "method"], dropna=True)[metric].agg(["mean", "count"]).reset_index()
            g.insert(0, "metric", metric)
            per_class.append(g)
    table = pd.DataFrame(table)
    table["rank"] = np.nan
    for metric in metrics:
        d = directions[metric]
        sel = (table["metric"] == metric) & np.isfinite(table["mean"])
        if d is not None and sel.any():
            table.loc[sel, "rank"] = table.loc[sel, "mean"].rank(ascending=(d == "lower"), method="min")
    pairs = pd.DataFrame(pairs, columns=["metric", "a", "b", "n", "mean_difference", "a_wins", "b_wins", "p",
                                         "p_holm", "significant", "better", "worse", "test"])
    per_class = pd.concat(per_class, ignore_index=True) if per_class else pd.DataFrame(
        columns=["metric", "label", "method", "mean", "count"])
    notes = []
    if "random" in methods:
        notes.append("random: a uniform-random map scored the same way, the chance level every method should beat.")
    if hasattr(run, "manifest") and run.config.get("amp"):
        notes.append("amp: the maps were made under mixed precision (bfloat16 on a CPU, float16 on CUDA) and differ "
                     "from float32 ones; the metrics ran in float32.")
    return Summary(table, pairs, per_class, directions, seed, confidence, n_boot, notes)


__all__ = ["summarize", "Summary", "bootstrap_ci", "bootstrap_means", "paired_test", "holm"]
