"""Causal effect maps on the shipped denoiser (receptive field 7x7) and on tiny known models."""
import numpy as np
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit.benchmarks.denoise import SIGMA, crops, evaluate
from saliencykit.errors import SaliencyError
from saliencykit.models.small import DENOISER_RF
from saliencykit.tasks.restoration import causal_effect


@pytest.fixture(scope="module")
def denoiser():
    return sk.load_model("denoiser")


@pytest.fixture(scope="module")
def noisy():
    clean = crops(("coffee",), 2, seed=5, size=48)
    return clean, clean + SIGMA * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))


def test_shipped_denoiser_denoises_an_unseen_photo(denoiser):
    facts = evaluate(denoiser.model, n=32)
    # Gaussian noise of sigma 0.1 is 20 dB; the trained model removes a good part of it
    assert facts["heldout_psnr_noisy"] == pytest.approx(20.0, abs=0.3)
    assert facts["heldout_psnr_denoised"] > facts["heldout_psnr_noisy"] + 4
    assert denoiser.info["receptive_field"] == 2 * DENOISER_RF + 1 == 7


@pytest.mark.parametrize("intervention,box", [("mean", (20, 26, 20, 26)), ("blur", (0, 3, 41, 48)),
                                              ("noise", (10, 11, 30, 31)), ("zero", (33, 48, 5, 9))])
