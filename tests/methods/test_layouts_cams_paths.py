"""CF-CAM, IIA and DIX on series [B,C,T] and volumes [B,C,D,H,W] (tiny float64 CNNs of
layout_models.py):

* the same CNN written as a 2-D CNN (a series as a height-1 image, a volume of depth 1 as an
  image) gives the image path's map: CF-CAM's cluster filter over one or three axes is the 2-D
  filter on a map one pixel high (DBSCAN sees the same channel vectors);
* IIA's iterated integral and DIX's mean along the layer path have closed forms at the layer that
  feeds global average pooling + a linear head (as tests/methods/test_paths.py checks on images);
  DIX's "min" baseline is the per-channel minimum over the layer's time steps / voxels;
* on a clip's frame-by-frame layer, IIA's and DIX's one-step forms written out by hand.
"""
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit.errors import SaliencyError
from saliencykit.methods.cam import _cluster_filter

from layout_models import FrameNet, clip, clip_subject, features, flat_mlp, series_cnn, volume_cnn  # noqa: F401


def case(kind, stride=2):
    g = torch.Generator().manual_seed(22)
    if kind == "series":
        return sk.Subject(series_cnn(stride), layout="BCT"), torch.randn(2, 2, 16, generator=g, dtype=torch.float64)
    return sk.Subject(volume_cnn(stride), layout="BCDHW"), torch.randn(2, 1, 1, 8, 8, generator=g, dtype=torch.float64)


def twin_2d(model):
    """The 1-D / 3-D Sequential CNN as a 2-D one: Conv1d (k) -> Conv2d (1, k) on a [B,C,1,T] image;
    Conv3d (k,k,k) on a depth-1 volume -> Conv2d (k,k) with the kernel's middle depth slice."""
    layers = []
    for m in model:
        if isinstance(m, nn.Conv1d):
            c = nn.Conv2d(m.in_channels, m.out_channels, (1, m.kernel_size[0]), padding=(0, m.padding[0]),
                          stride=(1, m.stride[0]))
            w = m.weight.unsqueeze(2)
        elif isinstance(m, nn.Conv3d):
            c = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size[1:], padding=m.padding[1:], stride=m.stride[1:])
            w = m.weight[:, :, m.kernel_size[0] // 2]
        elif isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool3d)):
            layers.append(nn.AdaptiveAvgPool2d(1))
            continue
        else:
            layers.append(m)
            continue
        with torch.no_grad():
            c.weight.copy_(w)
            c.bias.copy_(m.bias)
        layers.append(c)
    twin = nn.Sequential(*layers).double().eval()
    channels = twin[0].in_channels
    return sk.Subject(twin, layout="BCHW", mean=(0.0,) * channels, std=(1.0,) * channels)


def as_image(kind, x):
    return x.unsqueeze(2) if kind == "series" else x[:, :, 0]


@pytest.mark.parametrize("kind", ["series", "volume"])
def test_cf_cam_is_the_image_path_on_a_one_pixel_high_map(kind):
    # the same layer maps, one axis of length 1 added or dropped: the same clusters, weights and
    # map (float32 maps after upsampling: 1e-6)
    s, x = case(kind)
    twin, img = twin_2d(s.model), as_image(kind, x)
    assert torch.allclose(s.model(x), twin.model(img), atol=1e-12)
    for params in ({}, {"range_sigma": None}, {"importance_percentile": 0.0}):
        one = sk.explain(s, x, "cf_cam", layer="3", **params)
        two = sk.explain(twin, img, "cf_cam", layer="3", **params)
        assert one.maps.shape == (x.shape[0], *x.shape[2:]) and one.extras["clusters"] == two.extras["clusters"]
        flat = two.maps[:, 0] if kind == "series" else two.maps
        assert torch.allclose(one.maps.reshape(flat.shape), flat, rtol=1e-6, atol=1e-6)
        assert one.maps.amax((1,) if kind == "series" else (1, 2, 3)).sub(1).abs().max() < 1e-6


def test_cluster_filter_over_three_axes_is_a_gaussian_convolution():
    # without the range term, the kernel is a normalised isotropic Gaussian of the map's size: a
    # unit impulse at the centre of a 5x5x5 map comes back as that kernel (its own reflection)
    g = torch.zeros(5, 5, 5, dtype=torch.float64)
    g[2, 2, 2] = 1
    out = _cluster_filter(g, 1.5, None)
    r = torch.arange(5, dtype=torch.float64) - 2
    k = torch.exp(-(r.view(-1, 1, 1) ** 2 + r.view(1, -1, 1) ** 2 + r.view(1, 1, -1) ** 2) / (2 * 1.5 ** 2))
    assert torch.allclose(out, k / k.sum(), atol=1e-15)
    # one axis: the 1-D Gaussian
    line = torch.zeros(7, dtype=torch.float64)
    line[3] = 1
    k1 = torch.exp(-(torch.arange(7, dtype=torch.float64) - 3) ** 2 / (2 * 2.0 ** 2))
    assert torch.allclose(_cluster_filter(line, 2.0, None), k1 / k1.sum(), atol=1e-15)


