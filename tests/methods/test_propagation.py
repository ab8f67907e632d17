"""FullGrad, NormGrad and LRP: identities on tiny float64 models, agreement with pytorch-grad-cam and
Zennit, the architecture list, and the pretrained model on chelsea."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import Subject, data
from saliencykit.errors import SaliencyError
from saliencykit.methods.propagation import full_gradient, merged_batchnorm
from saliencykit.targets import as_target
from state import assert_same_state  # noqa: E402  (tests/ is on sys.path)


def _randomise_bn(model):
    # random running statistics and affine parameters, so BatchNorm's implicit biases are non-zero
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(1 + 0.3 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
    return model


class BNNet(nn.Module):
    """conv(bias)-BN-act-maxpool-conv-BN-act-GAP-linear(bias)."""

    def __init__(self, act=nn.ReLU, bias=True, bn=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.act1 = act()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(16) if bn else nn.Identity()
        self.act2 = act()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5, bias=bias)

    def forward(self, x):
        x = self.pool(self.act1(self.bn1(self.conv1(x))))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.fc(self.gap(x).flatten(1))


def _subject(act=nn.ReLU, bias=True, bn=True, seed=0):
    torch.manual_seed(seed)
    net = _randomise_bn(BNNet(act, bias, bn)).double().eval()
    return Subject(net, input_size=(32, 32), name="bnnet", mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.fixture
def x64():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _pearson(a, b):
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


# ------------------------------------------------------------------------------ FullGrad
def test_fullgrad_completeness_relu_bn_maxpool(x64):
    # input-gradient.x + sum of bias-gradient.bias (BN implicit biases included) == logit; float64
    # rounding over ~1e4 terms is ~1e-14, so 1e-8 leaves room but catches any missing bias (~1e-1).
    s = _subject()
    with s.explaining():
        tgt = as_target(None).resolve(s, s.forward(x64))
        fg = full_gradient(s, x64, tgt)
    assert len(fg["bias_terms"]) == 5  # conv1, bn1, conv2, bn2, fc
    assert fg["completeness_error"].max().item() < 1e-8
    # dropping the BatchNorm implicit biases breaks it: they are really needed
    partial = fg["input_term"].flatten(1).sum(1) + sum(t.flatten(1).sum(1) for n, t, m in fg["bias_terms"]
                                                      if not isinstance(m, nn.BatchNorm2d))
    assert (partial - fg["scores"]).abs().max().item() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no completeness warning on a piecewise-linear net
        e = sk.explain(s, x64, "fullgrad")
    assert e.maps.shape == (2, 32, 32) and (e.maps >= 0).all()
    assert max(e.extras["completeness_error"]) < 1e-8
    assert e.passes["backward"] == 1


class InplaceAfterBN(BNNet):
    def forward(self, x):
        y = self.bn1(self.conv1(x))
        y.mul_(2.0)  # an in-place op on the BatchNorm output, like ResNet's `out += identity`
        x = self.pool(self.act1(y))
        return self.fc(self.gap(self.act2(self.bn2(self.conv2(x)))).flatten(1))


def test_fullgrad_completeness_survives_inplace_ops(x64):
    # the bias-gradient must be taken at the BatchNorm output itself, not at the tensor an in-place
    # op turned it into (that would halve bn1's and conv1's terms here): same 1e-8 bound as above
    torch.manual_seed(0)
    s = Subject(_randomise_bn(InplaceAfterBN()).double().eval(), input_size=(32, 32), name="inplace")
    e = sk.explain(s, x64, "fullgrad")
    assert max(e.extras["completeness_error"]) < 1e-8


def test_fullgrad_warns_with_saturating_relu6(x64):
    # ReLU6 caps act as hidden biases: completeness must fail visibly (warning + error in extras)
    s = _subject(act=nn.ReLU6)
    with pytest.warns(RuntimeWarning, match="completeness"):
        e = sk.explain(s, x64 * 20, "fullgrad")
    assert max(e.extras["completeness_relative"]) > 1e-3


def test_fullgrad_map_without_biases_is_normalised_grad_x_input(x64):
    # no biases, no BN: the map is only psi(grad x input) summed over channels, with psi = |.| then
    # per-sample min-max over all dims (eps 1e-6); gradxinput is computed by another method
    s = _subject(bias=False, bn=False)
    e = sk.explain(s, x64, "fullgrad")
    gxi = sk.explain(s, x64, "gradxinput").attributions.double().abs()
    flat = gxi.flatten(1)
    flat = flat - flat.min(1, keepdim=True).values
    expected = (flat / (flat.max(1, keepdim=True).values + 1e-6)).view_as(gxi).sum(1)
    assert torch.allclose(e.maps.double(), expected, atol=1e-6)
    assert e.extras["spatial_bias_layers"] == 0


def test_fullgrad_agrees_with_pytorch_grad_cam_on_resnet18():
    # pytorch-grad-cam's FullGrad (per-channel min-max, bilinear resize) vs ours with
    # normalisation="grad_cam_lib": same definition, so Pearson >= 0.99 (measured 1 - 1e-12);
    # the official normalisation is a different map (measured ~0.9), so it must differ.
    from pytorch_grad_cam import FullGrad as LibFullGrad
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    s = sk.load_model("torchvision:resnet18:random")
    _randomise_bn(s.model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    before = s.state_fingerprint()
    ours = sk.explain(s, x, "fullgrad", normalisation="grad_cam_lib")
    official = sk.explain(s, x, "fullgrad")
    assert_same_state(before, s.state_fingerprint())
    assert max(ours.extras["completeness_relative"]) < 1e-3  # ReLU net in fp32
    classes = s.forward(x).argmax(1).tolist()
    with s.explaining():  # in-place ReLUs off, as during our own explanation
        lib = LibFullGrad(model=s.model, target_layers=[])
        ref = lib(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    for i in range(2):
        assert _pearson(ours.maps[i].numpy(), ref[i]) >= 0.99
        assert _pearson(official.maps[i].numpy(), ref[i]) < 0.999


# ------------------------------------------------------------------------------ NormGrad
def test_normgrad_virtual_identity(tiny, tiny_x):
    # a 1x1 conv with W = I inserted after act1 leaves the output unchanged, and its weight gradient
    # equals sum_u g(u) a(u)^T; NormGrad(u) is the Frobenius norm of the per-location term g(u) a(u)^T.
    model = tiny.model
    with tiny.explaining():
        target = as_target(None).resolve(tiny, tiny.forward(tiny_x))
        ident = nn.Conv2d(8, 8, 1, bias=False)
        with torch.no_grad():
            ident.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
        handle = model.act1.register_forward_hook(lambda m, i, o: ident(o))
        try:
            out = tiny.forward(tiny_x)
            target.score(out).sum().backward()
        finally:
            handle.remove()
        res = sk.engine.gradient_pass(tiny, tiny_x, target, layers=["act1"], input_grad=False)
    assert torch.allclose(out, res.logits, atol=1e-6)
    A, G = res.activations["act1"], res.gradients["act1"]
    outer = torch.einsum("bchw,bdhw->bhwcd", G, A)
    assert torch.allclose(ident.weight.grad.view(8, 8), outer.sum((0, 1, 2)), atol=1e-5)
    e = sk.explain(tiny, tiny_x, "normgrad", layer="act1")
    assert torch.allclose(e.raw, outer.flatten(3).norm(dim=3), rtol=1e-5, atol=1e-7)
    # selective variants: ||ReLU(a*g)|| and the clipped outer product (closed form vs explicit)
    sel = sk.explain(tiny, tiny_x, "normgrad", layer="act1", variant="selective_outer")
    assert torch.allclose(sel.raw, outer.clamp_min(0).flatten(3).norm(dim=3), rtol=1e-5, atol=1e-7)
    sel = sk.explain(tiny, tiny_x, "normgrad", layer="act1", variant="selective")
    assert torch.allclose(sel.raw, (A * G).clamp_min(0).norm(dim=1), rtol=1e-5, atol=1e-7)


def test_normgrad_on_gap_linear_head_relates_to_cam(tiny, tiny_x):
    # at the layer feeding GAP + linear, g(u) = w_c / (hw) is constant over u, so
    # NormGrad(u) = ||w_c|| ||a(u)|| / (hw) (class only scales it), and the scaling+sum extraction
    # ("linear approximation") is CAM / (hw).
    e = sk.explain(tiny, tiny_x, "normgrad", layer="act2")
    cls = tiny.forward(tiny_x).argmax(1)
    h, w = e.raw.shape[-2:]
    with torch.no_grad(), tiny.explaining(), tiny.capture(["act2"]) as cap:
        tiny.forward(tiny_x)
        A = cap.get("act2")
    wc = tiny.model.fc.weight[cls].detach()
    expected = wc.norm(dim=1).view(-1, 1, 1) * A.norm(dim=1) / (h * w)
    assert torch.allclose(e.raw, expected, rtol=1e-5, atol=1e-8)
    lin = sk.explain(tiny, tiny_x, "normgrad", layer="act2", variant="scaling_sum")
    cam = sk.explain(tiny, tiny_x, "cam", layer="act2", relu=False)
    assert torch.allclose(lin.raw, cam.raw / (h * w), rtol=1e-4, atol=1e-7)


def test_normgrad_multilayer_product_is_deterministic(tiny, tiny_x):
    # combination = product of per-layer maps, each upsampled and min-max normalised; the same call
    # twice and the layers in the other order give identical maps; one backward serves all layers.
    from saliencykit.methods.cam import normalize01

    a = sk.explain(tiny, tiny_x, "normgrad", layer=["act1", "act2"])
    b = sk.explain(tiny, tiny_x, "normgrad", layer=["act2", "act1"])
    c = sk.explain(tiny, tiny_x, "normgrad", layer=["act1", "act2"])
    assert torch.equal(a.maps, c.maps)
    assert torch.allclose(a.maps, b.maps, atol=1e-7)
    singles = [sk.explain(tiny, tiny_x, "normgrad", layer=n).maps for n in ("act1", "act2")]
    assert torch.allclose(a.maps, normalize01(singles[0]) * normalize01(singles[1]), atol=1e-6)
    assert a.passes["backward"] == 1
    with pytest.raises(SaliencyError, match="empty"):
        sk.explain(tiny, tiny_x, "normgrad", layer=[])
    with pytest.raises(SaliencyError, match="combination"):
        sk.explain(tiny, tiny_x, "normgrad", layer=["act1", "act2"], combine="median")


def test_normgrad_meta_saliency(tiny, tiny_x):
    # lr = 0 is the base method; lr > 0 changes the map; the weights are bit-identical afterwards
    before = tiny.state_fingerprint()
    base = sk.explain(tiny, tiny_x, "normgrad", layer="act1")
    zero = sk.explain(tiny, tiny_x, "normgrad", layer="act1", meta=True, meta_lr=0.0)
    step = sk.explain(tiny, tiny_x, "normgrad", layer="act1", meta=True, meta_lr=0.5)
    assert torch.allclose(base.maps, zero.maps, atol=1e-7)
    assert (base.maps - step.maps).abs().max() > 1e-4
    assert_same_state(before, tiny.state_fingerprint())
    assert step.passes["backward"] == 2  # the SGD step + the capture


# ------------------------------------------------------------------------------ LRP
def test_lrp_zero_is_gradient_times_input_and_conserves(x64):
    # on a bias-free ReLU/max-pool net LRP-0 == gradient x input exactly, and sum R_input == logit;
    # the epsilon rule (eps 1e-9) conserves up to eps-sized terms: relative 1e-6.
    s = _subject(bias=False, bn=False)
    r0 = sk.explain(s, x64, "lrp", composite="zero")
    gxi = sk.explain(s, x64, "gradxinput")
    assert torch.allclose(r0.attributions.double(), gxi.attributions.double(), rtol=1e-10, atol=1e-14)
    eps = sk.explain(s, x64, "lrp", composite="epsilon", epsilon=1e-9)
    score = torch.tensor(eps.extras["score"], dtype=torch.float64)
    total = eps.attributions.double().flatten(1).sum(1)
    assert torch.allclose(total, score, rtol=1e-6)
    # a contrast starts from +s_a on class a and -s_b on class b: the input relevance sums to s_a - s_b
    from saliencykit.targets import Contrast

    con = sk.explain(s, x64, "lrp", composite="epsilon", epsilon=1e-9, target=Contrast(0, vs=1))
    logits = s.forward(x64).detach()
    assert torch.allclose(con.attributions.double().flatten(1).sum(1), logits[:, 0] - logits[:, 1], rtol=1e-6)
    assert max(con.extras["conservation_error"]) < 1e-6
    # with biases (and merged BN) relevance leaks into them: conservation is not automatic
    s_b = _subject()
    eb = sk.explain(s_b, x64, "lrp", composite="epsilon", epsilon=1e-9)
    assert max(eb.extras["conservation_error"]) > 1e-3


def test_batchnorm_merge_round_trip():
    # merged model == original (float64, atol 1e-10) while merged; parameters, buffers, the missing
    # conv biases and BN eps restored bit-exactly afterwards, also after an exception inside.
    s = sk.load_model("torchvision:resnet18:random")
    model = _randomise_bn(s.model).double().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    before = s.state_fingerprint()
    ref = model(x)
    with merged_batchnorm(model, x[:1]) as pairs:
        assert len(pairs) == 20  # every BatchNorm of resnet18 follows a convolution
        merged_out = model(x)
        assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert torch.allclose(merged_out, ref, atol=1e-10)
    assert_same_state(before, s.state_fingerprint())
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(RuntimeError, match="boom"):
        with merged_batchnorm(model, x[:1]):
            raise RuntimeError("boom")
    assert_same_state(before, s.state_fingerprint())
    assert torch.equal(model(x), ref)


class PreBNSkip(BNNet):
    def forward(self, x):
        z = self.conv1(x)
        y = self.act1(self.bn1(z)) + z  # the conv output feeds its BatchNorm and a skip
        x = self.pool(y)
        return self.fc(self.gap(self.act2(self.bn2(self.conv2(x)))).flatten(1))


def test_batchnorm_merge_refuses_shared_layer_output(x64):
    # merging bn1 into conv1 would change the skip's input: a clear error, model left as found
    torch.manual_seed(0)
    s = Subject(_randomise_bn(PreBNSkip()).double().eval(), input_size=(32, 32), name="preskip")
    before = s.state_fingerprint()
    with pytest.raises(SaliencyError, match="canonize=False"):
        sk.explain(s, x64, "lrp")
    assert_same_state(before, s.state_fingerprint())
    e = sk.explain(s, x64, "lrp", canonize=False)
    assert torch.isfinite(e.maps).all()


def test_lrp_zplus_non_negative(x64):
    # z+ with R_out >= 0 (a positive logit) gives non-negative relevance everywhere, for any input sign
    s = _subject()
    logits = s.forward(x64)
    cls = logits.argmax(1)
    assert (logits.max(1).values > 0).all()  # precondition of the property
    e = sk.explain(s, x64, "lrp", composite="zplus", target=cls.tolist())
    assert (e.attributions >= -1e-12).all() and e.attributions.sum() > 0
    # alpha2beta1 is not sign-constrained: it must produce negative relevance somewhere
    ab = sk.explain(s, x64, "lrp", composite="alpha_beta", target=cls.tolist())
    assert (ab.attributions < 0).any()


@pytest.mark.parametrize("arch,composites", [
    ("resnet18", ("epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2beta1")),
    ("bnnet", ("epsilon_plus_flat", "epsilon_gamma_box")),
])
def test_lrp_agrees_with_zennit(arch, composites):
    # Zennit with its canonizers is the reference for these composites. We split sums and average
    # pooling without Zennit's 1e-6 stabiliser, so allow 1e-3 of the largest relevance (measured
    # <= 2.5e-4) and require Pearson >= 0.9999 (measured 1 - 1e-9).
    zennit = pytest.importorskip("zennit")
    from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer

    # resnet18: skip additions + BN merging; bnnet: sequential conv-BN-ReLU, max- and average pooling
    s = sk.load_model("torchvision:resnet18:random") if arch == "resnet18" else _subject()
    model = _randomise_bn(s.model).double().eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    canon = ResNetCanonizer if arch == "resnet18" else SequentialMergeBatchNorm
    low, high = s.normalize_pixels(torch.zeros_like(x)), s.normalize_pixels(torch.ones_like(x))
    ref_composites = {"epsilon_plus_flat": lambda: EpsilonPlusFlat(canonizers=[canon()]),
                      "epsilon_gamma_box": lambda: EpsilonGammaBox(low=low, high=high, canonizers=[canon()]),
                      "epsilon_alpha2beta1": lambda: EpsilonAlpha2Beta1(canonizers=[canon()])}
    for name in composites:
        with s.explaining():
            xin = x.clone().requires_grad_(True)
            with ref_composites[name]().context(model) as m:
                out = m(xin)
                onehot = torch.zeros_like(out).scatter_(1, out.argmax(1, keepdim=True), 1.0)
                ref, = torch.autograd.grad(out, xin, grad_outputs=onehot * out)
        ours = sk.explain(s, x, "lrp", composite=name).attributions.double()
        assert torch.allclose(ours, ref, atol=1e-3 * ref.abs().max().item()), name
        assert _pearson(ours.numpy(), ref.numpy()) >= 0.9999, name
    assert zennit is not None


def test_lrp_rules_override_first_layer(x64):
    # EpsilonPlusFlat with conv1 set to z+ is EpsilonPlus (conv z+, linear epsilon): same relevance
    s = _subject()
    a = sk.explain(s, x64, "lrp", composite="epsilon_plus_flat", rules={"conv1": "zplus"})
    b = sk.explain(s, x64, "lrp", composite="epsilon_plus")
    c = sk.explain(s, x64, "lrp", composite="epsilon_plus_flat")
    assert torch.allclose(a.attributions, b.attributions, rtol=1e-9, atol=1e-15)
    assert not torch.allclose(a.attributions, c.attributions, atol=1e-6)


def test_lrp_bad_parameters_and_state(tiny, tiny_x):
    before = tiny.state_fingerprint()
    with pytest.raises(SaliencyError, match="composite"):
        sk.explain(tiny, tiny_x, "lrp", composite="nope")
    with pytest.raises(SaliencyError, match="alpha - beta = 1"):
        sk.explain(tiny, tiny_x, "lrp", composite="alpha_beta", alpha=3.0, beta=1.0)
    with pytest.raises(SaliencyError, match="not a Conv/Linear layer"):
        sk.explain(tiny, tiny_x, "lrp", rules={"act1": "epsilon"})
    with pytest.raises(SaliencyError, match="first layer"):
        sk.explain(tiny, tiny_x, "lrp", composite="epsilon", rules={"conv2": "flat"})
    with pytest.raises(SaliencyError, match="normalisation"):
        sk.explain(tiny, tiny_x, "fullgrad", normalisation="other")
    with pytest.raises(SaliencyError, match="variant"):
        sk.explain(tiny, tiny_x, "normgrad", variant="other")
    assert_same_state(before, tiny.state_fingerprint())


# ------------------------------------------------------------------------------ architectures
ARCHS = ["resnet18", "vgg11", "densenet121", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"]
PIECEWISE_LINEAR = {"resnet18", "vgg11", "densenet121"}


@pytest.mark.parametrize("arch", ARCHS)
def test_runs_on_architectures(arch):
    # every method gives a finite [1,64,64] map and leaves the model as found; FullGrad completeness
    # holds on the ReLU nets (no warning); LRP refuses layers without rules unless asked to pass them
    s = sk.load_model(f"torchvision:{arch}:random")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = s.state_fingerprint()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fg = sk.explain(s, x, "fullgrad")
    fg_warned = any("completeness" in str(w.message) for w in caught)
    if arch in PIECEWISE_LINEAR:
        assert not fg_warned and max(fg.extras["completeness_relative"]) < 1e-3
    ng = sk.explain(s, x, "normgrad")
    if arch in PIECEWISE_LINEAR:
        lrp = sk.explain(s, x, "lrp")
    else:
        with pytest.raises(SaliencyError, match="not defined for"):
            sk.explain(s, x, "lrp")
        lrp = sk.explain(s, x, "lrp", unsupported="gradient")
        assert lrp.extras["gradient_through"]
    for e in (fg, ng, lrp):
        assert e.maps.shape == (1, 64, 64) and torch.isfinite(e.maps).all()
    assert_same_state(before, s.state_fingerprint())


@pytest.mark.parametrize("method", ["fullgrad", "normgrad", "lrp"])
def test_chelsea_cat_box(lite0, chelsea, method):
    # the pretrained model's map puts more positive mass per unit area inside the cat box than outside
    x = lite0.preprocess(chelsea)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FullGrad warns on Lite0: ReLU6 saturation breaks completeness
        e = sk.explain(lite0, x, method)
    box = data.box_mask("chelsea", tuple(x.shape[-2:]), "cat")
    pos = e.maps[0].clamp_min(0)
    assert pos[box].mean() > pos[~box].mean()


class TanhNet(nn.Module):
    """conv-tanh-conv-sigmoid-GAP-linear: element-wise activations for which LRP has no rule."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.Tanh()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.act2 = nn.Sigmoid()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.pool(self.act2(self.conv2(self.act1(self.conv1(x))))).flatten(1))


