"""Run summaries: the bootstrap interval, Holm's correction and the paired test against their
definitions (scipy where it implements the same test), and the summary of a small run."""
import numpy as np
import pytest

from saliencykit import SaliencyError
from saliencykit.datasets.summary import bootstrap_ci, holm, paired_test, summarize


def test_bootstrap_interval_of_a_constant_is_the_constant_and_nans_are_dropped():
    assert bootstrap_ci([2.5] * 10) == (2.5, 2.5)
    lo, hi = bootstrap_ci([1.0, np.nan, 1.0])
    assert lo == hi == 1.0
    assert all(np.isnan(v) for v in bootstrap_ci([np.nan]))


def test_bootstrap_interval_matches_the_normal_approximation():
    # for n = 400 normal draws the percentile interval of the mean is close to mean +- 1.96 sd / sqrt(n);
    # 4000 resamples put the Monte-Carlo error of each end near 2 % of the half-width: 10 % tolerance
    v = np.random.default_rng(1).normal(3.0, 2.0, 400)
    lo, hi = bootstrap_ci(v, n_boot=4000, seed=0)
    half = 1.96 * v.std(ddof=1) / np.sqrt(v.size)
    assert abs((hi - lo) / 2 - half) < 0.1 * half
    assert abs((hi + lo) / 2 - v.mean()) < 0.1 * half
    assert bootstrap_ci(v, seed=5) == bootstrap_ci(v, seed=5)       # seeded: the same interval


def test_holm_known_answer():
    # p = (0.01, 0.04, 0.03) -> sorted 0.01*3, 0.03*2, 0.04*1 with the running maximum: 0.03, 0.06, 0.06
    assert np.allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    assert np.isnan(holm([np.nan, 0.5])[0]) and holm([np.nan, 0.5])[1] == 0.5


def test_paired_test_is_scipys_wilcoxon_on_the_finite_pairs():
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(0)
    a, b = rng.normal(0.5, 0.1, 30), rng.normal(0.45, 0.1, 30)
    a[3] = np.nan
    r = paired_test(a, b)
    keep = np.isfinite(a)
    assert r["n"] == 29
    assert r["p"] == pytest.approx(wilcoxon(a[keep], b[keep]).pvalue)
    assert r["a_wins"] == pytest.approx(np.mean(a[keep] > b[keep]))
    assert paired_test([1, 2, 3], [1, 2, 3])["p"] == 1.0            # identical scores: no difference


def test_summarize_ranks_methods_by_the_metric_direction():
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        for method, shift in (("good", 0.3), ("bad", 0.0), ("random", -0.1)):
            rows.append({"image": f"im{i}", "target": "t", "method": method, "label": "ab"[i % 2],
                         "insertion": 0.5 + shift + rng.normal(0, 0.05), "deletion": 0.5 - shift + rng.normal(0, 0.05)})
    s = summarize(pd.DataFrame(rows), metrics=["insertion", "deletion"])
    t = s.table.set_index(["metric", "method"])
    assert t.loc[("insertion", "good"), "rank"] == 1 and t.loc[("deletion", "good"), "rank"] == 1
    assert t.loc[("insertion", "good"), "ci_low"] < t.loc[("insertion", "good"), "mean"] < t.loc[("insertion", "good"), "ci_high"]
    sig = s.pairs[(s.pairs["metric"] == "deletion") & s.pairs["significant"]]
    assert ("good", "bad") in set(zip(sig["better"], sig["worse"]))
    assert set(s.per_class["label"]) == {"a", "b"}
    assert "good" in s.text() and "Wilcoxon" in s.text()
    with pytest.raises(SaliencyError, match="no column for metric"):
        summarize(pd.DataFrame(rows), metrics=["sparseness"])
