"""More methods on more layouts: occlusion and RISE on feature vectors [B,F] and clips [B,T,C,H,W];
the gradient CAMs, CAM and Eigen-CAM on clips; Score-CAM on series, volumes and clips; Smooth
Grad-CAM++ on series and volumes; Blur IG and Guided IG on series, volumes (and clips for Blur IG,
every layout for Guided IG); LRP on every layout; LIME and KernelSHAP on volumes (supervoxels) and feature
vectors.

Checked against Captum (FeatureAblation and Occlusion: the same windows, the same mean drop per
position) and against the definitions written out by hand on the same seeded masks (RISE). The
models are float64, so the agreement is at float64 rounding of the float32 maps (atol 1e-6)
unless said otherwise.
"""
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit.errors import SaliencyError


def flat_mlp(features=6, classes=3):
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, classes)).double().eval()


class Clip3d(nn.Module):
    """[B,T,C,H,W] clips read by a 3-D convolution over (T,H,W): its output is [B,C',T/2,H/2,W/2]."""

    def __init__(self, classes=3):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv3d(3, 4, 3, padding=1, stride=2)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        a = torch.relu(self.conv(x.permute(0, 2, 1, 3, 4)))
        return self.fc(a.mean((2, 3, 4)))


@pytest.fixture
def features():
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture
def clip():
    return torch.randn(2, 4, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


class FrameNet(nn.Module):
    """[B,T,C,H,W] clips read frame by frame: the conv's output is [B*T,C',H,W]."""

    def __init__(self, classes=3):
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        b, t = x.shape[:2]
        f = torch.relu(self.conv(x.flatten(0, 1))).mean((2, 3)).view(b, t, -1).mean(1)
        return self.fc(f)


def clip_subject(model=None):
    return sk.Subject((model or Clip3d()).double().eval(), layout="BTCHW", input_size=(6, 6))


# ------------------------------------------------------------------------------ occlusion
def test_feature_occlusion_is_captum_feature_ablation(features):
    # the BF defaults (patch 1, stride 1) ablate one feature at a time: s(x) - s(x with x_i = 0),
    # Captum's FeatureAblation with its default one-feature groups
    from captum.attr import FeatureAblation, Occlusion

    model = flat_mlp()
    s = sk.Subject(model, layout="BF")
    e = sk.explain(s, features, "occlusion", target=1, baseline=torch.zeros(1))
    ref = FeatureAblation(model).attribute(features, baselines=0.0, target=1)
    assert e.maps.shape == (3, 6) and e.extras["patch"] == 1 and e.extras["windows"] == 6
    assert torch.allclose(e.maps.double(), ref, atol=1e-6)
    # windows of 3 features every 2 (the last one clipped): Captum's Occlusion on the same windows
    e = sk.explain(s, features, "occlusion", target=1, patch=3, stride=2, baseline=torch.zeros(1))
    ref = Occlusion(model).attribute(features, sliding_window_shapes=(3,), strides=(2,), baselines=0, target=1)
    assert torch.allclose(e.maps.double(), ref.double(), atol=1e-6)


def test_clip_occlusion_is_captum_occlusion_over_all_channels(clip):
    # cubes of 2 frames x 3 x 3 pixels every (1, 2, 2), each covering the 3 channels: Captum's
    # Occlusion with the channel axis inside the window; its map repeats over the channels
    from captum.attr import Occlusion

    s = clip_subject()
    e = sk.explain(s, clip, "occlusion", target=2, patch=(2, 3, 3), stride=(1, 2, 2), baseline=torch.zeros(1))
    ref = Occlusion(s.model).attribute(clip, sliding_window_shapes=(2, 3, 3, 3), strides=(1, 3, 2, 2),
                                       baselines=0, target=2)
    assert e.maps.shape == (2, 4, 6, 6) and e.layout == "BTCHW"
    assert torch.allclose(e.maps.double(), ref[:, :, 0].double(), atol=1e-6)


def test_occlusion_window_too_large_names_the_layout(features, clip):
    with pytest.raises(SaliencyError, match=r"feature vector \(6,\) is shorter than the occlusion window \(7,\)"):
        sk.explain(sk.Subject(flat_mlp(), layout="BF"), features, "occlusion", patch=7)
    with pytest.raises(SaliencyError, match=r"clip \(4, 6, 6\) is shorter than the occlusion window \(5, 2, 2\)"):
        sk.explain(clip_subject(), clip, "occlusion", patch=(5, 2, 2))


# ------------------------------------------------------------------------------ RISE
def _rise_by_hand(model, x, masks, p, target):
    """S = sum_i softmax(f(x * M_i))_target M_i / (N p): the definition, on the given masks."""
    with torch.no_grad():
        acc = 0
        for m in masks:
            prob = model(x * m).softmax(1)[torch.arange(len(x)), target]
            acc = acc + prob.view(-1, *[1] * (m.dim() - 1)) * m
    return acc / (len(masks) * p)


def test_feature_rise_is_its_definition(features):
    # on features the masks are independent Bernoulli(p) draws per feature (no smoothing: features
    # have no neighbours); the map is the RISE sum on exactly those masks
    from saliencykit.methods.along_axes import RiseMasks

    model = flat_mlp()
    e = sk.explain(sk.Subject(model, layout="BF"), features, "rise", target=1, n_masks=40, p=0.4, seed=5)
    masks = RiseMasks(40, None, 0.4, (6,), seed=5)(torch.arange(40))[:, 0]           # [N, F]
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    ref = _rise_by_hand(model, features, [m.view(1, 6).double() for m in masks], 0.4, 1)
    assert e.maps.shape == (3, 6)
    assert torch.allclose(e.maps.double(), ref, atol=1e-6)


def test_clip_rise_masks_cover_every_channel(clip):
    # clip masks are smooth over (T, H, W) with cells (4, 3, 3) (the default 7 capped at the 4
    # frames, cell=3 asked for H and W) and repeat over the channel axis (axis 2)
    from saliencykit.methods.along_axes import RiseMasks

    s = clip_subject()
    e = sk.explain(s, clip, "rise", target=0, n_masks=24, cell=(4, 3, 3), seed=2)
    masks = RiseMasks(24, (4, 3, 3), 0.5, (4, 6, 6), seed=2)(torch.arange(24))[:, 0]   # [N, T, H, W]
    ref = _rise_by_hand(s.model, clip, [m.view(1, 4, 1, 6, 6).double() for m in masks], 0.5, 0)
    assert e.maps.shape == (2, 4, 6, 6)
    assert torch.allclose(e.maps.double(), ref[:, :, 0], atol=1e-6)
    # the default grid is 7 per axis, at most each axis' length: 4 frames -> 4 cells
    d = sk.explain(s, clip, "rise", target=0, n_masks=8, seed=2)
    assert d.maps.shape == (2, 4, 6, 6) and d.extras["cell"] == (4, 6, 6)
    with pytest.raises(SaliencyError, match=r"rise cell grid 5 is finer than the clip \(4, 6, 6\)"):
        sk.explain(s, clip, "rise", cell=5, n_masks=4)


# ------------------------------------------------------------------------------ CAMs of clips
def _layer_and_grad(model, x, target, per_frame):
    """The conv's output A and dS/dA, written out: [B,C',T',h,w] (frame outputs stacked on T)."""
    store = {}
    handle = model.conv.register_forward_hook(lambda m, i, o: store.update(a=o))
    try:
        score = model(x)[:, target].sum()
    finally:
        handle.remove()
    a = store["a"]
    (g,) = torch.autograd.grad(score, a)
    if per_frame:
        b, t = x.shape[:2]
        a, g = (v.reshape(b, t, *v.shape[1:]).transpose(1, 2) for v in (a, g))
    return a.detach(), g


@pytest.mark.parametrize("per_frame", [False, True])
def test_clip_gradcam_is_its_definition(clip, per_frame):
    # Grad-CAM = relu(sum_c mean_{t,h,w}(dS/dA_c) A_c), upsampled trilinearly (align_corners=False)
    # from the layer grid (2x3x3 for the 3-D conv, 4x3x3 frame by frame) to the clip's 4x6x6;
    # HiResCAM = relu(sum_c dS/dA_c * A_c). layer="auto" finds the conv in both models
    model = (FrameNet() if per_frame else Clip3d()).double().eval()
    s = clip_subject(model)
    a, g = _layer_and_grad(model, clip, 1, per_frame)
    e = sk.explain(s, clip, ["gradcam", "hirescam"], target=1)
    assert e["gradcam"].layer == "conv"
    for name, raw in (("gradcam", (g.mean((2, 3, 4), keepdim=True) * a).sum(1)), ("hirescam", (g * a).sum(1))):
        ref = torch.nn.functional.interpolate(raw.clamp_min(0).unsqueeze(1), size=(4, 6, 6), mode="trilinear",
                                              align_corners=False)[:, 0]
        assert e[name].maps.shape == (2, 4, 6, 6)
        assert e[name].raw.shape == raw.shape
        assert torch.allclose(e[name].maps.double(), ref, atol=1e-6)


def test_cams_refuse_a_flat_input_saying_why(features):
    with pytest.raises(SaliencyError, match=r"gradcam cannot explain a BF input .* \(a CAM weighs the channels of a "
                                            r"layer map.*for BF use .*occlusion"):
        sk.explain(sk.Subject(flat_mlp(), layout="BF"), features, "gradcam")


# ------------------------------------------------------------------------------ Score-CAM
def series_cnn(stride=1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 5, 3, padding=1, stride=stride),
                         nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(5, 3)).double().eval()


