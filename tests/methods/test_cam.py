"""CAM family: identities on tiny models with known structure, pass sharing,
agreement with pytorch-grad-cam and torchcam, and coverage of common torchvision architectures."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import SaliencyError, Subject
from saliencykit.engine import upsample
from saliencykit.methods.base import explain
from saliencykit.methods.cam import cf_cam_map, normalize01
from tests.conftest import TinyCNN

GRAD_CAMS = ["gradcam", "gradcam_pp", "hirescam", "xgradcam", "layercam"]
ALL_CAMS = ["cam", "gradcam", "gradcam_pp", "smooth_gradcam_pp", "hirescam", "xgradcam", "layercam",
            "scorecam", "eigencam"]


# ----------------------------------------------------------------------------- helpers
def acts_of(model, x, layer):
    """The output of `layer` on `x`, captured independently of saliencykit."""
    store = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: store.append(o.detach()))
    try:
        with torch.no_grad():
            model.eval()
            logits = model(x)
    finally:
        handle.remove()
    return store[-1], logits


def pearson(a, b):
    a = torch.as_tensor(np.asarray(a)).double().flatten(1)
    b = torch.as_tensor(np.asarray(b)).double().flatten(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


class FlatCNN(nn.Module):
    """conv-relu-conv-relu -> flatten -> linear: no global pooling."""

    def __init__(self, classes=5, size=32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, stride=2)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(6 * (size // 2) ** 2, classes)

    def forward(self, x):
        return self.fc(self.act2(self.conv2(self.act1(self.conv1(x)))).flatten(1))


# ------------------------------------------------------------------ identities (GAP head)
def test_cam_gradcam_hirescam_xgradcam_identities_on_gap_head(tiny, tiny_x):
    # On conv -> GAP -> linear the gradient at the last feature map is W_c / (h w) at every position,
    # so (pre-ReLU) CAM = hw * Grad-CAM = hw * HiResCAM and XGrad-CAM = Grad-CAM.
    # float32 sums of 16 channels: 1e-5 relative tolerance.
    tgt = [1, 3]
    r = explain(tiny, tiny_x, ["cam", "gradcam", "hirescam", "xgradcam"], target=tgt, layer="act2", relu=False)
    cam = r["cam"].raw
    h, w = cam.shape[-2:]
    scale = cam.abs().max()
    tol = dict(rtol=1e-5, atol=1e-5 * float(scale))
    assert torch.allclose(r["hirescam"].raw * h * w, cam, **tol)
    assert torch.allclose(r["gradcam"].raw * h * w, cam, **tol)
    assert torch.allclose(r["xgradcam"].raw, r["gradcam"].raw, **tol)
    # CAM itself against its formula M_c = sum_k W_ck A_k with A captured by an independent hook
    A, logits = acts_of(tiny.model, tiny_x, "act2")
    W = tiny.model.fc.weight.detach()
    expect = torch.einsum("bk,bkhw->bhw", W[tgt], A)
    assert torch.allclose(cam, expect, **tol)
    # XGrad-CAM conservation: the pre-ReLU map sums to s_c - b_c
    b = tiny.model.fc.bias.detach()
    s = logits[torch.arange(2), tgt] - b[tgt]
    assert torch.allclose(r["xgradcam"].raw.sum((1, 2)), s, rtol=1e-5, atol=1e-6)
    # and the maps depend on the class (a target-insensitive bug would pass the identities above)
    other = explain(tiny, tiny_x, "gradcam", target=[0, 0], layer="act2", relu=False).raw
    assert not torch.allclose(other, r["gradcam"].raw, atol=1e-3 * float(scale))


def test_hirescam_conserves_score_on_flatten_head_and_gradcam_does_not():
    # Flatten -> linear: the gradient varies over positions, sum_ij (G*A) = s_c - b_c exactly (linear head),
    # while Grad-CAM's spatially averaged weights break it. float32: 1e-4 relative.
    torch.manual_seed(0)
    subject = Subject(FlatCNN(), input_size=(32, 32))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    r = explain(subject, x, ["hirescam", "gradcam"], target=[2, 4], layer="act2", relu=False)
    _, logits = acts_of(subject.model, x, "act2")
    s = logits[torch.arange(2), [2, 4]] - subject.model.fc.bias.detach()[[2, 4]]
    assert torch.allclose(r["hirescam"].raw.sum((1, 2)), s, rtol=1e-4, atol=1e-5)
    assert (r["gradcam"].raw.sum((1, 2)) - s).abs().max() > 1e-2 * s.abs().max()
    # CAM refuses this model: there is no global-average-pool + linear head
    with pytest.raises(SaliencyError, match="global-average-pool"):
        explain(subject, x, "cam", layer="act2")


def test_gradcam_pp_closed_form_on_gap_head(tiny, tiny_x):
    # Spatially constant g_k = W_ck/(hw): alpha = 1/(2 + g_k sum A_k), so
    # w_k = hw ReLU(g_k) / (2 + g_k sum_ab A_kab) and M = ReLU(sum_k w_k A_k).
    tgt = [4, 0]
    e = explain(tiny, tiny_x, "gradcam_pp", target=tgt, layer="act2")
    A, _ = acts_of(tiny.model, tiny_x, "act2")
    A = A.double()
    hw = A.shape[-2] * A.shape[-1]
    g = tiny.model.fc.weight.detach().double()[tgt] / hw                 # [B,C]
    wk = hw * g.clamp_min(0) / (2 + g * A.sum((2, 3)))
    expect = torch.einsum("bk,bkhw->bhw", wk, A).clamp_min(0)
    assert e.raw.min() >= 0
    assert torch.allclose(e.raw.double(), expect, rtol=1e-5, atol=1e-6 * float(expect.abs().max()))


def test_layercam_equals_hirescam_when_gradients_are_nonnegative(tiny, tiny_x):
    # With nonnegative classifier weights the gradient at conv2 (pre-ReLU) is W_c/hw * 1[conv2 > 0] >= 0,
    # so ReLU(G) = G and LayerCAM computes exactly HiResCAM's sum: compared bit for bit.
    with torch.no_grad():
        tiny.model.fc.weight.abs_()
    r = explain(tiny, tiny_x, ["layercam", "hirescam"], target=[1, 2], layer="conv2")
    assert torch.equal(r["layercam"].raw, r["hirescam"].raw)
    # where gradients take both signs they differ (the check above can fail)
    with torch.no_grad():
        tiny.model.fc.weight[1].neg_()
    r = explain(tiny, tiny_x, ["layercam", "hirescam"], target=[1, 2], layer="conv1")
    assert not torch.allclose(r["layercam"].raw[0], r["hirescam"].raw[0])


def test_eigencam_is_first_principal_component_and_class_agnostic(tiny, tiny_x):
    # Eigen-CAM = sigma1 u1 of the position x channel matrix with centred columns,
    # compared with numpy's SVD (float64) up to the SVD sign; float32 activations: 1e-4 relative.
    e = explain(tiny, tiny_x, "eigencam", layer="conv2", relu=False, target=[0, 1])
    A, _ = acts_of(tiny.model, tiny_x, "conv2")
    for i in range(A.shape[0]):
        X = A[i].double().numpy().reshape(A.shape[1], -1).T
        X = X - X.mean(0)
        U, S, _ = np.linalg.svd(X, full_matrices=False)
        ref = torch.from_numpy((S[0] * U[:, 0]).reshape(A.shape[-2:]))
        got = e.raw[i].double()
        err = min((got - ref).abs().max(), (got + ref).abs().max())
        assert err <= 1e-4 * ref.abs().max()
        # sign correction: the component correlates positively with the channel-mean activation
        assert (got.flatten() - got.mean()) @ (A[i].double().mean(0).flatten() - A[i].mean()) > 0
    other = explain(tiny, tiny_x, "eigencam", layer="conv2", relu=False, target=[4, 2])
    assert torch.equal(other.maps, e.maps)


def test_smooth_gradcam_pp_one_clean_sample_is_gradcam_pp(tiny, tiny_x):
    # n = 1 copy with zero noise: the averaged moments are G, G^2, G^3 of the clean input, so the map must be
    # Grad-CAM++'s exactly. Layer conv2: its gradient depends on the input.
    r = explain(tiny, tiny_x, ["gradcam_pp", "smooth_gradcam_pp"], layer="conv2",
                params={"smooth_gradcam_pp": {"samples": 1, "noise": 0.0}})
    assert torch.equal(r["smooth_gradcam_pp"].maps, r["gradcam_pp"].maps)
    # seeded: same seed same map, another seed another map
    kw = dict(layer="conv2", samples=4, noise=0.3)
    a = explain(tiny, tiny_x, "smooth_gradcam_pp", seed=5, **kw)
    b = explain(tiny, tiny_x, "smooth_gradcam_pp", seed=5, **kw)
    c = explain(tiny, tiny_x, "smooth_gradcam_pp", seed=6, **kw)
    assert torch.equal(a.maps, b.maps)
    assert not torch.allclose(a.maps, c.maps)
    assert a.passes["backward"] == 4 and a.seed == 5


def test_all_maps_nonnegative_finite_and_model_untouched(tiny, tiny_x):
    # Every CAM ends with a ReLU; the model must be left exactly as found.
    before = tiny.state_fingerprint()
    r = explain(tiny, tiny_x, ALL_CAMS, layer="act2", params={"smooth_gradcam_pp": {"samples": 2}})
    after = tiny.state_fingerprint()
    for name, e in r.items():
        assert e.maps.shape == (2, 32, 32), name
        assert torch.isfinite(e.maps).all() and e.maps.min() >= 0, name
        assert not e.signed
    assert before["hooks"] == after["hooks"] and before["training"] == after["training"]
    assert all(g is None for g in after["grads"])
    assert all(torch.equal(p, q) for p, q in zip(before["params"], after["params"]))


# ------------------------------------------------------------------------------- Score-CAM
def _scorecam_reference(subject, x, layer, align):
    """Logits of x * (normalised upsampled channel k) for every k, by a plain loop over the model;
    `valid` marks the non-constant channels."""
    A, _ = acts_of(subject.model, x, layer)
    logits = {}
    valid = torch.zeros(x.shape[0], A.shape[1], dtype=torch.bool)
    with torch.no_grad():
        for i in range(x.shape[0]):
            for k in range(A.shape[1]):
                up = torch.nn.functional.interpolate(A[i:i + 1, k:k + 1], size=x.shape[-2:], mode="bilinear",
                                                     align_corners=align)
                if up.max() - up.min() <= 0:
                    continue
                valid[i, k] = True
                logits[i, k] = subject.model(x[i:i + 1] * (up - up.min()) / (up.max() - up.min()))[0]
    return A, logits, valid


def test_scorecam_weights_match_a_direct_loop(tiny, tiny_x):
    # The weights computed through the shared perturbation runner equal a channel-by-channel loop that
    # masks the input by hand: paper = prob(x*H_k) - prob(0), official = prob(x*H_k),
    # channel_softmax = softmax_k(logit(x*H_k)); constant channels weigh 0. Batched vs single-row float32
    # forwards: 1e-4 relative.
    tgt = [2, 0]
    with torch.no_grad():
        base = tiny.model(torch.zeros_like(tiny_x)).softmax(-1)[torch.arange(2), tgt]
    refs = {align: _scorecam_reference(tiny, tiny_x, "act2", align) for align in (False, True)}
    for weighting in ("paper", "official", "channel_softmax"):
        A, logits, valid = refs[weighting == "channel_softmax"]
        S = torch.zeros(valid.shape)
        for (i, k), lg in logits.items():
            S[i, k] = lg[tgt[i]] if weighting == "channel_softmax" else lg.softmax(-1)[tgt[i]]
        if weighting == "paper":
            S = S - base.view(2, 1)
        elif weighting == "channel_softmax":
            S = S.masked_fill(~valid, float("-inf")).softmax(1)
        S = torch.where(valid, S, torch.zeros_like(S))
        e = explain(tiny, tiny_x, "scorecam", target=tgt, layer="act2", weighting=weighting, batch_size=7)
        w = e.extras["channel_weights"]
        assert torch.allclose(w, S, rtol=1e-4, atol=1e-6), weighting
        expect = torch.einsum("bk,bkhw->bhw", S, A).clamp_min(0)
        assert torch.allclose(e.raw, expect, rtol=1e-4, atol=1e-5 * float(expect.abs().max())), weighting
        # passes per image: one clean forward (fixes the target and yields the activations), one per
        # non-constant channel (+ the zero baseline)
        assert e.passes["forward"] == 1 + valid.sum().item() / 2 + (weighting == "paper"), weighting


def test_scorecam_softmax_weights_sum_to_one_and_constant_channels_are_skipped(tiny, tiny_x):
    # Channels made constant (zero conv weights: value = ReLU(bias), some zero, some not) carry no spatial
    # information: they get weight 0, no forward pass, and no NaN; the others' softmax weights sum to 1.
    with torch.no_grad():
        tiny.model.conv2.weight[:6] = 0
        tiny.model.conv2.bias[:3] = 0.5
        tiny.model.conv2.bias[3:6] = -0.5
    e = explain(tiny, tiny_x, "scorecam", layer="act2", weighting="channel_softmax")
    w = e.extras["channel_weights"]
    assert torch.allclose(w.sum(1), torch.ones(2), atol=1e-6)
    assert (w[:, :6] == 0).all() and (w[:, 6:] > 0).all()
    assert e.extras["skipped_constant_channels"] == 12
    assert e.passes["forward"] == 1 + 10
    assert torch.isfinite(e.maps).all()
    # a layer with only constant channels: zero weights, a zero map, no NaN
    with torch.no_grad():
        tiny.model.conv2.weight.zero_()
    for weighting in ("channel_softmax", "paper", "official"):
        e = explain(tiny, tiny_x, "scorecam", layer="act2", weighting=weighting)
        assert torch.isfinite(e.maps).all() and (e.maps == 0).all()
    with pytest.raises(SaliencyError, match="weighting"):
        explain(tiny, tiny_x, "scorecam", layer="act2", weighting="softmax")


def test_scorecam_scores_channels_with_the_same_normalised_map_once(tiny, tiny_x):
    # Channel 1 made 2 x channel 0 (conv filter and bias doubled; ReLU is positively homogeneous):
    # both normalise to the same mask, so the same masked input is scored once per image, and both
    # channels get the weight the direct channel-by-channel loop gives them.
    with torch.no_grad():
        tiny.model.conv2.weight[1] = 2 * tiny.model.conv2.weight[0]
        tiny.model.conv2.bias[1] = 2 * tiny.model.conv2.bias[0]
    _, logits, valid = _scorecam_reference(tiny, tiny_x, "act2", False)
    assert valid[:, :2].all()
    e = explain(tiny, tiny_x, "scorecam", target=[2, 0], layer="act2", weighting="official")
    assert e.extras["duplicate_channels"] == 2
    assert e.passes["forward"] == 1 + (valid.sum().item() - 2) / 2
    w = e.extras["channel_weights"]
    for i, t in enumerate([2, 0]):
        for k in (0, 1):
            assert torch.allclose(w[i, k], logits[i, k].softmax(-1)[t], rtol=1e-4), (i, k)


class QuadrantModel(nn.Module):
    """Layer `feat` has 4 channels, each a fixed 4x4 pattern lighting one quadrant; class 0 scores the mean
    of the top-left quadrant of the input, class 1 its negative."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Identity()
        patterns = torch.zeros(4, 4, 4)
        for k, (i, j) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
            patterns[k, i:i + 2, j:j + 2] = 1
        self.register_buffer("patterns", patterns)

    def forward(self, x):
        f = self.feat(self.patterns.expand(x.shape[0], -1, -1, -1) + 0 * x.mean((1, 2, 3)).view(-1, 1, 1, 1))
        s = x[:, :, :16, :16].mean((1, 2, 3)) + 0 * f.sum((1, 2, 3))
        return torch.stack([s, -s], 1)


