"""The metrics on series [B,C,T], volumes [B,C,D,H,W] and feature vectors [B,F]: identities on
linear and tiny convolutional models, the localisation numbers against the series benchmark's own
scorer, and the image-only metrics' refusal."""
import math

import pytest
import torch
from torch import nn

import saliencykit as sk
from linear_model import Linear2
from saliencykit import SaliencyError, Subject
from saliencykit.explanation import Explanation
from saliencykit.metrics import evaluate

# layout -> (channels, map shape): small enough that every metric runs in well under a second
CASES = {"BCT": (2, (20,)), "BCDHW": (1, (3, 4, 5)), "BF": (None, (7,))}


def _permutation_maps(layout, seed):
    """Two maps of the layout's map shape whose values are permutations of 0..n-1 (no ties):
    (map shape, n positions, maps)."""
    shape = CASES[layout][1]
    n = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    return shape, n, torch.stack([torch.randperm(n, generator=g).float().reshape(shape) for _ in range(2)])


def _linear_case(layout, batch=2, seed=0):
    c, shape = CASES[layout]
    inner = shape if c is None else (c,) + shape
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(inner, generator=g)
    x = torch.randn((batch,) + inner, generator=g)
    subject = Subject(Linear2(w, b=0.3), labels=["a", "b"], input_size=shape, layout=layout, name="linear")
    return subject, x, w


def _exp(maps, layout, name="m", signed=True, attributions=None):
    return Explanation(maps=maps, method=name, signed=signed, layout=layout, attributions=attributions)


def _channel_sum(t, layout):
    return t if CASES[layout][0] is None else t.sum(1)


# ------------------------------------------------------------------------------ deletion identity
@pytest.mark.parametrize("layout", sorted(CASES))
def test_deletion_curve_of_a_linear_model_is_the_hand_computed_one(layout):
    # deletion onto zeros, `step` positions per step, most salient first: the logit after k steps is
    # b + the sum of w*x over the positions not yet removed (all channels of a position go together).
    # Distinct map values (a permutation), so the order has no ties; float32 sums: 1e-4.
    subject, x, w = _linear_case(layout)
    shape, n, maps = _permutation_maps(layout, seed=1)
    step = 3
    ev = evaluate(subject, x, _exp(maps, layout), metrics=["deletion"], target=0, random_baseline=False,
                  params={"deletion": {"step": step, "substrate": "zero", "output": "logit"}})
    r = ev["deletion"]["m"]
    contrib = _channel_sum(x * w, layout).reshape(2, n)                  # per position
    order = maps.reshape(2, n).argsort(1, descending=True)
    steps = math.ceil(n / step)
    want = torch.stack([torch.tensor([0.3 + float(contrib[b, order[b, min(k * step, n):]].sum())
                                      for k in range(steps + 1)]) for b in range(2)])
    assert r.curves["y"].shape == (2, steps + 1)
    assert torch.allclose(r.curves["y"].float(), want.float(), atol=1e-4)
    # the x axis counts positions: k*step of n
    assert r.curves["x"][1] == pytest.approx(step / n)
    assert r.curves["xlabel"].startswith("fraction of " + {"BCT": "time steps", "BCDHW": "voxels",
                                                          "BF": "features"}[layout])


@pytest.mark.parametrize("layout", ["BCT", "BCDHW"])
def test_insertion_runs_from_the_blurred_input_to_the_clean_one(layout):
    # insertion's curve starts at the score of the blur substrate and ends at the clean score (every
    # position inserted); float32 forward passes of a linear model: 1e-5
    from saliencykit.metrics.base import make_substrate

    subject, x, w = _linear_case(layout)
    maps = torch.rand((2,) + CASES[layout][1], generator=torch.Generator().manual_seed(2))
    ev = evaluate(subject, x, _exp(maps, layout), metrics=["insertion"], target=0, random_baseline=False,
                  params={"insertion": {"output": "logit"}})
    y = ev["insertion"]["m"].curves["y"]
    with torch.no_grad():
        clean = subject.model(x)[:, 0].double()
        blurred = subject.model(make_substrate(subject, x, "blur", layout))[:, 0].double()
    assert torch.allclose(y[:, -1], clean, atol=1e-5)
    assert torch.allclose(y[:, 0], blurred, atol=1e-5)


def test_series_blur_is_along_time_only():
    # RISE's blur (radius 5, sigma 5, zero padding) along time: channels never mix, a constant stays
    # constant 5+ steps from the ends (the kernel sums to 1) and falls at the zero-padded ends
    from saliencykit.metrics.base import make_substrate

    subject, _, _ = _linear_case("BCT")
    ones = torch.ones(1, 2, 20)
    ones[:, 1] = 3.0
    b = make_substrate(subject, ones, "blur", "BCT")
    assert torch.allclose(b[0, :, 10], torch.tensor([1.0, 3.0]), atol=1e-6)
    assert float(b[0, 0, 0]) < 0.8


