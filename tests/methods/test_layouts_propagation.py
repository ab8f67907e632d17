"""FullGrad, NormGrad and CRP on series [B,C,T], volumes [B,C,D,H,W] (and clips, feature vectors
where the method reads them), checked on the tiny float64 CNNs of layout_models.py:

* FullGrad: its full-gradient decomposition (a ReLU net's score is exactly sum(grad_x * x) plus
  sum over biased layers of sum(grad_z * b)), its map written out by hand (linear / trilinear
  upsampling), and a 1-D CNN giving the same map as the same CNN written as a 2-D one over a
  height-1 image (the image path's definition);
* NormGrad: ||g(u)|| ||a(u)|| per location written out, and its scaling+sum variant = CAM / t at
  the layer that feeds global pooling and a linear head;
* CRP: the conditional relevances of all channels of a layer sum to LRP (conservation), as
  tests/methods/test_crp.py checks on images.

Float64 models: identities hold to float64 rounding (1e-10 of the largest value); maps are float32
after upsampling (engine.upsample), so comparisons of maps are at 1e-6 relative.
"""
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit.errors import SaliencyError
from saliencykit.methods.propagation import full_gradient
from saliencykit.targets import as_target

from layout_models import FrameNet, clip, clip_subject, features, flat_mlp, series_cnn, volume_cnn  # noqa: F401


def case(kind, stride=2):
    g = torch.Generator().manual_seed(21)
    if kind == "series":
        return sk.Subject(series_cnn(stride), layout="BCT"), torch.randn(2, 2, 12, generator=g, dtype=torch.float64)
    return sk.Subject(volume_cnn(stride), layout="BCDHW"), torch.randn(2, 1, 6, 6, 6, generator=g, dtype=torch.float64)


def _layer_outputs(model, x):
    """Every output of a Sequential's children, kept for autograd (the by-hand reference)."""
    outs, h = [], x
    for m in model:
        h = m(h)
        outs.append(h)
    return outs


def _minmax(t, eps):
    f = t.reshape(t.shape[0], -1)
    f = f - f.amin(1, keepdim=True)
    return (f / (f.amax(1, keepdim=True) + eps)).view_as(t)


@pytest.mark.parametrize("kind", ["series", "volume"])
def test_fullgrad_decomposition_is_exact(kind):
    # ReLU, zero padding, average pooling, biases in both convolutions and the Linear: the score is
    # piecewise linear in (x, biases) with no other offset, so the unprocessed terms add up to it
    # (float64: measured ~1e-16; 1e-10)
    s, x = case(kind)
    with s.explaining():
        target = as_target(None).resolve(s, s.forward(x))
        fg = full_gradient(s, x, target)
    total = fg["input_term"].flatten(1).sum(1) + sum(t.flatten(1).sum(1) for _, t, _ in fg["bias_terms"])
    assert len(fg["bias_terms"]) == 3 and fg["input_term"].shape == x.shape
    assert torch.allclose(total, fg["scores"], rtol=0, atol=1e-10)
    e = sk.explain(s, x, "fullgrad")
    assert max(e.extras["completeness_error"]) < 1e-10
    assert e.extras["spatial_bias_layers"] == 2 and e.maps.shape == (x.shape[0], *x.shape[2:])


@pytest.mark.parametrize("kind", ["series", "volume"])
@pytest.mark.parametrize("normalisation", ["official", "grad_cam_lib"])
def test_fullgrad_map_is_its_definition(kind, normalisation):
    # |grad_x * x| and each conv layer's |grad_z * b| (the second conv has stride 2: its terms are
    # upsampled, linearly for a series, trilinearly for a volume), normalised and summed
    s, x = case(kind)
    mode = "linear" if kind == "series" else "trilinear"
    model = s.model
    xin = x.clone().requires_grad_(True)
    outs = _layer_outputs(model, xin)
    cls = outs[-1].argmax(1)
    score = outs[-1].gather(1, cls[:, None]).sum()
    convs = [0, 2]
    grads = torch.autograd.grad(score, [xin] + [outs[i] for i in convs])
    terms = [grads[0] * x] + [g * model[i].bias.view(1, -1, *([1] * (x.dim() - 2))) for g, i in zip(grads[1:], convs)]
    size = tuple(x.shape[2:])
    if normalisation == "official":
        norm, corners = (lambda t: _minmax(t.abs(), 1e-6)), True
    else:
        def norm(t):
            return _minmax(t.abs().reshape(-1, *t.shape[2:]), 1e-7).reshape(t.shape)
        corners = False
    expected = norm(terms[0]).sum(1)
    for t in terms[1:]:
        expected = expected + nn.functional.interpolate(norm(t).sum(1, keepdim=True).float(), size=size, mode=mode,
                                                        align_corners=corners).squeeze(1).double()
    e = sk.explain(s, x, "fullgrad", normalisation=normalisation)
    assert e.layout == s.layout
    assert torch.allclose(e.maps.double(), expected, rtol=1e-6, atol=1e-6)