def test_scorecam_channel_covering_the_scored_region_weighs_most():
    # Known answer: the score is the mean of the top-left quadrant, so masking the input by
    # the channel that lights that quadrant keeps the most score and gets the largest weight, whatever the
    # weighting; the map peaks in that quadrant.
    subject = Subject(QuadrantModel(), input_size=(32, 32))
    x = 1 + 0.1 * torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for weighting in ("paper", "official", "channel_softmax"):
        e = explain(subject, x, "scorecam", target=0, layer="feat", weighting=weighting)
        w = e.extras["channel_weights"]
        assert (w.argmax(1) == 0).all(), weighting
        m = e.maps
        assert (m[:, :16, :16].mean((1, 2)) > m[:, 16:, 16:].mean((1, 2))).all(), weighting


# ------------------------------------------------------------------------------- sharing
def test_gradient_cams_of_one_layer_share_one_forward_backward(tiny, tiny_x):
    # Five gradient CAMs + Eigen-CAM + CAM of one layer: one clean forward (it fixes the target and
    # keeps its graph) and one backward to the layer; every later method reports zero passes.
    # Counted by a forward hook too.
    calls = []
    handle = tiny.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        r = explain(tiny, tiny_x, GRAD_CAMS + ["eigencam", "cam"], layer="act2")
    finally:
        handle.remove()
    assert calls == [2]
    first = r[GRAD_CAMS[0]].passes
    assert first["forward"] == 1 and first["backward"] == 1
    for name in GRAD_CAMS[1:] + ["eigencam", "cam"]:
        assert r[name].passes["forward"] == 0 and r[name].passes["backward"] == 0, name
        assert r[name].extras.get("shared_capture"), name
    # separately, each call pays for its own capture
    calls.clear()
    handle = tiny.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        for name in GRAD_CAMS[:2]:
            explain(tiny, tiny_x, name, layer="act2")
    finally:
        handle.remove()
    assert len(calls) == 2  # one clean forward per call