def volume_cnn(stride=1):
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 5, 3, padding=1, stride=stride),
                         nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(5, 3)).double().eval()


def _scorecam_by_hand(model, x, layer_module, target, size, mode, to_input=lambda m: m):
    """Score-CAM's paper weighting written out: w_k = p_t(x * H_k) - p_t(0), H_k the k-th channel
    of the layer upsampled to the input (linear / trilinear, align_corners=False) and min-max
    normalised; raw = relu(sum_k w_k A_k) at the layer's resolution."""
    store = {}
    handle = layer_module.register_forward_hook(lambda m, i, o: store.update(a=o.detach()))
    with torch.no_grad():
        try:
            model(x)
        finally:
            handle.remove()
        a = store["a"]
        base = model(torch.zeros_like(x)).softmax(1)[:, target]
        w = torch.zeros(a.shape[:2], dtype=torch.float64)
        for i in range(a.shape[0]):
            for k in range(a.shape[1]):
                up = torch.nn.functional.interpolate(a[i:i + 1, k:k + 1], size=size, mode=mode, align_corners=False)
                h = (up - up.min()) / (up.max() - up.min())
                w[i, k] = model(x[i:i + 1] * to_input(h)).softmax(1)[0, target] - base[i]
    return w, a, (w.view(*w.shape, *[1] * (a.dim() - 2)) * a).sum(1).clamp_min(0)