def test_fullgrad_of_a_series_is_the_image_path_on_a_height_one_image():
    # the 1-D CNN written as a 2-D CNN with (1, k) kernels over a [B,C,1,T] image: the image path's
    # FullGrad (bilinear upsampling of a height-1 map) is the series path's (linear upsampling).
    # Float32 maps after upsampling: 1e-6
    s, x = case("series")
    m1 = s.model
    m2 = nn.Sequential(nn.Conv2d(2, 4, (1, 3), padding=(0, 1)), nn.ReLU(),
                       nn.Conv2d(4, 5, (1, 3), padding=(0, 1), stride=(1, 2)), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                       nn.Flatten(), nn.Linear(5, 3)).double().eval()
    with torch.no_grad():
        for i in (0, 2):
            m2[i].weight.copy_(m1[i].weight.unsqueeze(2))
            m2[i].bias.copy_(m1[i].bias)
        m2[6].load_state_dict(m1[6].state_dict())
    image = sk.Subject(m2, layout="BCHW", mean=(0.0, 0.0), std=(1.0, 1.0))   # 2 channels
    for normalisation in ("official", "grad_cam_lib"):
        one = sk.explain(s, x, "fullgrad", normalisation=normalisation)
        two = sk.explain(image, x.unsqueeze(2), "fullgrad", normalisation=normalisation)
        assert two.maps.shape == (2, 1, 12)
        assert torch.allclose(one.maps, two.maps[:, 0], rtol=1e-6, atol=1e-6)


def test_fullgrad_of_a_frame_cnn_puts_its_frames_back(clip):
    # a frame-by-frame Conv2d's term [B*T,C,h,w] is laid on the clip's (T,H,W) axes; the map is
    # |grad_x*x| over the channel axis 2 plus that term upsampled trilinearly (h -> H per frame;
    # T unchanged), and the decomposition holds (biases of the conv and the Linear)
    s = clip_subject(FrameNet())
    e = sk.explain(s, clip, "fullgrad")
    assert e.maps.shape == (2, 4, 6, 6) and e.extras["spatial_bias_layers"] == 1
    assert max(e.extras["completeness_error"]) < 1e-10
    xin = clip.clone().requires_grad_(True)
    z = s.model.conv(xin.flatten(0, 1))
    f = torch.relu(z).mean((2, 3)).view(2, 4, -1).mean(1)
    out = s.model.fc(f)
    score = out.gather(1, out.argmax(1, keepdim=True)).sum()
    gx, gz = torch.autograd.grad(score, [xin, z])
    term = (gz * s.model.conv.bias.view(1, -1, 1, 1)).view(2, 4, 4, 3, 3).transpose(1, 2)
    expected = _minmax((gx * clip).abs(), 1e-6).sum(2) + nn.functional.interpolate(
        _minmax(term.abs(), 1e-6).sum(1, keepdim=True).float(), size=(4, 6, 6), mode="trilinear",
        align_corners=True).squeeze(1).double()
    assert torch.allclose(e.maps.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["series", "volume"])
def test_normgrad_is_its_definition(kind):
    # ||g(u)|| ||a(u)|| over the channels at each location of the second ReLU's output (stride 2),
    # upsampled linearly / trilinearly (align_corners=False, as the CAMs)
    s, x = case(kind)
    mode = "linear" if kind == "series" else "trilinear"
    outs = _layer_outputs(s.model, x.clone().requires_grad_(True))
    score = outs[-1].gather(1, outs[-1].argmax(1, keepdim=True)).sum()
    a = outs[3]
    g, = torch.autograd.grad(score, a)
    raw = g.norm(dim=1) * a.detach().norm(dim=1)
    e = sk.explain(s, x, "normgrad", layer="3")
    assert torch.allclose(e.raw.double(), raw, rtol=1e-6, atol=1e-12)
    expected = nn.functional.interpolate(raw.unsqueeze(1).float(), size=tuple(x.shape[2:]), mode=mode).squeeze(1)
    assert torch.allclose(e.maps.float(), expected, rtol=1e-6, atol=1e-7)
    # several layers: each upsampled, min-max normalised, multiplied
    two = sk.explain(s, x, "normgrad", layer=["1", "3"])
    assert two.maps.shape == (x.shape[0], *x.shape[2:]) and two.maps.min() >= 0 and two.maps.max() <= 1


