"""The volume leaderboard: aggregated attributions of the shipped 3-D U-Net scored against the true
organ masks (`saliencykit.benchmarks.volumes.leaderboard`), and the shared scorer it uses."""
import pytest
import torch

import saliencykit as sk
from saliencykit.benchmarks import scoring
from saliencykit.benchmarks.volumes import leaderboard as L
from saliencykit.errors import SaliencyError


@pytest.fixture(scope="module")
def bench():
    # two held-out volumes, three organs each: six maps per method keep the file near half a minute
    return L.VolumeBench(sk.load_model("volume_seg"), n=2, dilation=2)


@pytest.fixture(scope="module")
def scores(bench):
    return {m: bench.score(L.random_maps(0) if m == "random" else L.library_maps(bench, m))
            for m in ("random", "saliency", "integrated_gradients", "occlusion")}


def test_score_maps_known_answers_and_bad_input():
    masks = torch.tensor([[[True, False], [False, False]], [[False, True], [True, False]]])   # [2,2,2]
    maps = torch.tensor([[[4.0, 1.0], [-2.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]])
    s = scoring.score_maps(maps, masks)
    # row 0: the max (4) is inside, energy 4/8, all three outside below the inside one: AUC 1;
    # row 1: a flat zero map points at the first voxel (outside), has no positive mass (left out of
    # the energy mean) and AUC 0.5 (all ties)
    assert s == {"pointing": 0.5, "energy": 0.5, "auc": 0.75, "n": 2}
    with pytest.raises(SaliencyError, match="shape"):
        scoring.score_maps(maps[:, 0], masks)
    with pytest.raises(SaliencyError, match="NaN"):
        scoring.score_maps(maps * float("nan"), masks)
    with pytest.raises(SaliencyError, match="dilation"):
        L.dilate(masks[:, None], -1)


def test_dilation_grows_by_a_cube(bench):
    one = torch.zeros(1, 9, 9, 9, dtype=torch.bool)
    one[0, 4, 4, 4] = True
    assert int(L.dilate(one, 2).sum()) == 5 ** 3 and torch.equal(L.dilate(one, 0), one)
    assert bench.dilation == 2 and torch.equal(bench.masks[1], L.dilate(bench.labels == 1, 2))


def test_random_map_scores_chance(bench, scores):
    share = float(torch.cat([bench.masks[k][bench.rows[k]] for k in bench.organs]).float().mean())
    r = scores["random"]
    # uniform noise on ~98k voxels: the energy share equals the mask's share up to ~0.3 % and the
    # AUC is 0.5 up to ~0.005 (Mann-Whitney with ~7k positives); 6 maps make pointing a coin with
    # p = share (~0.07), so it is only bounded
    assert r["n"] == 6 and r["energy"] == pytest.approx(share, abs=0.01) and r["auc"] == pytest.approx(0.5, abs=0.02)
    assert r["pointing"] <= 0.5


@pytest.mark.parametrize("method,pointing,energy", [
    # measured on 4 volumes (docs/ground-truth.md): pointing 1.0 / 1.0 / 0.5 and energy
    # 0.79 / 0.95 / 0.70 against the random map's 0.17 and 0.07; the margins asked leave room
    ("saliency", 0.6, 0.5), ("integrated_gradients", 0.6, 0.5), ("occlusion", 0.2, 0.4)])
def test_methods_beat_the_random_map(scores, method, pointing, energy):
    s, r = scores[method], scores["random"]
    assert s["pointing"] >= r["pointing"] + pointing, (s, r)
    assert s["energy"] >= r["energy"] + energy, (s, r)


def test_leaderboard_agrees_with_evaluate(bench):
    """`sk.evaluate`'s pointing_game (tolerance 1 voxel: a hit only inside the mask) and
    energy_pointing_game on the same maps and masks give the leaderboard's numbers (same formulas,
    float64: 1e-9)."""
    k = 2
    idx = bench.rows[k]
    x, regions, masks = bench.x[idx], bench.pred[idx] == k, bench.masks[k][idx]
    exp = sk.explain(bench.subject, x, "saliency", target=sk.Region(list(regions), label=k), seed=0)
    ours = scoring.score_maps(exp.maps, masks)
    ev = sk.evaluate(bench.subject, x, {"saliency": exp}, metrics=["pointing_game", "energy_pointing_game"],
                     target=sk.Region(list(regions), label=k), masks=masks,
                     params={"pointing_game": {"tolerance": 1}}, random_baseline=False)
    assert float(ev.score("pointing_game", "saliency").mean()) == pytest.approx(ours["pointing"], abs=1e-9)
    assert float(ev.score("energy_pointing_game", "saliency").nanmean()) == pytest.approx(ours["energy"], abs=1e-9)


def test_leaderboard_rows_and_bad_subject(bench):
    rows = L.leaderboard(bench, ["gradcam"])
    assert sorted(r["method"] for r in rows) == ["gradcam", "random"]
    assert [r["auc"] for r in rows] == sorted((r["auc"] for r in rows), reverse=True)   # best AUC first
    assert all(set(r) == {"method", "pointing", "energy", "auc", "n"} for r in rows)
    with pytest.raises(SaliencyError, match="volume_seg"):
        L.VolumeBench(torch.nn.Conv3d(1, 2, 1), n=1)