def test_blur_substrate_on_feature_vectors_is_refused_with_the_fix():
    subject, x, _ = _linear_case("BF")
    with pytest.raises(SaliencyError, match="substrate='zero'"):
        evaluate(subject, x, _exp(torch.rand(2, 7), "BF"), metrics=["insertion"], random_baseline=False)


# ------------------------------------------------------------------------------ map-only metrics
@pytest.mark.parametrize("layout", sorted(CASES))
def test_sparseness_of_one_hot_is_one_and_of_constant_is_zero(layout):
    # Gini index sum_k (2k-n-1) a_(k) / (n sum a) over the sorted |map|: one nonzero position gives
    # (n-1)/n (1 as n grows), a constant map exactly 0
    subject, x, _ = _linear_case(layout)
    shape = CASES[layout][1]
    n = math.prod(shape)
    one_hot = torch.zeros((2,) + shape)
    one_hot.view(2, -1)[:, 5] = 1.0
    ev = evaluate(subject, x, {"hot": _exp(one_hot, layout, "hot"), "flat": _exp(torch.ones((2,) + shape), layout,
                                                                                  "flat")},
                  metrics=["sparseness", "complexity"], random_baseline=False)
    assert torch.allclose(ev["sparseness"]["hot"].scores, torch.full((2,), (n - 1) / n, dtype=torch.float64))
    assert torch.allclose(ev["sparseness"]["flat"].scores, torch.zeros(2, dtype=torch.float64))
    # entropy: 0 for one position, log(n) for a uniform map
    assert torch.allclose(ev["complexity"]["hot"].scores, torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(ev["complexity"]["flat"].scores, torch.full((2,), math.log(n), dtype=torch.float64))


@pytest.mark.parametrize("layout", sorted(CASES))
def test_pointing_game_hits_when_the_maximum_is_inside_the_mask(layout):
    # maps' maximum at position 5 (flat index); a mask that holds it is a hit (1), a mask far from
    # it (farther than the tolerance) a miss (0); energy = the share of positive mass inside
    subject, x, _ = _linear_case(layout)
    shape = CASES[layout][1]
    maps = torch.full((2,) + shape, 0.1)
    maps.view(2, -1)[:, 5] = 1.0
    masks = torch.zeros((2,) + shape, dtype=torch.bool)
    masks.view(2, -1)[0, 5] = True                      # row 0: the maximum is the mask
    masks.view(2, -1)[1, -1] = True                     # row 1: the last position only
    ev = evaluate(subject, x, _exp(maps, layout), metrics=["pointing_game", "energy_pointing_game"], masks=masks,
                  random_baseline=False, params={"pointing_game": {"tolerance": 1}})
    n = math.prod(shape)
    assert ev["pointing_game"]["m"].scores.tolist() == [1.0, 0.0]
    want = torch.tensor([1.0 / (1.0 + 0.1 * (n - 1)), 0.1 / (1.0 + 0.1 * (n - 1))], dtype=torch.float64)
    assert torch.allclose(ev["energy_pointing_game"]["m"].scores, want)


def test_pointing_tolerance_is_in_time_steps_and_voxels():
    # the maximum at step 5, the mask at step 8: 3 steps away, a hit within 4 (strictly), a miss within 3
    subject, x, _ = _linear_case("BCT")
    maps = torch.zeros(2, 20)
    maps[:, 5] = 1.0
    masks = torch.zeros(2, 20, dtype=torch.bool)
    masks[:, 8] = True
    for tol, hit in ((4, 1.0), (3, 0.0)):
        ev = evaluate(subject, x, _exp(maps, "BCT"), metrics=["pointing_game"], masks=masks, random_baseline=False,
                      params={"pointing_game": {"tolerance": tol}})
        assert ev["pointing_game"]["m"].scores.tolist() == [hit, hit]


def test_masks_of_the_wrong_shape_name_the_expected_one():
    subject, x, _ = _linear_case("BCT")
    with pytest.raises(SaliencyError, match=r"expected \[2, 20\]"):
        evaluate(subject, x, _exp(torch.rand(2, 20), "BCT"), metrics=["pointing_game"],
                 masks=torch.ones(2, 4, 5, dtype=torch.bool))


# ------------------------------------------------------------------------------ model-based metrics
@pytest.mark.parametrize("layout", sorted(CASES))
def test_infidelity_of_the_exact_attribution_of_a_linear_model_is_zero(layout):
    # on f linear, f(x) - f(x - I) = I.w, so the attribution Phi = w (gradient) gives infidelity 0
    # (beta = 1) whatever the perturbations; float32 model: 1e-8 relative to (I.w)^2 ~ 1e1
    subject, x, w = _linear_case(layout)
    attr = w.expand_as(x).clone()
    e = _exp(_channel_sum(attr, layout), layout, "grad", attributions=attr)
    ev = evaluate(subject, x, e, metrics=["infidelity"], target=0, random_baseline=False,
                  params={"infidelity": {"n_perturb": 20, "output": "logit"}})
    assert float(ev["infidelity"]["grad"].scores.max()) < 1e-6


@pytest.mark.parametrize("layout", sorted(CASES))
def test_sensitivity_of_the_gradient_of_a_linear_model_is_zero(layout):
    # saliency on a linear model does not depend on x: max/avg sensitivity 0 exactly
    subject, x, _ = _linear_case(layout)
    e = sk.explain(subject, x, "saliency", target=0)
    ev = evaluate(subject, x, e, metrics=["max_sensitivity", "avg_sensitivity"], random_baseline=False,
                  params={"max_sensitivity": {"n_samples": 3}, "avg_sensitivity": {"n_samples": 3}})
    assert float(ev["max_sensitivity"]["saliency"].scores.abs().max()) == 0.0
    assert float(ev["avg_sensitivity"]["saliency"].scores.abs().max()) == 0.0


def _conv_subject(layout):
    torch.manual_seed(0)
    if layout == "BCT":
        model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                              nn.Linear(4, 3))
        return Subject(model, labels=["a", "b", "c"], input_size=(20,), layout=layout), torch.randn(2, 2, 20)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    return Subject(model, labels=["a", "b", "c"], input_size=(3, 4, 5), layout=layout), torch.randn(2, 1, 3, 4, 5)


