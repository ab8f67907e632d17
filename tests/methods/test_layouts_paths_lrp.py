"""Blur IG, Guided IG and LRP on more layouts: Blur IG on series, volumes and clips (blurred
along the layout's axes), Guided IG on series and volumes, LRP on series, volumes, clips and
feature vectors.

Checked by identities (completeness of the path integrals, LRP-0 = gradient x input, conservation
of the epsilon rule on bias-free nets), by the blur as a convolution written out, and against
Zennit's composites. The models are float64; tolerances are said at each test.
"""
import pytest
import torch
from torch import nn

import saliencykit as sk

from layout_models import PooledClip, clip, clip_subject, features  # noqa: F401


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
