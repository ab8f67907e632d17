"""Blur IG, Guided IG, CF-CAM, IIA and DIX: identities on tiny
models, invariances, determinism, and the meaning of the map on a photo."""
import numpy as np
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import data, methods
from saliencykit.errors import SaliencyError
from saliencykit.methods.base import Context
from saliencykit.filters import gaussian_blur, gaussian_kernels, separable
from saliencykit.methods.gradient import make_baseline
from saliencykit.methods.paths import integrated_gradients
from saliencykit.targets import Class

from tests.conftest import TinyCNN
from state import assert_same_state  # noqa: E402  (tests/ is on sys.path)


def smooth_subject(seed=0):
    """Float64 TinyCNN with softplus: smooth, so path integrals converge without kinks."""
    torch.manual_seed(seed)
    model = TinyCNN(act=nn.Softplus).double()
    return sk.Subject(model, input_size=(32, 32), name="smooth")


def x64(b=2, seed=1, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g, dtype=torch.float64)


def _scores(subject, x, cls):
    with torch.no_grad():
        return subject.model(x)[torch.arange(x.shape[0]), cls]


# --------------------------------------------------------------------------- Blur IG
def test_blur_ig_completeness_with_small_grad_step():
    # Path-integral completeness: sum(attr) = s(x) - s(G_sigma_max * x). With a finite-difference
    # step of 1e-4 the error here is ~0.05 % (the default 0.01 gives ~1.5 %); 1 % tolerance.
    s, x = smooth_subject(), x64()
    cls = [1, 3]
    e = sk.explain(s, x, "blur_ig", target=cls, max_sigma=8.0, steps=60, grad_step=1e-4)
    total = e.attributions.double().reshape(2, -1).sum(1)
    delta = _scores(s, x, torch.tensor(cls)) - _scores(s, gaussian_blur(x, 8.0), torch.tensor(cls))
    rel = ((total - delta).abs() / delta.abs()).max().item()
    assert rel < 0.01, rel
    # the method's own report of the same identity agrees (float32 score path, so 1e-4 abs)
    assert torch.allclose(torch.tensor(e.extras["completeness_error"]), (total - delta).float(), atol=1e-4)


def test_blur_ig_exact_derivative():
    # The exact d(G_sigma * x)/d sigma agrees with a central difference of the blur (same
    # truncation radius, float64: O(h^2) ~ 1e-8 relative) and gives the same completeness.
    x = x64(1, seed=3)
    h, sigma = 1e-4, 1.7
    from saliencykit.methods.paths import blur_derivative

    def blur(sig):
        k, _ = gaussian_kernels(sig, 7, x.dtype, x.device)
        return separable(x, k, k)

    central = (blur(sigma + h) - blur(sigma - h)) / (2 * h)
    torch.testing.assert_close(blur_derivative(x, sigma, None), central, rtol=1e-6, atol=1e-8)
    s = smooth_subject()
    e = sk.explain(s, x, "blur_ig", target=2, max_sigma=6.0, steps=50, grad_step=None)
    delta = _scores(s, x, torch.tensor([2])) - _scores(s, gaussian_blur(x, 6.0), torch.tensor([2]))
    assert abs(e.attributions.double().sum().item() - delta.item()) < 0.01 * abs(delta.item())