@pytest.mark.parametrize("kind", ["series", "volume", "clip"])
def test_scorecam_is_its_definition_on_every_axis_count(kind):
    # a stride-2 layer, so the channel masks are upsampled (linearly for the series, trilinearly
    # for the volume and the clip, whose masks repeat over its channel axis 2). The weights are
    # probabilities (<= 1) of float32 masked inputs against this float64 loop: atol 1e-6; the maps
    # carry that error times the activations: 1e-6 of max_k |A_k| summed over channels
    g = torch.Generator().manual_seed(7)
    if kind == "series":
        model, layout, x = series_cnn(stride=2), "BCT", torch.randn(2, 2, 12, generator=g, dtype=torch.float64)
        layer, size, mode, to_input = "2", (12,), "linear", lambda m: m
    elif kind == "volume":
        model, layout, x = volume_cnn(stride=2), "BCDHW", torch.randn(2, 1, 4, 6, 6, generator=g, dtype=torch.float64)
        layer, size, mode, to_input = "2", (4, 6, 6), "trilinear", lambda m: m
    else:
        model, layout, x = Clip3d().double().eval(), "BTCHW", torch.randn(2, 4, 3, 6, 6, generator=g, dtype=torch.float64)
        layer, size, mode, to_input = "conv", (4, 6, 6), "trilinear", lambda m: m.transpose(1, 2)
    w, a, raw = _scorecam_by_hand(model, x, model.get_submodule(layer), 1, size, mode, to_input)
    s = sk.Subject(model, layout=layout, input_size=(6, 6))
    e = sk.explain(s, x, "scorecam", layer=layer, target=1)
    assert torch.allclose(e.extras["channel_weights"].double(), w, atol=1e-6)
    tol = 1e-6 * float(a.abs().flatten(2).amax(2).sum(1).max())
    assert e.raw.shape == raw.shape and torch.allclose(e.raw.double(), raw, atol=tol)
    ref = torch.nn.functional.interpolate(raw.unsqueeze(1), size=size, mode=mode, align_corners=False)[:, 0]
    assert e.maps.shape == (2, *size) and torch.allclose(e.maps.double(), ref, atol=tol)


@pytest.mark.parametrize("layout", ["BCT", "BCDHW"])
def test_scorecam_agrees_with_torchcam(layout):
    # torchcam's ScoreCAM weighs channels by softmax_k(logit(x * H_k) - logit(x)) = our
    # 'channel_softmax' weighting; it normalises H_k before upsampling, we after, which is the same
    # map when the layer keeps the input's size (stride 1, as here); float32 activations: 1e-6
    from torchcam.methods import ScoreCAM

    g = torch.Generator().manual_seed(8)
    model, x, shape = ((series_cnn(), torch.randn(2, 2, 12, generator=g, dtype=torch.float64), (2, 12))
                       if layout == "BCT" else
                       (volume_cnn(), torch.randn(2, 1, 4, 6, 6, generator=g, dtype=torch.float64), (1, 4, 6, 6)))
    e = sk.explain(sk.Subject(model, layout=layout), x, "scorecam", layer="2", weighting="channel_softmax", target=1)
    with ScoreCAM(model, target_layer="2", input_shape=shape) as extractor:
        with torch.no_grad():
            model(x)
        cam = extractor(class_idx=1, normalized=False)[0]
    assert torch.allclose(e.raw.double(), cam.double(), atol=1e-6)