# --------------------------------------------------------------------------- layers, errors
def test_multi_layer_fusion_and_layer_errors(tiny, tiny_x):
    # Several layers: each layer's map is upsampled and min-max normalised, then averaged (LayerCAM: max of
    # tanh(2 M)); recomputed here from the single-layer explanations.
    layers = ["conv1", "act2"]
    multi = explain(tiny, tiny_x, ["gradcam", "layercam"], layer=layers)
    single = {l: explain(tiny, tiny_x, ["gradcam", "layercam"], layer=l) for l in layers}
    for name in ("gradcam", "layercam"):
        ups = [normalize01(upsample(single[l][name].raw, (32, 32))) for l in layers]
        if name == "gradcam":
            expect = torch.stack(ups).mean(0)
        else:
            expect = torch.stack([torch.tanh(2 * u) for u in ups]).amax(0)
        assert torch.allclose(multi[name].maps, expect, atol=1e-6)
        assert multi[name].layer == "conv1,act2" and multi[name].raw is None
    # one capture served both layers and both methods
    assert multi["gradcam"].passes["backward"] == 1 and multi["layercam"].passes["backward"] == 0
    with pytest.raises(SaliencyError, match="empty"):
        explain(tiny, tiny_x, "gradcam", layer=[])
    with pytest.raises(SaliencyError, match="closest: conv2"):
        explain(tiny, tiny_x, "gradcam", layer="conv_2")
    with pytest.raises(SaliencyError, match="closest"):
        explain(tiny, tiny_x, "eigencam", layer=["conv1", "act3"])
    with pytest.raises(SaliencyError, match="single layer"):
        explain(tiny, tiny_x, "cam", layer=layers)
    # CAM at a layer that does not feed the pooling directly is refused, not silently wrong
    with pytest.raises(SaliencyError, match="global-average-pool"):
        explain(tiny, tiny_x, "cam", layer="conv2")


