"""Agreement with Quantus (an independent implementation) on the same settings.

Where Quantus's definition differs from the paper the comparison is made where the two coincide,
and the difference is stated in the test.
"""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import Subject
from saliencykit.explanation import Explanation
from saliencykit.metrics import evaluate

quantus = pytest.importorskip("quantus")
warnings.filterwarnings("ignore", module="quantus")


def _exp(maps, name="m"):
    return Explanation(maps=maps, method=name, signed=True)


@pytest.fixture
def tiny_batch(tiny):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 3, 32, 32, generator=g)
    maps = torch.rand(3, 32, 32, generator=g)   # distinct values: no tie-breaking differences
    y = tiny.forward(x).argmax(1)
    return tiny, x, maps, y


def test_deletion_equals_quantus_pixel_flipping(tiny):
    # Quantus flips `features_in_step` channel-elements per step of the map broadcast over channels
    # (ties of one pixel's channels stay adjacent), onto the baseline value 0; with 3*step
    # elements per step that is our deletion (zero substrate) at `step` pixels per step. Its curve
    # starts after the first step, ours at the clean input. float32 forwards: 1e-5.
    # (Quantus requires features_in_step to divide H*W: 48x48 inputs, 3*16 = 48.)
    subject = tiny
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 3, 48, 48, generator=g)
    maps = torch.rand(3, 48, 48, generator=g)
    y = subject.forward(x).argmax(1)
    step = 16
    ev = evaluate(subject, x, _exp(maps), metrics=["deletion"], target=y.tolist(), random_baseline=False,
                  params={"deletion": {"step": step, "substrate": "zero"}})
    ours = ev["deletion"]["m"].curves["y"][:, 1:].numpy()
    metric = quantus.PixelFlipping(features_in_step=3 * step, perturb_baseline=0.0, normalise=False,
                                   disable_warnings=True)
    with subject.explaining():
        theirs = np.array(metric(model=subject.model, x_batch=x.numpy(), y_batch=y.numpy(),
                                 a_batch=maps[:, None].expand(-1, 3, -1, -1).numpy().copy(), device="cpu",
                                 softmax=True))
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


class Linear2(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        lin = (x * self.w).flatten(1).sum(1)
        return torch.stack([lin, -lin], 1)


def test_avg_and_max_sensitivity_agree_with_quantus():
    # gradient x input of a linear model under uniform L-inf noise of radius r, Frobenius norms,
    # divided by ||Phi(x)||: both libraries estimate the same expectation / maximum by Monte Carlo
    # with different random draws (200 samples each). The norm of a sum of 432 independent terms
    # concentrates, so the mean agrees within 3% and the max within 10%.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 12, 12, generator=g)
    x = torch.randn(2, 3, 12, 12, generator=g)
    subject = Subject(Linear2(w), labels=["a", "b"], mean=(0, 0, 0), std=(1, 1, 1), input_size=(12, 12))
    exp = sk.explain(subject, x, "gradxinput", target=0)
    r = 0.1
    ev = evaluate(subject, x, exp, metrics=["avg_sensitivity", "max_sensitivity"], target=0, random_baseline=False,
                  params={"avg_sensitivity": {"radius": r, "n_samples": 200},
                          "max_sensitivity": {"radius": r, "n_samples": 200}})

    def explain_func(model, inputs, targets, **kw):
        return sk.explain(subject, torch.as_tensor(inputs), "gradxinput",
                          target=[int(t) for t in targets]).maps[:, None].numpy()

    y = np.zeros(2, dtype=int)
    a = exp.maps[:, None].numpy()
    kwargs = dict(model=subject.model, x_batch=x.numpy(), y_batch=y, a_batch=a, device="cpu",
                  explain_func=explain_func)
    np.random.seed(0)
    q_avg = np.array(quantus.AvgSensitivity(nr_samples=200, lower_bound=r, disable_warnings=True)(**kwargs))
    q_max = np.array(quantus.MaxSensitivity(nr_samples=200, lower_bound=r, disable_warnings=True)(**kwargs))
    np.testing.assert_allclose(ev["avg_sensitivity"]["gradxinput"].scores.numpy(), q_avg, rtol=0.03)
    np.testing.assert_allclose(ev["max_sensitivity"]["gradxinput"].scores.numpy(), q_max, rtol=0.10)


def test_pointing_game_agrees_with_quantus_at_zero_tolerance(tiny_batch):
    # Quantus's pointing game asks whether the map's maximum lies inside the mask (no 15-px
    # tolerance): our metric with a vanishing tolerance is that same question. Exact.
    subject, x, _, y = tiny_batch
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(3, 32, 32, generator=g)
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[:, 8:24, 4:20] = True
    maps[0, 10, 10] = 2.0   # inside
    maps[1, 30, 30] = 2.0   # outside
    ev = evaluate(subject, x, _exp(maps), metrics=["pointing_game"], masks=masks, random_baseline=False,
                  params={"pointing_game": {"tolerance": 1e-9}})
    theirs = quantus.PointingGame(disable_warnings=True)(
        model=subject.model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps[:, None].numpy(),
        s_batch=masks[:, None].numpy().astype(float), device="cpu")
    np.testing.assert_array_equal(ev["pointing_game"]["m"].scores.numpy(), np.array(theirs, dtype=float))
    assert ev["pointing_game"]["m"].scores[:2].tolist() == [1.0, 0.0]


def test_sparseness_and_complexity_agree_with_quantus(tiny_batch):
    # Same Gini formula on |S| (Quantus adds 1e-7 to every value first: relative 1e-5); same
    # entropy of |S| / sum |S| (Quantus computes it in float32: relative 1e-6).
    subject, x, maps, y = tiny_batch
    signed = maps - 0.3
    ev = evaluate(subject, x, _exp(signed), metrics=["sparseness", "complexity"], random_baseline=False)
    kwargs = dict(model=subject.model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=signed[:, None].numpy(),
                  device="cpu")
    q_sp = quantus.Sparseness(abs=True, normalise=False, disable_warnings=True)(**kwargs)
    q_cx = quantus.Complexity(abs=True, normalise=False, disable_warnings=True)(**kwargs)
    np.testing.assert_allclose(ev["sparseness"]["m"].scores.numpy(), q_sp, rtol=1e-5)
    np.testing.assert_allclose(ev["complexity"]["m"].scores.numpy(), q_cx, rtol=1e-6)


def test_road_imputation_equals_quantus_noisy_linear_imputation():
    # Quantus's ROAD builds the same 8-neighbour system; with noise 0 the solutions agree to solver
    # precision, border pixels included. (Quantus's ROAD *metric* ranks the C*H*W elements of a
    # channel-broadcast map but imputes by H*W pixel index, which fails on RGB inputs, and reports
    # accuracy; we remove a fraction p of the pixels and report probability with accuracy in
    # extras, so only the imputation is compared.)
    from quantus.functions.perturb_func import noisy_linear_imputation

    from saliencykit.metrics.road import noisy_linear_impute

    rng = np.random.default_rng(0)
    img = rng.random((3, 20, 20))
    removed = rng.random((20, 20)) < 0.5
    theirs = noisy_linear_imputation(img.copy(), np.flatnonzero(removed), noise=0.0)
    ours = noisy_linear_impute(img, removed, noise=0.0)
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