# ------------------------------------------------------------------------------ Blur IG, Guided IG
def smooth_series_cnn():
    """Float64 and softplus: smooth, so the path integrals converge without kinks."""
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.Softplus(), nn.Conv1d(4, 4, 3, padding=1, stride=2),
                         nn.Softplus(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()


def smooth_volume_cnn():
    torch.manual_seed(6)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Softplus(), nn.Conv3d(4, 4, 3, padding=1, stride=2),
                         nn.Softplus(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()


def smooth_case(kind):
    g = torch.Generator().manual_seed(9)
    if kind == "series":
        return sk.Subject(smooth_series_cnn(), layout="BCT"), torch.randn(2, 2, 32, generator=g, dtype=torch.float64)
    return sk.Subject(smooth_volume_cnn(), layout="BCDHW"), torch.randn(2, 1, 6, 8, 8, generator=g, dtype=torch.float64)


class SmoothFrames(nn.Module):
    """A softplus frame CNN with a linear read-out of each 6x6 frame's 3x3 feature map (so fine
    detail counts: blurring changes the score), averaged over time; smooth for path integrals."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(19)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.fc = nn.Linear(36, 3)

    def forward(self, x):
        b, t = x.shape[:2]
        f = nn.functional.softplus(self.conv(x.flatten(0, 1))).flatten(1).view(b, t, -1).mean(1)
        return self.fc(f)


def test_blur_along_one_and_three_axes_is_a_gaussian_convolution():
    # the banded products of filters.separable_axes equal a zero-padded convolution with the
    # normalised Gaussian along each axis (conv1d / conv3d with the outer-product kernel): float64
    # rounding, 1e-12
    from saliencykit.filters import gaussian_blur, gaussian_kernels

    k, _ = gaussian_kernels(1.5, 6, torch.float64)
    x = torch.randn(2, 3, 20, dtype=torch.float64)
    ref = torch.nn.functional.conv1d(x.reshape(6, 1, 20), k.view(1, 1, -1), padding=6).view(2, 3, 20)
    assert torch.allclose(gaussian_blur(x, 1.5, axes=1), ref, atol=1e-12)
    v = torch.randn(1, 2, 5, 7, 9, dtype=torch.float64)
    k3 = k.view(-1, 1, 1) * k.view(1, -1, 1) * k.view(1, 1, -1)
    ref = torch.nn.functional.conv3d(v.reshape(2, 1, 5, 7, 9), k3[None, None], padding=6).view(1, 2, 5, 7, 9)
    assert torch.allclose(gaussian_blur(v, 1.5, axes=3), ref, atol=1e-12)


@pytest.mark.parametrize("kind", ["series", "volume", "clip"])
def test_blur_ig_completeness_along_the_layout_axes(kind):
    # sum(attr) = s(x) - s(G_sigma x), G blurring along time (series) or depth, height and width
    # (volume) or height and width of every frame (clip: frames are not mixed in time); with a
    # finite-difference step of 1e-4 the path sum is within 0.07 % (series), 0.25 % (volume) and
    # 0.02 % (clip) here, the exact derivative as close: tolerance 1 %, as on images
    from saliencykit.filters import gaussian_blur

    if kind == "clip":
        s = clip_subject(SmoothFrames())
        x = torch.randn(2, 4, 3, 6, 6, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
        n = 2
    else:
        s, x = smooth_case(kind)
        n = 1 if kind == "series" else 3
    with torch.no_grad():
        delta = s.model(x)[:, 1] - s.model(gaussian_blur(x, 3.0, axes=n))[:, 1]
    for grad_step in (1e-4, None):
        e = sk.explain(s, x, "blur_ig", target=1, max_sigma=3.0, steps=40, grad_step=grad_step)
        assert e.attributions.shape == x.shape
        assert e.maps.shape == ((2, 4, 6, 6) if kind == "clip" else (2, *x.shape[2:]))
        total = e.attributions.double().reshape(2, -1).sum(1)
        assert ((total - delta).abs() / delta.abs()).max() < 0.01
        assert torch.allclose(torch.tensor(e.extras["completeness_error"]).double(), total - delta, atol=1e-5)


@pytest.mark.parametrize("kind", ["series", "volume"])
def test_blur_derivative_along_the_layout_axes(kind):
    # the exact d(G_sigma x)/d sigma (one term per axis) against a central difference of the blur
    # at the same truncation radius: O(h^2) ~ 1e-8 relative in float64
    from saliencykit.filters import gaussian_kernels, separable_axes
    from saliencykit.methods.paths import blur_derivative

    _, x = smooth_case(kind)
    n = 1 if kind == "series" else 3
    h, sigma = 1e-4, 1.3

    def blur(sig):
        k, _ = gaussian_kernels(sig, 6, x.dtype)
        return separable_axes(x, (k,) * n)

    central = (blur(sigma + h) - blur(sigma - h)) / (2 * h)
    torch.testing.assert_close(blur_derivative(x, sigma, None, n), central, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["series", "volume"])
def test_guided_ig_on_series_and_volumes(kind):
    # completeness along its adaptive path: sum(attr) -> s(x) - s(x') (left-Riemann-type sums,
    # measured 1.4 % (series) and 1.2 % (volume) at 120 steps: tolerance 3 %, as on images); max_dist = 0 is
    # the straight line, IG with the left Riemann rule (same arithmetic: float32 storage, 1e-6)
    from saliencykit.methods.base import Context
    from saliencykit.methods.paths import integrated_gradients
    from saliencykit.targets import Class

    s, x = smooth_case(kind)
    e = sk.explain(s, x, "guided_ig", target=2, steps=120, max_dist=0.1, baseline="zero")
    with torch.no_grad():
        delta = s.model(x)[:, 2] - s.model(torch.zeros_like(x))[:, 2]
    total = e.attributions.double().reshape(2, -1).sum(1)
    assert ((total - delta).abs() / delta.abs()).max() < 0.03
    e0 = sk.explain(s, x, "guided_ig", target=2, steps=12, max_dist=0.0, baseline="zero")
    with s.explaining():
        ctx = Context(s, x)
        ig = integrated_gradients(ctx, ctx.resolve(Class(2)), x, torch.zeros_like(x), 12, "riemann_left")
    torch.testing.assert_close(e0.attributions.double(), ig, rtol=1e-6, atol=1e-10)


# ------------------------------------------------------------------------------ LRP
def _random_bn(model):
    """Non-trivial running statistics and affine parameters, so merging BatchNorm matters."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm3d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def lrp_case(kind, bias=True):
    """A 1-D or 3-D CNN with every layer kind LRP meets there: conv, BatchNorm, ReLU, max- and
    average pooling, adaptive average pooling, a linear head."""
    torch.manual_seed(11)
    g = torch.Generator().manual_seed(4)
    if kind == "series":
        layers = [nn.Conv1d(2, 6, 5, padding=2, bias=bias), nn.BatchNorm1d(6), nn.ReLU(), nn.MaxPool1d(2),
                  nn.Conv1d(6, 8, 3, padding=1, bias=bias), nn.ReLU(), nn.AvgPool1d(2), nn.AdaptiveAvgPool1d(1),
                  nn.Flatten(), nn.Linear(8, 3, bias=bias)]
        layout, x = "BCT", torch.randn(2, 2, 32, generator=g, dtype=torch.float64)
    else:
        layers = [nn.Conv3d(1, 4, 3, padding=1, bias=bias), nn.BatchNorm3d(4), nn.ReLU(), nn.MaxPool3d(2),
                  nn.Conv3d(4, 6, 3, padding=1, bias=bias), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                  nn.Linear(6, 3, bias=bias)]
        layout, x = "BCDHW", torch.randn(2, 1, 6, 8, 8, generator=g, dtype=torch.float64)
    if not bias:
        layers = [m for m in layers if not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm3d))]
    model = _random_bn(nn.Sequential(*layers)).double().eval()
    return sk.Subject(model, layout=layout), x