def test_blur_ig_zero_sigma_and_passes(tiny, tiny_x):
    # sigma_max = 0: the path is a point, so every attribution is exactly zero
    e0 = sk.explain(tiny, tiny_x, "blur_ig", max_sigma=0.0, steps=5)
    assert torch.count_nonzero(e0.attributions) == 0
    # one backward per path step per image (counted), same numbers for any batch size
    e1 = sk.explain(tiny, tiny_x, "blur_ig", max_sigma=4.0, steps=6, batch_size=4)
    e2 = sk.explain(tiny, tiny_x, "blur_ig", max_sigma=4.0, steps=6, batch_size=32)
    assert e1.passes["backward"] == 6
    torch.testing.assert_close(e1.attributions, e2.attributions, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- Guided IG
def test_guided_ig_max_dist_zero_is_left_riemann_ig():
    # max_dist = 0 confines the path to the straight line: each step moves every feature by
    # (x - x')/S with the gradient taken at the step's start = IG with the left Riemann rule.
    s, x = smooth_subject(), x64()
    e = sk.explain(s, x, "guided_ig", target=[0, 2], steps=16, max_dist=0.0, baseline="black")
    with s.explaining():
        ctx = Context(s, x)
        tgt = ctx.resolve(Class([0, 2]))
        ig = integrated_gradients(ctx, tgt, x, make_baseline(s, x, "black"), 16, "riemann_left")
    # identical arithmetic up to the float32 storage of Explanation.attributions
    torch.testing.assert_close(e.attributions.double(), ig, rtol=1e-6, atol=1e-10)


def test_guided_ig_completeness_and_path_differs_from_ig():
    # The adaptive path still runs from x' to x: sum(attr) -> s(x) - s(x') as steps grow;
    # left-Riemann-type sums on this smooth net are within ~1.5 % at 60 steps, tolerance 3 %.
    s, x = smooth_subject(), x64()
    cls = torch.tensor([1, 4])
    e = sk.explain(s, x, "guided_ig", target=cls.tolist(), steps=60, max_dist=0.1, fraction=0.25)
    delta = _scores(s, x, cls) - _scores(s, s.black(x), cls)
    total = e.attributions.reshape(2, -1).sum(1)
    rel = ((total - delta).abs() / delta.abs()).max().item()
    assert rel < 0.03, rel
    # and the guided path is not the straight one: the attribution differs from IG's
    e_ig = sk.explain(s, x, "guided_ig", target=cls.tolist(), steps=60, max_dist=0.0)
    assert (e.attributions - e_ig.attributions).abs().max() > 1e-3 * e_ig.attributions.abs().max()


# --------------------------------------------------------------------------- IIA / DIX
def _gap_head_terms(subject, x, layer, cls):
    """For a GAP+linear head after `layer`: dS/dr = w_c / hw for every r, so ReLU(dS/dr * beta r)
    = beta ReLU(w_c r) / hw (beta > 0). Returns the activations' head term per input [N,h,w]."""
    with subject.capture([layer]) as cap, torch.no_grad():
        subject.forward(x)
        a = cap.get(layer)
    w = subject.model.fc.weight[cls].view(x.shape[0], -1, 1, 1)
    return (w * a).clamp_min(0).sum(1) / (a.shape[-1] * a.shape[-2])


def test_iia_iterated_integral_on_gap_head():
    # After act2 the head is linear (GAP + fc), so the inner (representation) integral is exact:
    # mean_j beta_j = (T+1)/(2T) for the right Riemann rule, and the outer integral is the mean of
    # the head term over the input path x_k = x' + (k/T)(x - x'), k = 1..T (here x' = 0).
    s, x = smooth_subject(), x64()
    T, cls = 4, torch.tensor([2, 0])
    e = sk.explain(s, x, "iia", target=cls.tolist(), layer="act2", steps=T, baseline="mean")
    expected = sum(_gap_head_terms(s, (k / T) * x, "act2", cls) for k in range(1, T + 1)) / T
    expected = expected * (T + 1) / (2 * T)
    torch.testing.assert_close(e.raw.double(), expected, rtol=1e-5, atol=1e-9)
    assert e.passes["backward"] == T * T


def test_iia_one_step_is_relu_grad_times_activation(tiny, tiny_x):
    # T = 1 (right rule): alpha = beta = 1, i.e. ReLU(dS/da * a) at the clean input, channel-summed;
    # at act1 the rest of the network (conv, ReLU, GAP, fc) is non-linear.
    e = sk.explain(tiny, tiny_x, "iia", target=[1, 3], layer="act1", steps=1)
    with tiny.explaining():
        ctx = Context(tiny, tiny_x)
        res = ctx.capture(["act1"], ctx.resolve(Class([1, 3])))
    expected = (res.gradients["act1"] * res.activations["act1"]).clamp_min(0).sum(1)
    torch.testing.assert_close(e.raw, expected, rtol=1e-5, atol=1e-7)


def test_dix_on_gap_head_and_min_baseline():
    # Zero baseline: a_t = (t/T) a, head linear => mean over t = 0..T of (t/T) ReLU(w a)/hw
    # = ReLU(w a)/hw / 2 exactly; the t = 0 pass is skipped (its term is 0): T backward passes.
    s, x = smooth_subject(), x64()
    cls = torch.tensor([1, 1])
    e = sk.explain(s, x, "dix", target=cls.tolist(), layer="act2", steps=4)
    torch.testing.assert_close(e.raw.double(), _gap_head_terms(s, x, "act2", cls) / 2, rtol=1e-5, atol=1e-9)
    assert e.passes["backward"] == 4
    # channel-minimum baseline: all T+1 points, the map differs and stays non-negative
    e_min = sk.explain(s, x, "dix", target=cls.tolist(), layer="act2", steps=4, baseline="min")
    assert e_min.passes["backward"] == 5 and e_min.maps.min() >= 0
    assert not torch.allclose(e_min.raw, e.raw)
    assert methods.available()["dix"]["experimental"] is True
    assert methods.available()["iia"]["experimental"] is False


@pytest.mark.parametrize("method", ["iia", "dix"])
def test_iia_dix_shapes_determinism(tiny, tiny_x, method):
    e1 = sk.explain(tiny, tiny_x, method, layer="act2", steps=2)
    e2 = sk.explain(tiny, tiny_x, method, layer="act2", steps=2)
    assert e1.maps.shape == (2, 32, 32) and e1.raw.shape == (2, 16, 16) and e1.layer == "act2"
    assert torch.equal(e1.maps, e2.maps) and e1.maps.min() >= 0
    # chunking the path rows (3 per pass) accumulates the same sums per example
    e3 = sk.explain(tiny, tiny_x, method, layer="act2", steps=2, batch_size=3)
    torch.testing.assert_close(e3.raw, e1.raw, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method,params", [("iia", {"steps": 3}), ("dix", {"steps": 4})])
def test_iia_dix_cat_box_on_chelsea(lite0, chelsea, method, params):
    # The meaning of the map: on chelsea (top-1 is a cat class) the positive mass per unit area
    # inside the hand-drawn cat box exceeds the mass per unit area outside it.
    x = lite0.preprocess(chelsea)
    e = sk.explain(lite0, x, method, **params)
    box = data.box_mask("chelsea", tuple(x.shape[-2:]), "cat")
    m = e.maps[0].clamp_min(0)
    inside, outside = m[box].mean().item(), m[~box].mean().item()
    assert inside > outside, (inside, outside)


# --------------------------------------------------------------------------- all methods
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_every_method_runs_on_torchvision_models(arch):
    torch.manual_seed(0)
    s = sk.load_model(f"torchvision:{arch}:random")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = s.state_fingerprint()
    params = {"blur_ig": {"steps": 3, "max_sigma": 5.0}, "guided_ig": {"steps": 3}, "cf_cam": {},
              "iia": {"steps": 2}, "dix": {"steps": 2}}
    out = sk.explain(s, x, list(params), params=params)
    for name, e in out.items():
        assert e.maps.shape == (1, 64, 64), name
        assert torch.isfinite(e.maps).all(), name
        assert e.passes["forward"] > 0, name
    assert_same_state(before, s.state_fingerprint())


def test_bad_parameters(tiny, tiny_x):
    bad = [("blur_ig", {"steps": 0}), ("blur_ig", {"max_sigma": -1.0}), ("blur_ig", {"grad_step": 0.0}),
           ("guided_ig", {"fraction": 0.0}), ("guided_ig", {"max_dist": 2.0}), ("guided_ig", {"steps": -3}),
           ("cf_cam", {"spatial_sigma": 0.0}), ("iia", {"steps": 0}), ("iia", {"upsample": "nearest"}),
           ("dix", {"baseline": "blur"}), ("cf_cam", {"layer": []})]
    for method, params in bad:
        with pytest.raises(SaliencyError):
            sk.explain(tiny, tiny_x, method, **params)


def test_shared_module_uses_last_call_and_unused_layer_errors(tiny_x):
    # A module run twice per forward is replaced at its last call (as layer capture selects):
    # with a linear head after it the one-step IIA equals ReLU(dS/da * a) of that call.
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.unused = nn.Conv2d(3, 3, 1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.conv(self.conv(x)).mean((2, 3)))

    s = sk.Subject(Twice())
    e = sk.explain(s, tiny_x, "iia", target=1, layer="conv", steps=1)
    with torch.no_grad():
        a = s.model.conv(s.model.conv(tiny_x))
    expected = (s.model.fc.weight[1].view(1, -1, 1, 1) * a / 1024).clamp_min(0).sum(1)
    torch.testing.assert_close(e.raw, expected, rtol=1e-5, atol=1e-8)
    # a layer that never runs is an error, and the model is left as found
    before = s.state_fingerprint()
    with pytest.raises(SaliencyError, match="not called"):
        sk.explain(s, tiny_x, "dix", layer="unused", steps=1)
    assert_same_state(before, s.state_fingerprint())


# --------------------------------------------------------------------------- IIA, ViT form
def tiny_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2,
                                                             num_heads=3, num_classes=5)
    return sk.Subject(model, input_size=(32, 32), name="tiny-vit")


def test_iia_attention_one_step_is_rollout_of_relu_grad_attention(tiny_x):
    # T = 1 (right rule): one pass at x with beta = 1, so IIA is the rollout of ReLU(dS/dA * A):
    # head mean, + I, row-normalised, product over blocks, CLS row on the 4x4 patch grid.
    from saliencykit.tokens import AttentionTap

    s = tiny_vit()
    e = sk.explain(s, tiny_x, "iia", target=[1, 3], steps=1)
    assert e.extras["path"] == "attention" and e.raw.shape == (2, 4, 4) and e.maps.shape == (2, 32, 32)
    with s.explaining(), AttentionTap(s.model) as tap, torch.enable_grad():
        logits = s.model(tiny_x.clone().requires_grad_(True))
        attn = list(tap.attn)
        grads = torch.autograd.grad(logits[[0, 1], [1, 3]].sum(), attn)
    R = torch.eye(17, dtype=torch.float64).expand(2, 17, 17)
    for a, g in zip(attn, grads):
        m = (g * a).clamp_min(0).double().mean(1) + torch.eye(17, dtype=torch.float64)
        R = (m / m.sum(-1, keepdim=True)) @ R
    torch.testing.assert_close(e.raw.double(), R[:, 0, 1:].reshape(2, 4, 4), rtol=1e-5, atol=1e-7)


def test_iia_attention_scaling_takes_effect_and_is_deterministic(tiny_x):
    # The last block's attention is scaled by beta in the pass: beta = 0.5 and beta = 1 give different
    # gradients at the earlier block (an unscaled pass would give identical ones).
    from saliencykit.methods.paths import iia_attention

    s = tiny_vit()
    with s.explaining():
        ctx = Context(s, tiny_x[:1])
        tgt = ctx.resolve(Class(2))
        rows, w = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.float64)
        e_half = iia_attention(ctx, tgt, tiny_x[:1], rows, torch.tensor([0.5]), w)
        e_one = iia_attention(ctx, tgt, tiny_x[:1], rows, torch.tensor([1.0]), w)
    assert not torch.allclose(e_half[0], e_one[0])
    e1 = sk.explain(s, tiny_x, "iia", steps=2)
    e2 = sk.explain(s, tiny_x, "iia", steps=2)
    assert torch.equal(e1.maps, e2.maps) and e1.passes["backward"] == 4 and e1.maps.min() >= 0
    # the representation form stays available on a ViT (token layer on the patch grid)
    e3 = sk.explain(s, tiny_x, "iia", steps=1, path="representation")
    assert e3.extras["path"] == "representation" and e3.raw.shape == (2, 4, 4)
    with pytest.raises(SaliencyError):
        sk.explain(sk.Subject(TinyCNN()), tiny_x, "iia", path="attention")


