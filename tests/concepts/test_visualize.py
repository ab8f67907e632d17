"""Feature visualisation: the objective rises (class logit, channel, concept), MACO's image keeps
its fixed magnitude spectrum, seeds repeat, the model is left as found, passes are counted, and
bad targets are refused."""
import pytest
import torch

import saliencykit as sk
from saliencykit import SaliencyError
from saliencykit.concepts import ConceptBank
from saliencykit.concepts.visualize import one_over_f, photo_spectrum
from state import assert_same_state


@pytest.mark.parametrize("method", ["class_model", "maco"])
def test_class_score_rises_and_repeats(tiny, method):
    before = tiny.state_fingerprint()
    kw = {"crops": 2} if method == "maco" else {}
    res = sk.concepts.visualize(tiny, sk.Class(3), method=method, steps=20, seed=1, **kw)
    assert_same_state(before, tiny.state_fingerprint())
    # gradient ascent on a smooth ReLU net from the same start: the logit of the final clean image is
    # above the first one's (strictly; it rises by several units in 20 steps on this model)
    assert res.score_end > res.score_start
    assert res.input.shape == (1, 3, 32, 32)
    assert res.image.size == (32, 32)
    rows = res.params.get("crops", 1)
    assert res.passes["forward"] == 20 * rows + 2 and res.passes["backward"] == 20 * rows
    again = sk.concepts.visualize(tiny, sk.Class(3), method=method, steps=20, seed=1, **kw)
    assert torch.equal(again.input, res.input) and again.trace == res.trace
    other = sk.concepts.visualize(tiny, sk.Class(3), method=method, steps=20, seed=2, **kw)
    assert not torch.equal(other.input, res.input)


def test_class_model_objective_includes_the_penalty(tiny):
    # with a big l2 and a zero start the penalty dominates: the objective traced is S - l2 |x|^2,
    # and it rises step over step at the start (Adam's first steps all go uphill on this model)
    res = sk.concepts.visualize(tiny, sk.Class(0), method="class_model", steps=15, init_std=0.0, l2=1e-2, seed=0)
    x = res.input
    with torch.no_grad():
        s = tiny.model(x)[0, 0]
    assert res.trace[-1] > res.trace[0]
    # the last traced value was taken one Adam step before the final input: the final objective is close to it
    assert abs(float(s - 1e-2 * (x ** 2).sum()) - res.trace[-1]) < 0.5 * abs(res.trace[-1] - res.trace[0])


def test_channel_and_concept_targets(tiny):
    ch = sk.concepts.visualize(tiny, ("act2", 5), method="maco", steps=15, seed=0)
    assert ch.score_end > ch.score_start
    assert ch.target == "channel 5 of act2"
    # the score reported is the channel's mean activation: read it again with a capture
    with torch.no_grad(), tiny.capture(["act2"]) as cap:
        tiny.model(ch.input)
    assert torch.allclose(cap.get("act2")[0, 5].mean(), torch.tensor(ch.score_end), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    bank = ConceptBank(basis=torch.rand(3, 16, generator=g), layer="act2")
    co = sk.concepts.visualize(tiny, sk.Concept(bank, 1), method="class_model", steps=15, seed=0)
    assert co.score_end > co.score_start


def test_maco_keeps_the_magnitude_spectrum(tiny):
    res = sk.concepts.visualize(tiny, sk.Class(1), method="maco", steps=10, seed=0)
    mean = torch.tensor(tiny.mean).view(3, 1, 1)
    std = torch.tensor(tiny.std).view(3, 1, 1)
    pixels = res.input[0] * std + mean                                   # unclamped pixels
    got = torch.fft.rfft2(pixels.double()).abs()
    want = photo_spectrum((32, 32)).double()
    # irfft2 makes the columns 0 and W/2 of the half spectrum Hermitian; every other frequency keeps
    # its magnitude, scaled by one factor per channel (the affine map to pixels), the zero one aside
    inner = slice(1, 16)
    ratio = got[:, :, inner] / want[:, :, inner]
    per_channel = ratio.reshape(3, -1).median(1).values.view(3, 1, 1)
    assert torch.allclose(ratio, per_channel.expand_as(ratio), rtol=1e-4)
    a = res.alpha
    assert a.shape == (32, 32) and float(a.max()) == pytest.approx(1.0) and float(a.min()) >= 0
    assert res.image_with_alpha().mode == "RGBA"


def test_spectra():
    p = photo_spectrum((16, 16))
    f = one_over_f((16, 16))
    assert p.shape == f.shape == (3, 16, 9)
    # natural photos fall off with frequency like 1/f: the lowest non-zero frequency holds more than the highest
    assert (p[:, 1, 1] > p[:, 8, 8]).all() and f[0, 0, 1] == 1.0 and f[0, 0, 8] == pytest.approx(1 / 8)


def test_bad_targets(tiny):
    with pytest.raises(SaliencyError, match="one given class"):
        sk.concepts.visualize(tiny, sk.Class(), steps=2)
    with pytest.raises(SaliencyError, match="out of range|not in"):
        sk.concepts.visualize(tiny, sk.Class(9), steps=2)
    with pytest.raises(SaliencyError, match="channel 99"):
        sk.concepts.visualize(tiny, ("act2", 99), steps=2)
    with pytest.raises(SaliencyError, match="not found"):
        sk.concepts.visualize(tiny, ("nolayer", 0), steps=2)
    with pytest.raises(SaliencyError, match="cannot visualise"):
        sk.concepts.visualize(tiny, "cat", steps=2)
    with pytest.raises(SaliencyError, match="unknown visualisation method"):
        sk.concepts.visualize(tiny, sk.Class(0), method="deepdream", steps=2)