# ----------------------------------------------------------------------- reference libraries
@pytest.fixture(scope="module")
def resnet():
    """torchvision resnet18, seeded random weights, with a non-degenerate head: nonnegative classifier
    weights on the nonnegative pooled features, so class scores grow with the features and maps are
    not all clipped away by the final ReLU (as happens for random signed heads)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        model.fc.weight.abs_()
        model.fc.bias.zero_()
    subject = Subject(model, input_size=(96, 96), name="resnet18")
    x = subject.preprocess([sk.data.image("chelsea"), sk.data.image("coffee")])
    return subject, x


def _reference_maps(subject, x, layer, classes, lib, name, **kw):
    """Maps of the reference library at the input size (run inside `explaining()` so in-place activations
    cannot overwrite its captured tensors). torchcam maps are upsampled with our bilinear rule."""
    model = subject.model
    with subject.explaining():
        if lib == "pgc":
            import pytorch_grad_cam as pgc
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

            module = dict(model.named_modules())[layer]
            with getattr(pgc, name)(model=model, target_layers=[module]) as cam:
                if "batch_size" in kw:
                    cam.batch_size = kw["batch_size"]
                maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
            maps = torch.from_numpy(maps)
        else:
            import torchcam.methods as tcm

            extractor = getattr(tcm, name)(model, target_layer=layer, input_shape=tuple(x.shape[1:]), **kw)
            try:
                out = model(x)
                maps = extractor(class_idx=[int(c) for c in classes], scores=out)[0].detach()
            finally:
                extractor.remove_hooks()
            maps = upsample(maps, x.shape[-2:])
    for p in model.parameters():   # the libraries backpropagate into the parameters
        p.grad = None
    return maps


# (ours, library, reference class). Tolerance Pearson >= 0.99 on maps upsampled to the input size: the
# definitions agree; what differs is OpenCV vs torch bilinear resizing of the normalised map
# (pytorch-grad-cam) and the eps in Grad-CAM++'s denominator (see the EfficientNet test). torchcam's
# Grad-CAM++ is not compared: its masked in-place division acts on a copy, so its alpha is g^2 rather than
# the definition's g^2 / (2 g^2 + sum A g^3).
PAIRS = [("gradcam", "pgc", "GradCAM"), ("gradcam", "tcm", "GradCAM"), ("gradcam_pp", "pgc", "GradCAMPlusPlus"),
         ("hirescam", "pgc", "HiResCAM"), ("xgradcam", "pgc", "XGradCAM"), ("xgradcam", "tcm", "XGradCAM"),
         ("layercam", "pgc", "LayerCAM"), ("layercam", "tcm", "LayerCAM"), ("eigencam", "pgc", "EigenCAM")]


def _check_agreement(subject, x, layer, classes, pairs, min_r=None):
    min_r = min_r or {}
    ours = explain(subject, x, sorted({p[0] for p in pairs}), target=list(classes), layer=layer)
    for method, lib, name in pairs:
        ref = _reference_maps(subject, x, layer, classes, lib, name)
        assert (ref.flatten(1).std(1) > 0).all(), (method, lib)   # a constant map would make r meaningless
        if method == "eigencam":
            # pytorch-grad-cam does not fix the SVD sign: compare with our unsigned projection, either sign
            raw = explain(subject, x, "eigencam", layer=layer, relu=False).raw
            size = x.shape[-2:]
            r = torch.maximum(pearson(upsample(raw.clamp_min(0), size), ref),
                              pearson(upsample((-raw).clamp_min(0), size), ref))
        else:
            r = pearson(ours[method].maps, ref)
        assert (r >= min_r.get((method, lib), 0.99)).all(), (method, lib, layer, r.tolist())


def test_agreement_resnet18(resnet):
    # layer3 (6x6 at 96 px): gradients vary over positions, so the CAMs really differ from one another;
    # CAM at layer4, the layer feeding GAP + fc, against torchcam's CAM.
    pytest.importorskip("pytorch_grad_cam")
    tcm = pytest.importorskip("torchcam.methods")
    subject, x = resnet
    _check_agreement(subject, x, "layer3", [3, 7], PAIRS)
    ours = explain(subject, x, "cam", target=[3, 7], layer="layer4")
    with subject.explaining():
        ext = tcm.CAM(subject.model, target_layer="layer4", fc_layer="fc", input_shape=(3, 96, 96))
        try:
            ref = ext(class_idx=[3, 7], scores=subject.model(x))[0].detach()
        finally:
            ext.remove_hooks()
    assert (pearson(ours.maps, upsample(ref, (96, 96))) >= 0.99).all()


def test_agreement_efficientnet_lite0(lite0, chelsea):
    # Pretrained model, real photo, top-1 class. Layer _bn1: the head's BatchNorm (the following ReLU6
    # module `_swish` is shared with the stem, so hooking it catches two calls in the libraries);
    # CAM at `_swish` (GAP + linear follow it) against torchcam, which keeps the module's last call.
    # Grad-CAM++ vs pytorch-grad-cam: >= 0.98 only. Here |g| ~ 1e-4, so 2 g^2 ~ 1e-7 and pytorch-grad-cam's
    # eps = 1e-6 in alpha's denominator dominates it; we follow the definition (no eps). Measured r = 0.988;
    # adding that eps to our formula gives r = 1.0000.
    pytest.importorskip("pytorch_grad_cam")
    tcm = pytest.importorskip("torchcam.methods")
    subject = Subject(copy.deepcopy(lite0.model), input_size=(224, 224), name="lite0")
    x = lite0.preprocess(chelsea)
    top = int(lite0.forward(x).argmax())
    pairs = [("gradcam", "pgc", "GradCAM"), ("gradcam_pp", "pgc", "GradCAMPlusPlus"), ("hirescam", "pgc", "HiResCAM"),
             ("xgradcam", "tcm", "XGradCAM"), ("layercam", "tcm", "LayerCAM"), ("eigencam", "pgc", "EigenCAM")]
    _check_agreement(subject, x, "_bn1", [top], pairs, min_r={("gradcam_pp", "pgc"): 0.98})
    ours = explain(subject, x, "cam", layer="_swish")
    with subject.explaining():
        ext = tcm.CAM(subject.model, target_layer="_swish", fc_layer="_fc", input_shape=(3, 224, 224))
        try:
            ref = ext(class_idx=top, scores=subject.model(x))[0].detach()
        finally:
            ext.remove_hooks()
    assert pearson(ours.maps, upsample(ref, (224, 224)))[0] >= 0.99


def test_agreement_scorecam(resnet):
    # Score-CAM with weighting="channel_softmax" (softmax over channels of the masked logits) is the
    # pytorch-grad-cam / torchcam definition. Differences left: both libraries also score constant
    # channels (mask 0), torchcam normalises before upsampling with align_corners=False; the first only
    # rescales the map or moves it by a constant, the second changes masks slightly, hence Pearson >= 0.99.
    # layer1 (64 channels, 16x16) at 64x64 keeps it to 64 passes per image and library.
    pytest.importorskip("pytorch_grad_cam")
    pytest.importorskip("torchcam")
    subject, x = resnet
    x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    ours = explain(subject, x, "scorecam", target=[3, 7], layer="layer1", weighting="channel_softmax",
                   batch_size=64)
    for lib, kw in (("pgc", {"batch_size": 64}), ("tcm", {"batch_size": 64})):
        ref = _reference_maps(subject, x, "layer1", [3, 7], lib, "ScoreCAM", **kw)
        r = pearson(ours.maps, ref)
        assert (r >= 0.99).all(), (lib, r.tolist())


# ---------------------------------------------------------------------------- architectures
ARCHS = ["resnet18", "vgg11", "densenet121", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"]
# CAM needs the auto layer to feed GAP + linear directly; these heads add layers (VGG: 3-layer MLP,
# MobileNetV3: linear-hardswish-linear, ConvNeXt: LayerNorm after pooling), so CAM must refuse them.
CAM_REFUSED = {"vgg11", "mobilenet_v3_small", "convnext_tiny"}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_cam_runs_on_torchvision_architectures(arch):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    subject = Subject(getattr(torchvision.models, arch)(num_classes=10), input_size=(64, 64), name=arch)
    g = torch.Generator().manual_seed(0)
    methods = GRAD_CAMS + ["eigencam", "smooth_gradcam_pp"]
    # batch 3 square, batch 1 non-square: layer="auto", one shared capture per call
    for shape in [(3, 3, 64, 64), (1, 3, 64, 96)]:
        x = torch.randn(*shape, generator=g)
        r = explain(subject, x, methods, params={"smooth_gradcam_pp": {"samples": 2}})
        for name, e in r.items():
            assert e.maps.shape == (shape[0], *shape[2:]), (arch, name)
            assert torch.isfinite(e.maps).all(), (arch, name)
        if arch in CAM_REFUSED:
            with pytest.raises(SaliencyError, match="global-average-pool"):
                explain(subject, x, "cam")
        else:
            # GAP + linear head: CAM = hw * HiResCAM (pre-ReLU) on a real architecture too (densenet121 applies
            # its final ReLU functionally and in place, so this also checks what the capture sees); 1e-4 rel.
            r = explain(subject, x, ["cam", "hirescam"], relu=False)
            cam, hires = r["cam"].raw, r["hirescam"].raw
            assert r["cam"].maps.shape == (shape[0], *shape[2:]) and torch.isfinite(r["cam"].maps).all()
            hw = cam.shape[-1] * cam.shape[-2]
            assert torch.allclose(cam, hires * hw, rtol=1e-4, atol=1e-5 * float(cam.abs().max()) + 1e-12), arch
    if arch in ("mobilenet_v3_small", "efficientnet_b0"):   # Score-CAM costs one forward per channel
        x = torch.randn(1, 3, 64, 96, generator=g)
        e = explain(subject, x, "scorecam", batch_size=128)
        assert e.maps.shape == (1, 64, 96) and torch.isfinite(e.maps).all()


# --------------------------------------------------------------------------- CF-CAM
def toy_clusters(seed=0):
    """24 channels on a 6x6 map: 6 high-norm channels and three tight, well-separated clusters of 6."""
    g = torch.Generator().manual_seed(seed)
    high = 10 + torch.rand(6, 6, 6, generator=g)
    centers = 3 * torch.randn(3, 6, 6, generator=g)
    low = torch.cat([c + 0.01 * torch.randn(6, 6, 6, generator=g) for c in centers]) * 0.3
    A = torch.cat([high, low])
    G = torch.randn(24, 6, 6, generator=g)
    return A, G


def test_cf_cam_permutation_invariance_on_separated_clusters():
    # Relabelling channels (the same permutation in A and G) cannot change the map: clusters of
    # well-separated channels are found whatever their order (no DBSCAN border points here).
    A, G = toy_clusters()
    m1, info = cf_cam_map(A, G)
    assert info["clusters"] == 3 and info["important"] == 6 and info["noise"] == 0
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(5))
    m2, _ = cf_cam_map(A[perm], G[perm])
    torch.testing.assert_close(m1, m2, rtol=1e-12, atol=1e-12)


def test_cf_cam_all_important_is_softmax_of_mean_gradients():
    # With the importance percentile at 0 every channel is "important": the weights are exactly
    # softmax(mean gradient), no clustering involved (closed form, float64).
    A, G = toy_clusters(1)
    m, info = cf_cam_map(A, G, importance_percentile=0.0)
    w = torch.softmax(G.double().mean((1, 2)), 0)
    expected = torch.relu((w.view(-1, 1, 1) * A.double()).sum(0))
    assert info["clusters"] == 0
    torch.testing.assert_close(m, expected)


def test_cf_cam_range_and_determinism(tiny, tiny_x):
    e1 = sk.explain(tiny, tiny_x, "cf_cam", layer="act2")
    e2 = sk.explain(tiny, tiny_x, "cf_cam", layer="act2")
    assert e1.maps.shape == (2, 32, 32) and e1.raw.shape == (2, 16, 16)
    assert e1.maps.min() >= 0 and e1.maps.max() <= 1 + 1e-6
    for i in range(2):  # divided by its maximum: peak exactly 1 (unless the map is all zero)
        assert e1.maps[i].max() == pytest.approx(1.0, abs=1e-6) or e1.maps[i].max() == 0
    assert torch.equal(e1.maps, e2.maps)
