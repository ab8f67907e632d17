"""Inputs of any layout: series [B,C,T], volumes [B,C,D,H,W], clips [B,T,C,H,W], flat [B,F].

Checked: the layout is declared or inferred (and refused when it cannot be told or does not match
the input), the maps keep the input's axes without the channel axis and the attributions its
shape, the methods that cannot apply refuse naming the layout, and the numbers agree with Captum
on a tiny 1-D CNN and a tiny 3-D CNN (saliency, IG, occlusion). Float64 models, so agreement is at
float64 rounding unless said otherwise.
"""
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit.errors import SaliencyError


def series_cnn(channels=2, classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(channels, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 5, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(5, classes)).double().eval()


def volume_cnn(classes=3):
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, classes)).double().eval()


def flat_mlp(features=6, classes=3):
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, classes)).double().eval()


class ClipNet(nn.Module):
    """[B,T,C,H,W] clips: a frame CNN averaged over time."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        b, t = x.shape[:2]
        f = torch.relu(self.conv(x.flatten(0, 1))).mean((2, 3)).view(b, t, -1).mean(1)
        return self.fc(f)


@pytest.fixture
def series():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 2, 24, generator=g, dtype=torch.float64)


@pytest.fixture
def volume():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 6, 8, 8, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("method", ["saliency", "gradxinput", "integrated_gradients", "smoothgrad", "vargrad",
                                    "guided_backprop", "occlusion", "rise", "gradcam", "layercam"])
def test_series_and_volume_maps_keep_the_input_axes(series, volume, method):
    kw = {"integrated_gradients": {"steps": 4}, "smoothgrad": {"samples": 2}, "vargrad": {"samples": 2},
          "occlusion": {"patch": 3, "stride": 2}, "rise": {"n_masks": 16, "cell": 3}}.get(method, {})
    for layout, model, x in (("BCT", series_cnn(), series), ("BCDHW", volume_cnn(), volume)):
        e = sk.explain(sk.Subject(model, layout=layout), x, method, **kw)
        assert e.layout == layout
        assert tuple(e.maps.shape) == (x.shape[0], *x.shape[2:])          # the channel axis dropped
        if e.attributions is not None:
            assert e.attributions.shape == x.shape
        assert torch.isfinite(e.maps).all() and e.maps.abs().sum() > 0


def test_layout_inferred_from_the_axes(series):
    # a 3-D input that is not an unbatched image of the subject's size is a series; a 2-D one flat
    e = sk.explain(sk.Subject(series_cnn()), series, "saliency")
    assert e.layout == "BCT" and e.maps.shape == (2, 24)
    e = sk.explain(sk.Subject(flat_mlp()), torch.randn(4, 6, dtype=torch.float64), "saliency")
    assert e.layout == "BF" and e.maps.shape == (4, 6)


def test_flat_features_and_a_single_vector():
    # [F] is a batch of one; the map is the attribution itself (no channel axis to reduce);
    # IG completeness holds at float64 with enough steps (smooth tanh model)
    s = sk.Subject(flat_mlp(), layout="BF")
    x = torch.randn(6, dtype=torch.float64)
    e = sk.explain(s, x, "integrated_gradients", steps=64)
    assert e.maps.shape == (1, 6) and e.attributions.shape == (1, 6)
    assert torch.allclose(e.maps.double(), e.attributions.double())
    assert e.extras["relative_completeness_error"][0] < 1e-6


def test_scalar_output_is_explained_as_that_score():
    # a model returning [B] (one score per example): saliency is the gradient of that score
    model = nn.Sequential(nn.Linear(5, 1), nn.Flatten(0)).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    e = sk.explain(sk.Subject(model), x, "saliency", reduce="sum")
    assert torch.allclose(e.maps.double(), model[0].weight.expand(3, 5).float().double(), atol=1e-6)


def test_clips_reduce_their_own_channel_axis():
    # BTCHW: the channel axis is 2, so maps are [B,T,H,W]; images are normalised frame by frame,
    # so the black baseline is the normalised black in every frame
    s = sk.Subject(ClipNet(), layout="BTCHW", input_size=(8, 8))
    x = torch.randn(2, 4, 3, 8, 8)
    e = sk.explain(s, x, "gradxinput")
    assert e.maps.shape == (2, 4, 8, 8) and e.attributions.shape == x.shape
    assert torch.allclose(e.maps, e.attributions.sum(2))
    black = s.black(x)
    assert torch.allclose(black[:, :, 0], torch.full_like(black[:, :, 0], -sk.subject.IMAGENET_MEAN[0] / sk.subject.IMAGENET_STD[0]))


def test_two_d_path_unchanged_by_a_declared_layout():
    # declaring BCHW explicitly gives the same maps as not declaring it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x = torch.randn(2, 3, 16, 16)
    for method in ("saliency", "gradcam", "occlusion"):
        a = sk.explain(sk.Subject(model, input_size=(16, 16)), x, method)
        b = sk.explain(sk.Subject(model, input_size=(16, 16), layout="BCHW"), x, method)
        assert torch.equal(a.maps, b.maps) and a.layout == b.layout == "BCHW"


def test_saved_explanation_keeps_its_layout(series, tmp_path):
    e = sk.explain(sk.Subject(series_cnn(), layout="BCT"), series, "saliency")
    back = sk.Explanation.load(e.save(tmp_path / "e"))
    assert back.layout == "BCT" and torch.equal(back.maps, e.maps)


def test_series_time_segments_for_lime_and_kernelshap(series):
    # equal-length time segments: the map is constant on each of the 4 segments of 6 steps, and
    # KernelSHAP (exact: 2^4 - 2 coalitions <= n_samples) sums to s(x) - s(baseline)
    s = sk.Subject(series_cnn(), layout="BCT")
    for method in ("lime", "kernelshap"):
        e = sk.explain(s, series, method, n_segments=4, n_samples=64)
        segs = e.maps.view(2, 4, 6)
        assert torch.allclose(segs, segs[:, :, :1].expand_as(segs))
    e = sk.explain(s, series, "kernelshap", n_segments=4, n_samples=64, output="logit")
    model = s.model
    with torch.no_grad():
        out = model(series)
        c = out.argmax(1)
        diff = out.gather(1, c.view(-1, 1))[:, 0] - model(torch.zeros_like(series)).gather(1, c.view(-1, 1))[:, 0]
    assert torch.allclose(e.maps.view(2, 4, 6)[:, :, 0].sum(1).double(), diff, atol=1e-5)


# ------------------------------------------------------------------------------ Captum
def test_series_agrees_with_captum(series):
    # saliency: |grad| max over channels (Captum's abs=True, channel max taken here); IG: the same
    # Gauss-Legendre rule and baseline 0 -> float64 rounding; occlusion: windows of 5 every 2
    # steps over all channels, mean drop per step, clipped last window -> float64 rounding
    from captum.attr import IntegratedGradients, Occlusion, Saliency

    model = series_cnn()
    s = sk.Subject(model, layout="BCT")
    e = sk.explain(s, series, "saliency", target=1)
    ref = Saliency(model).attribute(series.clone().requires_grad_(True), target=1, abs=True)
    assert torch.allclose(e.maps.double(), ref.amax(1), atol=1e-6)
    e = sk.explain(s, series, "integrated_gradients", target=1, steps=32, baseline=torch.zeros(1))
    ref = IntegratedGradients(model).attribute(series, baselines=0.0, target=1, n_steps=32, method="gausslegendre")
    assert torch.allclose(e.attributions.double(), ref, atol=1e-6, rtol=1e-5)
    e = sk.explain(s, series, "occlusion", target=1, patch=5, stride=2, baseline=torch.zeros(1))
    ref = Occlusion(model).attribute(series, sliding_window_shapes=(2, 5), strides=(2, 2), baselines=0, target=1)
    assert torch.allclose(e.maps.double(), ref[:, 0].double(), atol=1e-6, rtol=1e-5)


def test_volume_agrees_with_captum(volume):
    # the same three comparisons on cubes of 3 every 2 voxels (float32 Explanation maps: atol 1e-6)
    from captum.attr import IntegratedGradients, Occlusion, Saliency

    model = volume_cnn()
    s = sk.Subject(model, layout="BCDHW")
    e = sk.explain(s, volume, "saliency", target=2)
    ref = Saliency(model).attribute(volume.clone().requires_grad_(True), target=2, abs=True)
    assert torch.allclose(e.maps.double(), ref[:, 0], atol=1e-6)
    e = sk.explain(s, volume, "integrated_gradients", target=2, steps=16, baseline=torch.zeros(1))
    ref = IntegratedGradients(model).attribute(volume, baselines=0.0, target=2, n_steps=16, method="gausslegendre")
    assert torch.allclose(e.attributions.double(), ref, atol=1e-6, rtol=1e-5)
    e = sk.explain(s, volume, "occlusion", target=2, patch=3, stride=2, baseline=torch.zeros(1))
    ref = Occlusion(model).attribute(volume, sliding_window_shapes=(1, 3, 3, 3), strides=(1, 2, 2, 2), baselines=0,
                                     target=2)
    assert torch.allclose(e.maps.double(), ref[:, 0].double(), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------ bad input
def test_layout_mismatch_and_ambiguity_are_refused(series, volume):
    with pytest.raises(SaliencyError, match="layout is BCT .3 axes. but the input has 4"):
        sk.explain(sk.Subject(series_cnn(), layout="BCT"), series.unsqueeze(0), "saliency")
    with pytest.raises(SaliencyError, match="volume .B,C,D,H,W. or a clip"):
        sk.explain(sk.Subject(volume_cnn()), torch.randn(1, 4, 4, 4, 4, dtype=torch.float64), "saliency")
    with pytest.raises(SaliencyError, match="unknown layout 'BHWC'"):
        sk.Subject(series_cnn(), layout="BHWC")


def test_methods_that_cannot_apply_refuse_naming_the_layout(series):
    s = sk.Subject(series_cnn(), layout="BCT")
    # each refusal says why the method cannot read the layout (Method.not_for)
    for method, why in (("xrai", "needs image segments"), ("meaningful_perturbation", "28x28 mask"),
                        ("extremal_perturbation", "height and width"), ("legrad", "patch tokens"),
                        ("attention_rollout", "patch tokens")):
        with pytest.raises(SaliencyError, match=f"{method}.* cannot explain a BCT input.*{why}.*for BCT use .*saliency"):
            sk.explain(s, series, method)
    with pytest.raises(SaliencyError, match="xrai.* cannot explain a BF input.*for BF use .*occlusion"):
        sk.explain(sk.Subject(flat_mlp(), layout="BF"), torch.randn(2, 6, dtype=torch.float64), "xrai")
    with pytest.raises(SaliencyError, match="'blur' baseline blurs an image"):
        sk.explain(s, series, "integrated_gradients", baseline="blur")


def test_series_shorter_than_the_window(series):
    s = sk.Subject(series_cnn(), layout="BCT")
    with pytest.raises(SaliencyError, match="series .24,. is shorter than the occlusion window .30,."):
        sk.explain(s, series, "occlusion", patch=30)
    with pytest.raises(SaliencyError, match="24 steps, too few for 30 time segments"):
        sk.explain(s, series, "lime", n_segments=30)
    with pytest.raises(SaliencyError, match="rise cell grid 30 is finer"):
        sk.explain(s, series, "rise", cell=30, n_masks=4)


def test_words_read_a_series_and_overlay_refuses_it(series):
    # the verbalisation reads series (tests/present/test_verbalize_layouts.py checks its sentences);
    # an overlay over a photo gets a clear refusal, not a shape error
    s = sk.Subject(series_cnn(), layout="BCT")
    e = sk.explain(s, series, "saliency")
    assert sk.verbalize(s, series, e).facts["layout"] == "BCT"
    with pytest.raises(SaliencyError, match="overlay draws a map over a photo.*BCT"):
        e.overlay(None)