# --------------------------------------------------------------------------- agreement with PAIR saliency
def _pair_model(subject, cls):
    """PAIR's call_model_function: channels-last batches -> gradients of logit `cls` (float64)."""
    from saliency.core.base import INPUT_OUTPUT_GRADIENTS

    def call(x_batch, call_model_args=None, expected_keys=None):
        x = torch.as_tensor(np.asarray(x_batch), dtype=torch.float64).permute(0, 3, 1, 2).requires_grad_(True)
        out = subject.model(x)[:, cls].sum()
        (g,) = torch.autograd.grad(out, x)
        return {INPUT_OUTPUT_GRADIENTS: g.permute(0, 2, 3, 1).detach().numpy()}

    return call


def test_guided_ig_agrees_with_pair(monkeypatch):
    # Same algorithm, both in float64 on the same smooth model: agreement to rounding.
    core = pytest.importorskip("saliency.core")
    quantile = np.quantile  # PAIR 0.2.1 calls np.quantile(..., interpolation=), removed in NumPy 2

    def compat(a, q, *args, interpolation=None, **kw):
        return quantile(a, q, *args, method=interpolation or kw.pop("method", "linear"), **kw)

    monkeypatch.setattr(np, "quantile", compat)
    s, x = smooth_subject(), x64(1, seed=4)
    e = sk.explain(s, x, "guided_ig", target=2, steps=20, max_dist=0.05, fraction=0.25, baseline="mean")
    ref = core.GuidedIG().GetMask(x[0].permute(1, 2, 0).numpy(), _pair_model(s, 2), x_baseline=np.zeros((32, 32, 3)),
                                  x_steps=20, fraction=0.25, max_dist=0.05)
    ref = torch.from_numpy(ref).permute(2, 0, 1)
    torch.testing.assert_close(e.attributions[0].double(), ref, rtol=1e-5, atol=1e-9)


def test_blur_ig_agrees_with_pair():
    # PAIR blurs with SciPy (truncation radius int(4 sigma + 0.5), ours ceil(4 sigma)): the dropped
    # kernel tails are < e^-8 of the centre: measured max difference 1.2e-4 of the map's scale.
    core = pytest.importorskip("saliency.core")
    s, x = smooth_subject(), x64(1, seed=5)
    e = sk.explain(s, x, "blur_ig", target=0, max_sigma=4.0, steps=20, grad_step=0.01)
    ref = core.BlurIG().GetMask(x[0].permute(1, 2, 0).numpy(), _pair_model(s, 0), max_sigma=4.0, steps=20,
                                grad_step=0.01, batch_size=20)
    ref = torch.from_numpy(ref).permute(2, 0, 1)
    ours = e.attributions[0].double()
    assert (ours - ref).abs().max() < 2e-3 * ref.abs().max()
    assert np.corrcoef(ours.flatten().numpy(), ref.flatten().numpy())[0, 1] > 0.999