@pytest.mark.parametrize("kind", ["series", "volume"])
def test_normgrad_scaling_sum_is_cam_over_the_layer_size(kind):
    # at the layer feeding global average pooling + a linear head g(u) = w_c / n (n positions), so
    # sum_c a(u) g(u) = CAM(u) / n
    s, x = case(kind, stride=1)
    lin = sk.explain(s, x, "normgrad", layer="3", variant="scaling_sum")
    cam = sk.explain(s, x, "cam", layer="3", relu=False)
    n = cam.raw[0].numel()
    assert lin.raw.shape == cam.raw.shape and lin.signed
    assert torch.allclose(lin.raw.double(), cam.raw.double() / n, rtol=1e-6, atol=1e-10)


def test_normgrad_of_a_frame_cnn(clip):
    # a frame-by-frame layer's [B*T,C,h,w] norms, frames put back on the time axis
    s = clip_subject(FrameNet())
    e = sk.explain(s, clip, "normgrad", layer="conv")
    xin = clip.clone()
    z = s.model.conv(xin.flatten(0, 1))
    out = s.model.fc(torch.relu(z).mean((2, 3)).view(2, 4, -1).mean(1))
    g, = torch.autograd.grad(out.gather(1, out.argmax(1, keepdim=True)).sum(), z)
    raw = (g.norm(dim=1) * z.detach().norm(dim=1)).view(2, 4, 3, 3)
    assert e.maps.shape == (2, 4, 6, 6)
    assert torch.allclose(e.raw.double(), raw, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kind", ["series", "volume", "features", "clip"])
def test_crp_over_all_channels_is_lrp(kind, features, clip):  # noqa: F811
    # the backward below the layer is linear in the relevance arriving there and the 0/1 masks of
    # all channels sum to 1: the channels' CRP maps sum to LRP's (float64: measured ~1e-16 of the
    # largest value; 1e-12). The relevance kept at the layer adds up to all that reached it.
    if kind == "features":
        s, x, layer, n = sk.Subject(flat_mlp(), layout="BF"), features, "0", 8
        params = {"unsupported": "identity"}                       # the MLP's Tanh passes relevance
    elif kind == "clip":
        s, x, layer, n, params = clip_subject(FrameNet()), clip, "conv", 4, {}
    else:
        (s, x), layer, n, params = case(kind), "1", 4, {}
    lrp = sk.explain(s, x, "lrp", target=1, **params).attributions
    exps = [sk.explain(s, x, "crp", target=1, concept=(layer, c), **params) for c in range(n)]
    assert exps[0].maps.shape == sk.explain(s, x, "lrp", target=1, **params).maps.shape
    assert torch.allclose(sum(e.attributions for e in exps), lrp, rtol=0, atol=1e-12 * lrp.abs().max().item())
    kept = torch.tensor([e.extras["concept_relevance"] for e in exps], dtype=torch.float64).sum(0)
    total = torch.tensor(exps[0].extras["layer_relevance_sum"], dtype=torch.float64)
    assert torch.allclose(kept, total, rtol=1e-9) and (total.abs() > 0).all()
    assert not torch.allclose(exps[0].attributions, exps[1].attributions)


class _Bank:
    def __init__(self, basis, layer):
        self.basis, self.layer, self.method = basis, layer, "test"


@pytest.mark.parametrize("kind", ["series", "volume"])
def test_crp_bank_shares_sum_to_lrp(kind):
    # a bank's concept shares of each channel's relevance at each position (any number of axes)
    # sum to 1, so the concepts' maps sum to LRP's (float64, 1e-12)
    s, x = case(kind)
    bank = _Bank(torch.rand(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64), "3")
    lrp = sk.explain(s, x, "lrp", target=2).attributions
    maps = [sk.explain(s, x, "crp", target=2, concept=(bank, k)).attributions for k in range(3)]
    assert torch.allclose(sum(maps), lrp, rtol=0, atol=1e-12 * lrp.abs().max().item())
    assert not torch.allclose(maps[0], maps[1])


def test_fullgrad_and_normgrad_refuse_a_flat_input_saying_why(features):  # noqa: F811
    s = sk.Subject(flat_mlp(), layout="BF")
    with pytest.raises(SaliencyError, match="fullgrad cannot explain a BF input .*a flat input has none"):
        sk.explain(s, features, "fullgrad")
    with pytest.raises(SaliencyError, match="normgrad cannot explain a BF input .*have no axes"):
        sk.explain(s, features, "normgrad")