@pytest.mark.parametrize("layout", ["BCT", "BCDHW"])
def test_mprt_on_series_and_volumes_compares_maps_by_rank(layout):
    # randomising every layer destroys the gradient map: the Spearman curve has one point per stage,
    # in [-1, 1]; SSIM and HOG are image measures and are NaN on these maps; the model is untouched
    subject, x = _conv_subject(layout)
    before = {k: v.clone() for k, v in subject.model.state_dict().items()}
    e = sk.explain(subject, x, "saliency")
    ev = evaluate(subject, x, e, metrics=["mprt", "sparseness", "saco", "deletion"], random_baseline=True,
                  params={"mprt": {"stages": 2}, "saco": {"groups": 4}})
    r = ev["mprt"]["saliency"]
    assert r.curves["y"].shape == (2, 2)
    assert ((r.curves["y"] >= -1) & (r.curves["y"] <= 1)).all()
    assert all(math.isnan(v) for row in r.extras["similarity"]["ssim"] for v in row)
    assert all(torch.equal(before[k], v) for k, v in subject.model.state_dict().items())
    for m in ("sparseness", "saco", "deletion"):
        assert torch.isfinite(ev[m]["saliency"].scores).all() and torch.isfinite(ev[m]["random"].scores).all()


def test_clip_layout_removes_a_position_on_every_channel_of_its_frame():
    # BTCHW: the channel axis is 2; deletion of a linear model onto zeros still equals the hand sum
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, 4, 4, generator=g)
    x = torch.randn(1, 2, 3, 4, 4, generator=g)
    subject = Subject(Linear2(w), labels=["a", "b"], input_size=(4, 4), layout="BTCHW", mean=(0, 0, 0),
                      std=(1, 1, 1))
    maps = torch.randperm(32, generator=g).float().reshape(1, 2, 4, 4)
    ev = evaluate(subject, x, _exp(maps, "BTCHW"), metrics=["deletion"], target=0, random_baseline=False,
                  params={"deletion": {"step": 16, "output": "logit"}})
    contrib = (x * w).sum(2).reshape(32)
    order = maps.reshape(32).argsort(descending=True)
    want = [float(contrib[order[k:]].sum()) for k in (0, 16, 32)]
    assert torch.allclose(ev["deletion"]["m"].curves["y"][0].float(), torch.tensor(want), atol=1e-4)


