"""More methods on more layouts: occlusion and RISE on feature vectors [B,F] and clips [B,T,C,H,W];
the gradient CAMs, CAM and Eigen-CAM on clips; Score-CAM on series, volumes and clips; Smooth
Grad-CAM++ on series and volumes; LIME and KernelSHAP on volumes and clips (supervoxels) and
feature vectors. (Blur IG, Guided IG and LRP: test_layouts_paths_lrp.py.)

Checked against Captum (FeatureAblation and Occlusion: the same windows, the same mean drop per
position), torchcam (Score-CAM) and against the definitions written out by hand on the same seeded
masks (RISE, Grad-CAM, Score-CAM, Eigen-CAM) or known answers (Shapley values of a linear model).
The models are float64, so the agreement is at float64 rounding of the float32 maps (atol 1e-6)
unless said otherwise.
"""
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit.errors import SaliencyError

from layout_models import (Clip3d, FrameNet, PooledClip, clip, clip_subject, features, flat_mlp,  # noqa: F401
                           series_cnn, volume_cnn)


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


def test_saved_params_are_the_values_that_ran(features):
    """Occlusion's patch/stride and RISE's cell default to None (the layout picks them); the
    Explanation records the values used, so a saved image explanation still says 15/8 and 7."""
    torch.manual_seed(0)
    image = sk.Subject(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
                       input_size=(24, 24))
    x = torch.randn(1, 3, 24, 24)
    exps = sk.explain(image, x, ["occlusion", "rise"], params={"rise": {"n_masks": 8}})
    assert (exps["occlusion"].params["patch"], exps["occlusion"].params["stride"]) == (15, 8)
    assert exps["rise"].params["cell"] == 7
    asked = sk.explain(image, x, "occlusion", params={"occlusion": {"patch": 6, "stride": 3}})
    assert (asked.params["patch"], asked.params["stride"]) == (6, 3)
    flat = sk.explain(sk.Subject(flat_mlp(), layout="BF"), features, ["occlusion", "rise"],
                      params={"rise": {"n_masks": 8}})
    assert (flat["occlusion"].params["patch"], flat["occlusion"].params["stride"]) == (1, 1)
    assert flat["rise"].params["cell"] is None      # one draw per feature, as documented