def test_effect_lives_exactly_in_the_receptive_field(denoiser, noisy, intervention, box):
    x = noisy[1]
    y0, y1, x0, x1 = box
    mask = torch.zeros(48, 48, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    patch = 4
    ce = causal_effect(denoiser, x, mask, patch=patch, intervention=intervention)
    # input pixels that can reach the region: the region dilated by the receptive-field radius
    reach = torch.nn.functional.max_pool2d(mask.float()[None, None], 2 * DENOISER_RF + 1, 1, DENOISER_RF)[0, 0] > 0
    cells_reaching = torch.nn.functional.max_pool2d(reach.float()[None, None], patch, patch)[0, 0] > 0
    for b in range(x.shape[0]):
        # exactly zero outside: an input region the output region cannot see changes nothing in it
        assert (ce.effect[b][~cells_reaching] == 0).all()
        # and not zero where the region itself lies (its own pixels are changed)
        own = torch.nn.functional.max_pool2d(mask.float()[None, None], patch, patch)[0, 0] > 0
        assert (ce.effect[b][own] != 0).all()


def test_effect_is_the_score_change_of_each_intervention(denoiser, noisy):
    """The definition, recomputed by hand for two regions: S(f(x)) - S(f(x with the region set to
    its mean colour)), S = mean output over the region; float32, so up to summation order."""
    x = noisy[1][:1]
    mask = torch.zeros(48, 48, dtype=torch.bool)
    mask[16:24, 16:32] = True
    ce = causal_effect(denoiser, x, mask, patch=8, intervention="mean")
    with torch.inference_mode():
        clean = denoiser.model(x)[0][:, mask].mean()
        for gy, gx in [(2, 2), (1, 3)]:
            xd = x.clone()
            cell = xd[0, :, 8 * gy:8 * gy + 8, 8 * gx:8 * gx + 8]
            cell[:] = cell.mean((1, 2), keepdim=True)
            want = clean - denoiser.model(xd)[0][:, mask].mean()
            assert ce.effect[0, gy, gx].item() == pytest.approx(want.item(), abs=1e-6)
    assert ce.clean_score[0].item() == pytest.approx(clean.item(), abs=1e-6)


def test_sign_split_and_reference_mode(denoiser, noisy):
    clean, x = noisy
    mask = torch.zeros(48, 48, dtype=torch.bool)
    mask[20:28, 20:28] = True
    ce = causal_effect(denoiser, x, mask, patch=8, intervention="zero", reference=clean)
    # the split: both parts >= 0, never both non-zero, and positive - negative is the signed map
    assert (ce.positive >= 0).all() and (ce.negative >= 0).all()
    assert ((ce.positive > 0) & (ce.negative > 0)).sum() == 0
    assert torch.equal(ce.positive - ce.negative, ce.maps)
    assert torch.allclose(ce.positive.sum((1, 2)) - ce.negative.sum((1, 2)), ce.maps.sum((1, 2)))
    # with a clean reference the score is minus the error in the region: blanking the region's own
    # pixels ruins its restoration, a strongly positive effect (it helps restore itself)
    assert (ce.effect[:, 2:4, 2:4] > 0).all()
    assert ce.maps.shape == (2, 48, 48) and ce.passes["forward"] == 36 + 1
    pic = ce.overlay((255 * x[0].permute(1, 2, 0).clamp(0, 1)).numpy().astype(np.uint8))
    arr = np.asarray(pic)
    assert arr.shape == (48, 48, 3) and arr[22, 22, 0] > arr[22, 22, 2]     # positive: red


def test_seeded_noise_and_model_left_as_found(denoiser, noisy):
    x = noisy[1]
    mask = torch.zeros(48, 48, dtype=torch.bool)
    mask[8:16, 8:16] = True
    model = denoiser.model
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    try:
        a = causal_effect(denoiser, x, mask, patch=8, intervention="noise", seed=3)
        b = causal_effect(model, x, mask, patch=8, intervention="noise", seed=3)
        c = causal_effect(model, x, mask, patch=8, intervention="noise", seed=4)
        assert model.training                                   # restored to what it was
        assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()
    assert torch.equal(a.effect, b.effect) and a.seed == 3
    assert not torch.equal(a.effect, c.effect)


def test_bad_input(denoiser, noisy):
    x = noisy[1]
    good = torch.zeros(48, 48, dtype=torch.bool)
    good[0, 0] = True
    with pytest.raises(SaliencyError, match="output's size"):
        causal_effect(denoiser, x, torch.ones(32, 32, dtype=torch.bool))
    with pytest.raises(SaliencyError, match="no output pixel"):
        causal_effect(denoiser, x, torch.zeros(48, 48, dtype=torch.bool))
    with pytest.raises(SaliencyError, match="unknown intervention"):
        causal_effect(denoiser, x, good, intervention="inpaint")
    with pytest.raises(SaliencyError, match="out_mask must be"):
        causal_effect(denoiser, x, torch.ones(3, 48, 48, dtype=torch.bool))
    classifier = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(SaliencyError, match=r"\[B,C,H,W\]"):
        causal_effect(classifier, x, good)


def test_zero_intervention_is_occlusion_of_an_output_region(denoiser, noisy):
    # the same intervention two ways: causal_effect(zero) scores the mean over the region and its 3
    # channels; occlusion on sk.OutputRegion(reduce="mean") the channel sum of the pixel mean, with
    # non-overlapping 8 px windows of zeros: equal up to the factor 3 (float32 noise only)
    _, x = noisy
    mask = torch.zeros(48, 48, dtype=torch.bool)
    mask[20:26, 20:26] = True
    region = sk.OutputRegion(mask, reduce="mean")
    ce = causal_effect(denoiser, x, region, patch=8, intervention="zero")      # the target is accepted as the mask
    occ = sk.explain(denoiser, x, "occlusion", target=region,
                     params={"occlusion": {"patch": 8, "stride": 8, "baseline": "zero"}})
    assert torch.allclose(ce.maps, occ.maps / 3, atol=1e-6)
    assert ce.maps.abs().max() > 0.1


def test_params_of_no_method_are_refused():
    # params is per method: settings given at its top level used to be dropped without a word
    net = nn.Conv2d(3, 3, 1)
    with pytest.raises(SaliencyError, match="params is per method"):
        sk.explain(sk.Subject(net, mean=(0, 0, 0), std=(1, 1, 1)), torch.rand(1, 3, 16, 16), "occlusion",
                   target=sk.OutputRegion(torch.ones(16, 16, dtype=torch.bool)), params={"patch": 8})