@pytest.mark.parametrize("layout", ["BCT", "BF"])
def test_rfxg_masks_the_top_positions_of_the_map(layout):
    # rfxg_ccs on the two-logit linear model, onto zeros ("black" outside images): after the top
    # floor(alpha*n) positions are removed, p_a - p_b = tanh(logit/2) with logit = b + the sum of w*x
    # over the positions kept; trapezoid over alpha as the metric does (float32 logits: 1e-5)
    subject, x, w = _linear_case(layout)
    shape, n, maps = _permutation_maps(layout, seed=5)
    ev = evaluate(subject, x, _exp(maps, layout), metrics=["rfxg_ccs"], target=sk.Contrast(0, vs=1),
                  random_baseline=False)
    r = ev["rfxg_ccs"]["m"]
    contrib = _channel_sum(x * w, layout).reshape(2, n).double()
    order = maps.reshape(2, n).argsort(1, descending=True)
    from saliencykit.metrics.contrastive import ALPHAS as alphas
    want = torch.tensor([[math.tanh((0.3 + float(contrib[b, order[b, int(a * n):]].sum())) / 2) for a in alphas]
                         for b in range(2)], dtype=torch.float64)
    assert torch.allclose(r.curves["y"], want, atol=1e-5)


# ------------------------------------------------------------------------------ refusals
def test_image_only_metrics_refuse_other_layouts_naming_what_applies():
    subject, x, _ = _linear_case("BCT")
    with pytest.raises(SaliencyError, match=r"road_morf cannot score maps of a BCT input.*for BCT use .*deletion"):
        evaluate(subject, x, _exp(torch.rand(2, 20), "BCT"), metrics=["deletion", "road_morf"])
    with pytest.raises(SaliencyError, match="pic_sic"):
        evaluate(subject, x, _exp(torch.rand(2, 20), "BCT"), metrics=["pic_sic"])


def test_explanations_of_another_layout_are_refused():
    subject, x, _ = _linear_case("BCT")
    img = Explanation(maps=torch.rand(2, 4, 5), method="m", signed=False)
    with pytest.raises(SaliencyError, match="the input is BCT but the explanations are of BCHW"):
        evaluate(subject, x, img, metrics=["sparseness"])


def test_random_method_gives_a_map_of_the_layout():
    # the `random` method (what MPRT re-runs for the random row) reads no axis: [B,T] on a series
    subject, x, _ = _linear_case("BCT")
    assert sk.explain(subject, x, "random").maps.shape == (2, 20)


# ------------------------------------------------------------------------------ the series benchmark
@pytest.fixture(scope="module")
def series_bench():
    from saliencykit.benchmarks.series import leaderboard as L

    subject = sk.load_model("series_cnn")
    bench = L.SeriesBench(subject, n=16, seed=7)
    keep = torch.from_numpy(bench.correct)
    return subject, bench.x[keep], bench.labels[keep], bench.masks[keep]


def test_localisation_numbers_equal_the_series_benchmark_scorer(series_bench):
    # the benchmark scores pointing as "the top step is a motif step" and energy as the positive mass
    # inside the motif; `evaluate` with tolerance 1 (distance < 1 step: the step itself) is the same
    # definition, so the means agree to float rounding (1e-12) on the same maps
    from saliencykit.benchmarks.series import leaderboard as L

    subject, x, labels, masks = series_bench
    exps = {"saliency": sk.explain(subject, x, "saliency", target=labels.tolist()),
            "occlusion": sk.explain(subject, x, "occlusion", target=labels.tolist(), patch=10, stride=5)}
    ev = evaluate(subject, x, exps, metrics=["pointing_game", "energy_pointing_game"], masks=masks,
                  target=labels.tolist(), params={"pointing_game": {"tolerance": 1}})
    for name in ("saliency", "occlusion", "random"):
        maps = exps[name].maps if name in exps else Explanation.random_like(exps["saliency"], seed=0).maps
        ref = L.score_maps(maps, masks)
        assert ev["pointing_game"][name].mean() == pytest.approx(ref["pointing"], abs=1e-12)
        assert ev["energy_pointing_game"][name].mean() == pytest.approx(ref["energy"], abs=1e-12)


def test_occlusion_deletes_the_motif_faster_than_a_random_map(series_bench):
    # on the shipped series CNN the class lives in the planted motif: removing occlusion's top steps
    # first lowers the class probability faster (lower deletion AUC) than the random baseline row.
    # Measured: occlusion ~0.25 against random ~0.6 on these 16 series; the test asks only "lower"
    subject, x, labels, _ = series_bench
    occ = sk.explain(subject, x, "occlusion", target=labels.tolist(), patch=10, stride=5)
    ev = evaluate(subject, x, occ, metrics=["deletion"], target=labels.tolist(), random_baseline=True)
    assert ev["deletion"]["occlusion"].mean() < ev["deletion"]["random"].mean()
    assert ev["deletion"]["occlusion"].extras["step"] == 2          # ceil(128 / 100) steps per step