def test_lrp_identity_passes_elementwise_activations_like_zennit(x64):
    # unsupported="identity" is Zennit's Pass rule on Tanh/Sigmoid (relevance handed through
    # unchanged) with epsilon on every conv/linear layer and the Norm rule on the average pool (what
    # our value x gradient form gives a pool): the same relevance in float64, up to the stabilisers
    # (ours: none on the pool, Zennit's Norm: 1e-6 on pooled values ~0.5, i.e. ~2e-6 relative;
    # measured 2.0e-6 of the largest relevance), hence 1e-5.
    pytest.importorskip("zennit")
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon, Norm, Pass
    from zennit.types import AvgPool, Convolution, Linear

    torch.manual_seed(1)
    s = Subject(TanhNet().double().eval(), input_size=(32, 32), name="tanhnet")
    with pytest.raises(SaliencyError, match="identity"):
        sk.explain(s, x64, "lrp", composite="epsilon")
    ours = sk.explain(s, x64, "lrp", composite="epsilon", epsilon=1e-6, unsupported="identity", target=2)
    composite = LayerMapComposite(layer_map=[((nn.Tanh, nn.Sigmoid), Pass()), (Convolution, Epsilon(1e-6)),
                                             (Linear, Epsilon(1e-6)), (AvgPool, Norm())])
    xin = x64.clone().requires_grad_(True)
    with composite.context(s.model) as m:
        out = m(xin)
        onehot = torch.zeros_like(out)
        onehot[:, 2] = 1
        ref, = torch.autograd.grad(out, xin, grad_outputs=onehot * out)
    assert ours.attributions.dtype == torch.float64
    assert torch.allclose(ours.attributions, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert ours.extras["identity_through"] == ["Sigmoid", "Tanh"]
    # the plain-gradient pass gives another answer (it scales relevance by z f'(z) / f(z))
    grad = sk.explain(s, x64, "lrp", composite="epsilon", epsilon=1e-6, unsupported="gradient", target=2)
    assert not torch.allclose(grad.attributions, ref, rtol=1e-3)
    # identity is for element-wise activations only
    s_ln = Subject(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.LayerNorm(4 * 30 * 30),
                                 nn.Linear(4 * 30 * 30, 3)).double(), input_size=(32, 32), name="ln")
    with pytest.raises(SaliencyError, match="not element-wise"):
        sk.explain(s_ln, x64, "lrp", unsupported="identity")
    with pytest.raises(SaliencyError, match="'identity'"):
        sk.explain(s, x64, "lrp", unsupported="skip")