class BiasFreeClip(nn.Module):
    """A bias-free 3-D conv, ReLU, max pooling and linear head over [B,T,C,H,W] clips."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(14)
        self.conv = nn.Conv3d(3, 4, 3, padding=1, bias=False)
        self.pool = nn.MaxPool3d(2)
        self.fc = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        a = self.pool(torch.relu(self.conv(x.permute(0, 2, 1, 3, 4))))
        return self.fc(a.mean((2, 3, 4)))


@pytest.mark.parametrize("kind", ["series", "volume", "clip", "features"])
def test_lrp_conserves_on_every_layout(kind):
    # bias-free ReLU / max- and average-pooling nets (a 1-D and a 3-D CNN, a 3-D CNN over clips, an
    # MLP): LRP-0 is gradient x input exactly (float64 rounding), and the epsilon rule (eps 1e-9)
    # hands the score down whole: sum R = s_c to 1e-6
    g = torch.Generator().manual_seed(15)
    if kind == "clip":
        s, x = clip_subject(BiasFreeClip()), torch.randn(2, 4, 3, 6, 6, generator=g, dtype=torch.float64)
    elif kind == "features":
        torch.manual_seed(16)
        mlp = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False)).double().eval()
        s, x = sk.Subject(mlp, layout="BF"), torch.randn(3, 6, generator=g, dtype=torch.float64)
    else:
        s, x = lrp_case(kind, bias=False)
    r0 = sk.explain(s, x, "lrp", composite="zero")
    gxi = sk.explain(s, x, "gradxinput")
    assert r0.layout == s.layout and r0.attributions.shape == x.shape
    assert torch.allclose(r0.attributions.double(), gxi.attributions.double(), rtol=1e-10, atol=1e-14)
    e = sk.explain(s, x, "lrp", composite="epsilon", epsilon=1e-9)
    total = e.attributions.double().flatten(1).sum(1)
    assert torch.allclose(total, torch.tensor(e.extras["score"], dtype=torch.float64), rtol=1e-6)
    assert max(e.extras["conservation_error"]) < 1e-6
    if kind == "clip":
        # the z-box of a clip defaults to each frame's pixel range 0..1, normalised per channel
        # (channel axis 2): the same relevance as those bounds given explicitly
        box = sk.explain(s, x, "lrp", composite="epsilon_gamma_box")
        given = sk.explain(s, x, "lrp", composite="epsilon_gamma_box", low=s.black(x[:1]),
                           high=s.normalize_pixels(torch.ones_like(x[:1])))
        assert torch.equal(box.attributions, given.attributions)


@pytest.mark.parametrize("kind", ["series", "volume"])
def test_lrp_agrees_with_zennit_on_series_and_volumes(kind):
    # Zennit (Conv1d/Conv3d are its Convolution type) with its BatchNorm-merging canonizer is the
    # reference; average pooling is split without Zennit's 1e-6 stabiliser, as on images, so allow
    # 1e-4 of the largest relevance (measured <= 3e-5). The z-box bounds of a series or a volume
    # default to the batch's min and max
    pytest.importorskip("zennit")
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat

    s, x = lrp_case(kind)
    low, high = x.amin().expand_as(x), x.amax().expand_as(x)
    references = {"epsilon_plus_flat": lambda: EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()]),
                  "epsilon_gamma_box": lambda: EpsilonGammaBox(low=low, high=high,
                                                               canonizers=[SequentialMergeBatchNorm()]),
                  "epsilon_alpha2beta1": lambda: EpsilonAlpha2Beta1(canonizers=[SequentialMergeBatchNorm()])}
    for name, composite in references.items():
        with s.explaining():
            xin = x.clone().requires_grad_(True)
            with composite().context(s.model) as m:
                out = m(xin)
                onehot = torch.zeros_like(out).scatter_(1, out.argmax(1, keepdim=True), 1.0)
                ref, = torch.autograd.grad(out, xin, grad_outputs=onehot * out)
        ours = sk.explain(s, x, "lrp", composite=name).attributions.double()
        assert torch.allclose(ours, ref, atol=1e-4 * ref.abs().max().item()), name


# ------------------------------------------------------------------------------ LIME / KernelSHAP
def test_kernelshap_of_a_linear_model_is_w_times_x_minus_b():
    # Shapley values of f(x) = w.x + c against a baseline b are w_i (x_i - b_i), feature by
    # feature; for groups (segments=) the sum over the group. Exact mode (6 features: all 62
    # coalitions) and sampled mode (14 features, 300 paired samples: the linear model is fitted
    # exactly by any full-rank design) both recover them; float32 maps: atol 1e-5
    torch.manual_seed(12)
    for features, n_samples, exact in ((6, 100, True), (14, 300, False)):
        lin = nn.Linear(features, 2).double()
        x = torch.randn(3, features, dtype=torch.float64)
        b = torch.randn(features, dtype=torch.float64)
        e = sk.explain(sk.Subject(lin, layout="BF"), x, "kernelshap", target=1, n_samples=n_samples, baseline=b)
        want = lin.weight[1].detach() * (x - b)
        assert e.extras["exact"] == [exact] * 3 and e.maps.shape == (3, features)
        assert torch.allclose(e.maps.double(), want, atol=1e-5)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 5])
    e = sk.explain(sk.Subject(lin, layout="BF"), x, "kernelshap", target=1, segments=groups, baseline=b)
    per_group = torch.zeros(3, 6, dtype=torch.float64).index_add_(1, groups, want)
    assert torch.allclose(e.maps.double(), per_group[:, groups], atol=1e-5)


def test_feature_lime_hides_features_with_zero():
    # a feature alone is its own mean, so LIME's default 'segment_mean' would hide nothing: on a
    # flat input hidden features take 0 ('mean', reported in the extras), and each feature's
    # coefficient is its map value
    e = sk.explain(sk.Subject(flat_mlp(), layout="BF"), torch.randn(2, 6, dtype=torch.float64), "lime",
                   n_samples=64)
    assert e.maps.shape == (2, 6) and e.extras["baseline"] == "mean"
    assert torch.allclose(e.maps, torch.stack(e.extras["coefficients"]))


def blob_volume():
    """Two volumes with a bright box in noise: regions for SLIC to find."""
    g = torch.Generator().manual_seed(13)
    v = 0.05 * torch.randn(2, 1, 8, 12, 12, generator=g, dtype=torch.float64)
    v[:, :, 2:6, 3:9, 3:9] += 1
    return v


def test_volume_supervoxels_and_given_labels():
    # SLIC on each volume (one channel: channel_axis=None) gives [B,D,H,W] labels, and the map is
    # constant on each supervoxel; given [D,H,W] labels (2 x 2 x 2 blocks: 8 segments, exact mode),
    # KernelSHAP sums to s(x) - s(baseline) (logits, float32 maps: 1e-5)
    s = sk.Subject(volume_cnn(), layout="BCDHW")
    v = blob_volume()
    e = sk.explain(s, v, "lime", n_segments=8, n_samples=64)
    seg = e.extras["segments"]
    assert seg.shape == (2, 8, 12, 12) and e.maps.shape == (2, 8, 12, 12)
    for i in range(2):
        for k in range(int(seg[i].max()) + 1):
            vals = e.maps[i][seg[i] == k]
            assert torch.all(vals == vals[0])
    d, h, w = torch.meshgrid(torch.arange(8) // 4, torch.arange(12) // 6, torch.arange(12) // 6, indexing="ij")
    blocks = d * 4 + h * 2 + w
    e = sk.explain(s, v, "kernelshap", segments=blocks, n_samples=300, output="logit", target=0)
    assert e.extras["exact"] == [True, True]
    with torch.no_grad():
        diff = s.model(v)[:, 0] - s.model(torch.zeros_like(v))[:, 0]
    painted = torch.stack([torch.stack(e.extras["coefficients"])[i].double().sum() for i in range(2)])
    assert torch.allclose(painted, diff, atol=1e-5)
    with pytest.raises(SaliencyError, match=r"segments of a volume must have shape \(D, H, W\) = \(8, 12, 12\)"):
        sk.explain(s, v, "lime", segments=blocks[:4])


def test_lrp_agrees_with_zennit_on_an_mlp(features):
    # a feature vector through Linear / ReLU layers against Zennit on the same MLP: EpsilonPlusFlat
    # (flat first layer, epsilon after) and EpsilonAlpha2Beta1 (all epsilon: it has no convolution);
    # our z-box composite puts the z-box on the first layer whatever its type, Zennit's
    # EpsilonGammaBox on a first convolution only, so that one is compared with Zennit's z-box on the
    # first Linear between the batch's min and max (our default bounds for a non-image input). No
    # pooling to stabilise: float64 rounding, 1e-10 of the largest relevance
    pytest.importorskip("zennit")
    from zennit.composites import EpsilonAlpha2Beta1, EpsilonPlusFlat, SpecialFirstLayerMapComposite
    from zennit.rules import Epsilon, ZBox
    from zennit.types import Linear

    torch.manual_seed(17)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    s = sk.Subject(mlp, layout="BF")
    low, high = features.amin().expand_as(features), features.amax().expand_as(features)
    references = {"epsilon_plus_flat": EpsilonPlusFlat, "epsilon_alpha2beta1": EpsilonAlpha2Beta1,
                  "epsilon_gamma_box": lambda: SpecialFirstLayerMapComposite(
                      layer_map=[(Linear, Epsilon())], first_map=[(Linear, ZBox(low=low, high=high))])}
    for name, composite in references.items():
        xin = features.clone().requires_grad_(True)
        with composite().context(mlp) as m:
            out = m(xin)
            onehot = torch.zeros_like(out).scatter_(1, out.argmax(1, keepdim=True), 1.0)
            ref, = torch.autograd.grad(out, xin, grad_outputs=onehot * out)
        ours = sk.explain(s, features, "lrp", composite=name)
        assert ours.maps.shape == (3, 6)
        assert torch.allclose(ours.attributions.double(), ref, atol=1e-10 * ref.abs().max().item()), name


class PooledClip(nn.Module):
    """A clip model whose averages are pooling modules (Zennit splits a pooling module's relevance
    by the Norm rule, as we do; a functional mean it splits evenly): a 3-D conv over the permuted
    clip, or a frame-by-frame 2-D conv over its flattened frames."""

    def __init__(self, per_frame):
        super().__init__()
        torch.manual_seed(18)
        self.per_frame = per_frame
        self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=2) if per_frame else nn.Conv3d(3, 4, 3, padding=1, stride=2)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1) if per_frame else nn.AdaptiveAvgPool3d(1)
        self.time = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        b, t = x.shape[:2]
        if self.per_frame:
            f = self.pool(self.act(self.conv(x.flatten(0, 1)))).view(b, t, -1).transpose(1, 2)
            return self.fc(self.time(f).flatten(1))
        return self.fc(self.pool(self.act(self.conv(x.permute(0, 2, 1, 3, 4)))).flatten(1))


@pytest.mark.parametrize("per_frame", [False, True])
def test_lrp_of_a_clip_model_agrees_with_zennit(clip, per_frame):
    # a clip model's first layer reads a view of the input (permuted to [B,C,T,H,W], or its frames
    # flattened to [B*T,C,H,W]); the flat first-layer rule applies through that view, its relevance
    # landing on the input's axes. Zennit's rules act on the module input and its gradient flows back
    # through the view: the same numbers up to Zennit's 1e-6 stabiliser of the pooling's Norm rule
    # (1e-4 of the largest relevance, as for series and volumes; measured <= 8e-6)
    pytest.importorskip("zennit")
    from zennit.composites import EpsilonAlpha2Beta1, EpsilonPlusFlat

    model = PooledClip(per_frame).double().eval()
    s = clip_subject(model)
    for name, composite in (("epsilon_plus_flat", EpsilonPlusFlat), ("epsilon_alpha2beta1", EpsilonAlpha2Beta1)):
        xin = clip.clone().requires_grad_(True)
        with composite().context(model) as m:
            out = m(xin)
            onehot = torch.zeros_like(out).scatter_(1, out.argmax(1, keepdim=True), 1.0)
            ref, = torch.autograd.grad(out, xin, grad_outputs=onehot * out)
        ours = sk.explain(s, clip, "lrp", composite=name)
        assert ours.maps.shape == (2, 4, 6, 6) and ours.attributions.shape == clip.shape
        assert torch.allclose(ours.attributions.double(), ref, atol=1e-4 * ref.abs().max().item()), name


def test_clip_supervoxels_and_given_labels(clip):
    # a clip's features are supervoxels over (T, H, W): SLIC on its unnormalised frames (3 channels)
    # gives [B,T,H,W] labels with the map constant on each; given [T,H,W] blocks (2 x 2 x 2: 8
    # segments, exact mode) KernelSHAP sums to s(x) - s(baseline) and a hidden block takes the
    # baseline in all 3 channels of its pixels (logits, float32 maps: 1e-5); LIME's segment-mean
    # baseline is the mean of each channel over the segment
    s = clip_subject()
    pixels = torch.full((2, 4, 3, 6, 6), 0.2, dtype=torch.float64)
    for f in range(4):                                       # a bright square moving right
        pixels[:, f, :, 1:4, f // 2:f // 2 + 3] = 0.9
    e = sk.explain(s, s.normalize_pixels(pixels), "lime", n_segments=6, n_samples=32)
    seg = e.extras["segments"]
    assert seg.shape == (2, 4, 6, 6) and e.maps.shape == (2, 4, 6, 6)
    for i in range(2):
        for k in range(int(seg[i].max()) + 1):
            vals = e.maps[i][seg[i] == k]
            assert torch.all(vals == vals[0])
    t, h, w = torch.meshgrid(torch.arange(4) // 2, torch.arange(6) // 3, torch.arange(6) // 3, indexing="ij")
    blocks = t * 4 + h * 2 + w
    e = sk.explain(s, clip, "kernelshap", segments=blocks, n_samples=300, output="logit", target=0)
    assert e.extras["exact"] == [True, True]
    with torch.no_grad():
        diff = s.model(clip)[:, 0] - s.model(torch.zeros_like(clip))[:, 0]
    assert torch.allclose(torch.stack(e.extras["coefficients"]).double().sum(1), diff, atol=1e-5)
    from saliencykit.methods.perturbation import _segment_baseline

    base = _segment_baseline(clip, blocks.expand(2, 4, 6, 6), [8, 8], 2)
    want = clip[:, :2, :, :3, :3].mean((1, 3, 4))                             # [B, C] mean of block 0
    assert torch.allclose(base[:, :2, :, :3, :3], want.view(2, 1, 3, 1, 1).expand(2, 2, 3, 3, 3))


# ------------------------------------------------------------------------------ CAM, Eigen-CAM, Smooth Grad-CAM++
def cam_cases():
    g = torch.Generator().manual_seed(21)
    return [("BCT", series_cnn(stride=2), "3", torch.randn(2, 2, 12, generator=g, dtype=torch.float64)),
            ("BCDHW", volume_cnn(stride=2), "3", torch.randn(2, 1, 4, 6, 6, generator=g, dtype=torch.float64)),
            ("BTCHW", PooledClip(per_frame=False), "act", torch.randn(2, 4, 3, 6, 6, generator=g, dtype=torch.float64))]


@pytest.mark.parametrize("case", [0, 1, 2], ids=["series", "volume", "clip"])
def test_cam_eigencam_and_smooth_gradcam_pp_on_more_layouts(case):
    # CAM of a layer feeding global average pooling + a linear head is N x Grad-CAM (the mean
    # gradient of channel c is w_c / N, N the layer's positions); Eigen-CAM is the first principal
    # component of the centred positions x channels matrix, written out with an SVD (sign chosen to
    # correlate with the channel mean); Smooth Grad-CAM++ without noise is Grad-CAM++ (series and
    # volumes). Float32 maps of float64 models: 1e-6 of the largest value
    layout, model, layer, x = cam_cases()[case]
    s = sk.Subject(model.double().eval(), layout=layout, input_size=(6, 6))
    e = sk.explain(s, x, ["cam", "gradcam", "eigencam"], layer=layer, target=1)
    raw = e["gradcam"].raw
    n = raw[0].numel()
    tol = 1e-6 * float(e["cam"].raw.abs().max())
    assert torch.allclose(e["cam"].raw, n * raw, atol=tol)
    want = (2, 4, 6, 6) if layout == "BTCHW" else (2, *x.shape[2:])
    assert e["cam"].maps.shape == e["gradcam"].maps.shape == e["eigencam"].maps.shape == want
    store = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: store.update(a=o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    a = store["a"]
    X = a.reshape(2, a.shape[1], -1).transpose(1, 2)
    X = X - X.mean(1, keepdim=True)
    proj = (X @ torch.linalg.svd(X, full_matrices=False)[2][:, 0, :].unsqueeze(-1)).squeeze(-1)
    ref = a.mean(1).reshape(2, -1)
    proj = proj * torch.sign((proj * (ref - ref.mean(1, keepdim=True))).sum(1, keepdim=True))
    assert torch.allclose(e["eigencam"].raw.double(), proj.clamp_min(0).view_as(e["eigencam"].raw), atol=1e-6)
    if layout != "BTCHW":
        smooth = sk.explain(s, x, ["smooth_gradcam_pp", "gradcam_pp"], layer=layer, target=1, samples=2,
                            noise_abs=0.0)
        assert torch.allclose(smooth["smooth_gradcam_pp"].raw, smooth["gradcam_pp"].raw, atol=1e-6)