def _head_terms(s, x, cls):
    """At the ReLU feeding GAP + Linear: ReLU(w_c a(u)) / n summed over channels, per position."""
    a = s.model[:4](x).detach()
    w = s.model[6].weight[cls].view(x.shape[0], -1, *([1] * (a.dim() - 2)))
    n = a[0, 0].numel()
    return (w * a).clamp_min(0).sum(1) / n, a, w, n


@pytest.mark.parametrize("kind", ["series", "volume"])
def test_iia_and_dix_closed_forms_at_a_linear_head(kind):
    # the head after layer "3" is linear: IIA's inner integral is mean_j beta_j = (T+1)/(2T) (right
    # Riemann rule), the outer the mean of the head term over x_k = (k/T) x (the "mean" baseline
    # of a series or a volume is zeros); DIX with the zero baseline is half the head term.
    # Float64 sums, float32 raw maps: 1e-5 relative
    s, x = case(kind, stride=1)
    T, cls = 3, torch.tensor([2, 0])
    e = sk.explain(s, x, "iia", target=cls.tolist(), layer="3", steps=T)
    expected = sum(_head_terms(s, (k / T) * x, cls)[0] for k in range(1, T + 1)) / T * (T + 1) / (2 * T)
    assert e.raw.shape == expected.shape and e.maps.shape == (x.shape[0], *x.shape[2:])
    torch.testing.assert_close(e.raw.double(), expected, rtol=1e-5, atol=1e-9)
    assert e.passes["backward"] == T * T
    d = sk.explain(s, x, "dix", target=cls.tolist(), layer="3", steps=4)
    head, a, w, n = _head_terms(s, x, cls)
    torch.testing.assert_close(d.raw.double(), head / 2, rtol=1e-5, atol=1e-9)
    # "min": a_t = m + (t/T)(a - m) with m the per-channel minimum over the layer's positions
    dims = tuple(range(2, a.dim()))
    m = a.amin(dims, keepdim=True)
    by_hand = sum((w * (m + (t / 4) * (a - m))).clamp_min(0).sum(1) / n for t in range(5)) / 5
    dm = sk.explain(s, x, "dix", target=cls.tolist(), layer="3", steps=4, baseline="min")
    torch.testing.assert_close(dm.raw.double(), by_hand, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind", ["series", "volume"])
def test_iia_is_the_image_path_on_a_one_pixel_high_map(kind):
    # the raw layer maps agree with the 2-D twin's (the maps differ only by the upsampling: torch
    # has no 1-D / 3-D bicubic, so a series' or a volume's map is upsampled linearly / trilinearly)
    s, x = case(kind)
    twin, img = twin_2d(s.model), as_image(kind, x)
    one = sk.explain(s, x, "iia", layer="1", steps=2)
    two = sk.explain(twin, img, "iia", layer="1", steps=2)
    torch.testing.assert_close(one.raw.reshape(two.raw.shape), two.raw, rtol=1e-6, atol=1e-9)


def _frame_net_from(net, x, replace):
    """FrameNet's forward with its conv output z [B*T,C,h,w] replaced by replace(z) (a leaf)."""
    z = replace(net.conv(x.flatten(0, 1)).detach()).requires_grad_(True)
    out = net.fc(torch.relu(z).mean((2, 3)).view(x.shape[0], x.shape[1], -1).mean(1))
    return z, out


def test_iia_and_dix_on_a_frame_by_frame_clip_layer(clip):  # noqa: F811
    # a clip's frame-by-frame conv output [B*T,C,h,w]: the rows' betas reach all their frames and
    # the maps come back as [B,T,h,w]. IIA with one step (right rule: alpha = beta = 1) is
    # ReLU(dS/dz * z) at the clean clip, channel-summed; DIX with one step and the "min" baseline is
    # the mean of that term at z and at m, each channel's minimum over all frames and positions
    # (float64 by hand, float32 raw maps: 1e-5)
    s = clip_subject(FrameNet())
    net, cls = s.model, [0, 2]
    rows = torch.tensor(cls)

    def term(replace):
        z, out = _frame_net_from(net, clip, replace)
        g, = torch.autograd.grad(out.gather(1, rows[:, None]).sum(), z)
        return (g * z).detach().clamp_min(0).sum(1).view(2, 4, 3, 3)

    e = sk.explain(s, clip, "iia", target=cls, layer="conv", steps=1)
    assert e.maps.shape == (2, 4, 6, 6)
    torch.testing.assert_close(e.raw.double(), term(lambda z: z), rtol=1e-5, atol=1e-9)

    def to_min(z):
        m = z.view(2, 4, *z.shape[1:]).amin(dim=(1, 3, 4), keepdim=True)
        return m.expand(2, 4, -1, 1, 1).reshape(8, -1, 1, 1).expand_as(z).clone()

    d = sk.explain(s, clip, "dix", target=cls, layer="conv", steps=1, baseline="min")
    torch.testing.assert_close(d.raw.double(), (term(lambda z: z) + term(to_min)) / 2, rtol=1e-5, atol=1e-9)


def test_layer_methods_refuse_a_flat_input_saying_why(features):  # noqa: F811
    s = sk.Subject(flat_mlp(), layout="BF")
    for method, why in (("cf_cam", "no axes to map"), ("iia", "no axes to map"), ("dix", "no axes to map")):
        with pytest.raises(SaliencyError, match=f"{method} cannot explain a BF input .*{why}"):
            sk.explain(s, features, method)
