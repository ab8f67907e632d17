"""Grad-ECLIP (Zhao et al., ICML 2024) on small random CLIP models: the map against a
float64 recomputation of the last visual block written out by hand, invariances, pass counts, and
the model left as found (no CLIP weights exist offline)."""
import copy
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saliencykit as sk
from saliencykit.errors import SaliencyError
from saliencykit.subject import count_hooks
from saliencykit.tasks.similarity import ResolvedScore
from saliencykit.targets import Target

HAS_HF = importlib.util.find_spec("transformers") is not None
needs_hf = pytest.mark.skipif(not HAS_HF, reason="transformers not installed")

from tiny_clip import PROMPTS, VOCAB, char_tokenizer  # noqa: E402  (tests/ is on sys.path)
from state import assert_same_state  # noqa: E402  (tests/ is on sys.path)


@pytest.fixture
def x():
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def x2():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 3, 32, 32, generator=g)


# --------------------------------------------------------------------- an open_clip-style toy model
class ToyBlock(nn.Module):
    """open_clip ResidualAttentionBlock: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, batch_first):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ToyTransformer(nn.Module):
    def __init__(self, width, heads, layers, batch_first):
        super().__init__()
        self.resblocks = nn.ModuleList([ToyBlock(width, heads, batch_first) for _ in range(layers)])

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


class ToyVisual(nn.Module):
    """open_clip VisionTransformer layout: conv1 patches, class embedding first, ln_pre, resblocks
    ([N, B, E] when not batch_first, as in older open_clip), ln_post on the CLS token, proj."""

    def __init__(self, width=32, heads=2, layers=2, dim=16, batch_first=False):
        super().__init__()
        self.batch_first = batch_first
        self.conv1 = nn.Conv2d(3, width, 8, stride=8, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.5)
        self.positional_embedding = nn.Parameter(torch.randn(17, width) * 0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = ToyTransformer(width, heads, layers, batch_first)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, dim) * width ** -0.5)

    def tokens(self, x):
        t = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(t.shape[0], 1, -1)
        return self.ln_pre(torch.cat([cls, t], 1) + self.positional_embedding)

    def head(self, t):  # [B, N, E] tokens after the blocks -> image features
        return self.ln_post(t[:, 0]) @ self.proj

    def forward(self, x):
        t = self.tokens(x)
        t = self.transformer(t if self.batch_first else t.transpose(0, 1))
        return self.head(t if self.batch_first else t.transpose(0, 1))


class ToyOpenCLIP(nn.Module):
    def __init__(self, batch_first=False):
        super().__init__()
        self.visual = ToyVisual(batch_first=batch_first)
        self.token_embedding = nn.Embedding(VOCAB, 16)

    def encode_image(self, x):
        return self.visual(x)

    def encode_text(self, ids):
        return self.token_embedding(ids).mean(1)


def toy_open_clip(batch_first=False):
    from saliencykit.tasks.clip import CLIPSubject

    torch.manual_seed(1)
    model = ToyOpenCLIP(batch_first).eval()
    return CLIPSubject(model, lambda prompts: char_tokenizer(prompts)["input_ids"], input_size=32, name="toy-open-clip")


# ------------------------------------------------------------------- the definition, written out
def _heads(t, h):
    B, N, E = t.shape
    return t.view(B, N, h, E // h).transpose(1, 2)


def expected_map(q, k, v, heads, out_proj, rest, score):
    """Grad-ECLIP from first principles, float64: attention is recomputed here from q, k, v
    (softmax(q k^T / sqrt(d)) v per head), its output `o` is a leaf so that g = d score / d o_CLS is
    an autograd gradient through `rest(out_proj(o))` (the rest of the image tower, written out by
    each test); then lambda = minmax cos(out_proj(q_CLS), out_proj(k_i)) over the 16 patches and
    map = ReLU(sum_d g_d v_id lambda_i) on the 4x4 grid."""
    B, N, E = q.shape
    d = E // heads
    a = (_heads(q, heads) @ _heads(k, heads).transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    o = (a @ _heads(v, heads)).transpose(1, 2).reshape(B, N, E).detach().requires_grad_(True)
    c = score(rest(out_proj(o)))
    g = torch.autograd.grad(c.sum(), o)[0][:, 0]
    qh, kh = out_proj(q[:, :1]).detach(), out_proj(k[:, 1:]).detach()
    cos = (qh * kh).sum(-1) / (qh.norm(dim=-1) * kh.norm(dim=-1))
    lam = (cos - cos.min(1, keepdim=True).values) / (cos.max(1, keepdim=True).values - cos.min(1, keepdim=True).values)
    return torch.relu((g[:, None, :] * v[:, 1:]).sum(-1) * lam).reshape(B, 4, 4), c.detach()


def text_score(subject, prompts, vs=None):
    """c = cos(v, e(prompt)) [- cos(v, e(vs))] in float64, from the subject's own text embeddings."""
    t = subject.encode_text(prompts).double()
    n = None if vs is None else subject.encode_text(vs).double()

    def score(emb):
        s = F.cosine_similarity(emb, t, dim=-1)
        return s if n is None else s - F.cosine_similarity(emb, n, dim=-1)

    return score


@needs_hf
@pytest.mark.parametrize("contrast", [False, True])
def test_known_answer_hf_clip(clip, x2, contrast):
    # what: grad_eclip's raw 4x4 maps for 2 images (one prompt each; and a Text contrast) against
    # the definition recomputed in float64 from a hand-written last CLIPEncoderLayer (q/k/v from the
    # layer's own weights, attention, out_proj, residual + MLP, post_layernorm, visual_projection,
    # cosine) with the gradient taken by autograd at o; the hand-written tower must also reproduce
    # the model's embedding (1e-5). Tolerance 1e-5 x max|map|: the method runs the float32 model
    # (relative rounding ~1e-7 through two blocks), the reference is float64.
    from saliencykit.tasks.clip import Text

    prompts, vs = PROMPTS[:2], (PROMPTS[2:] * 2 if contrast else None)
    m = clip.model.clip
    layer = m.vision_model.encoder.layers[-1]
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
        kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True)
    try:
        with torch.no_grad():
            emb32 = clip.forward(x2)
    finally:
        handle.remove()
    h0 = seen[-1].double()
    L = copy.deepcopy(layer).double()
    post = copy.deepcopy(m.vision_model.post_layernorm).double()
    proj = copy.deepcopy(m.visual_projection).double()
    sa = L.self_attn
    with torch.no_grad():
        y = L.layer_norm1(h0)
        q, k, v = sa.q_proj(y), sa.k_proj(y), sa.v_proj(y)

    def rest(attn_out):
        h1 = h0 + attn_out
        h2 = h1 + L.mlp(L.layer_norm2(h1))
        return proj(post(h2[:, 0]))

    with torch.no_grad():  # the hand-written tower reproduces the model's image embedding
        a = (_heads(q, 2) @ _heads(k, 2).transpose(-1, -2) / math.sqrt(16)).softmax(-1)
        o = (a @ _heads(v, 2)).transpose(1, 2).reshape(2, 17, 32)
        assert torch.allclose(F.normalize(rest(sa.out_proj(o)), dim=-1).float(), emb32, atol=1e-5)
    want, c = expected_map(q, k, v, 2, sa.out_proj, rest, text_score(clip, prompts, vs))
    e = sk.explain(clip, x2, "grad_eclip", target=Text(prompts, vs=vs, each=False))
    assert e.raw.shape == (2, 4, 4) and e.maps.shape == (2, 32, 32)
    diff = float((e.raw.double() - want).abs().max())
    assert diff <= 1e-5 * float(want.abs().max()), (diff, float(want.abs().max()))
    assert float(want.abs().max()) > 1e-3 and (want > 0).any(dim=(1, 2)).all()  # not a vacuous comparison
    # the map is the raw grid upsampled bilinearly to the input size (exact: same interpolation)
    assert torch.equal(e.maps, F.interpolate(e.raw[:, None], size=(32, 32), mode="bilinear",
                                             align_corners=False)[:, 0])


@pytest.mark.parametrize("batch_first", [False, True])
def test_known_answer_multihead_attention(x2, batch_first):
    # what: on an open_clip-style tower (nn.MultiheadAttention with fused in_proj, [N, B, E] or
    # [B, N, E] layout) the raw maps against the float64 hand-written last block (q/k/v split from
    # in_proj_weight, explicit attention, out_proj, residual + MLP, ln_post on CLS, proj). Tolerance
    # 1e-5 x max|map|: float32 model vs float64 reference.
    from saliencykit.tasks.clip import Text

    subject = toy_open_clip(batch_first)
    vis = subject.model.clip.visual
    with torch.no_grad():
        h = vis.tokens(x2)
        for block in vis.transformer.resblocks[:-1]:
            h = block(h if batch_first else h.transpose(0, 1))
            h = h if batch_first else h.transpose(0, 1)
    h0 = h.double()
    blk = copy.deepcopy(vis.transformer.resblocks[-1]).double()
    ln_post, P = copy.deepcopy(vis.ln_post).double(), vis.proj.detach().double()
    with torch.no_grad():
        y = blk.ln_1(h0)
        wq, wk, wv = blk.attn.in_proj_weight.chunk(3)
        bq, bk, bv = blk.attn.in_proj_bias.chunk(3)
        q, k, v = y @ wq.T + bq, y @ wk.T + bk, y @ wv.T + bv

    def rest(attn_out):
        h1 = h0 + attn_out
        h2 = h1 + blk.mlp(blk.ln_2(h1))
        return ln_post(h2[:, 0]) @ P

    want, _ = expected_map(q, k, v, 2, blk.attn.out_proj, rest, text_score(subject, PROMPTS[:2]))
    e = sk.explain(subject, x2, "grad_eclip", target=Text(PROMPTS[:2], each=False))
    assert e.extras["kind"] == "mha" and e.layer == "clip.visual.transformer.resblocks.1.attn"
    diff = float((e.raw.double() - want).abs().max())
    assert diff <= 1e-5 * float(want.abs().max()), (diff, float(want.abs().max()))
    assert float(want.abs().max()) > 1e-3


# ------------------------------------------------------------------------------------ invariances
class ScaledText(Target):
    """score = cos(v, s * e(prompt)) with an unnormalised text vector; `cosine=False`: the raw
    product s * <normalize(v), e(prompt)> instead (a positively scaled score)."""

    def __init__(self, prompt, s, cosine=True):
        self.prompt, self.s, self.cosine = prompt, s, cosine

    def resolve(self, subject, logits):
        t = self.s * subject.encode_text([self.prompt])[0].to(logits.device)

        def fn(out, rows):
            if self.cosine:
                return F.cosine_similarity(out, t.expand_as(out), dim=-1)
            return F.normalize(out, dim=-1) @ t

        return ResolvedScore(fn, logits.shape[0], "scaled_text", [self.prompt] * logits.shape[0],
                             ("scaled", self.prompt, self.s, self.cosine))


@needs_hf
def test_invariant_to_positive_text_scaling(clip, x):
    # what: the map for Text(p) equals the map for cos(v, 3 e(p)) (1e-6 x max: float32 rounding of
    # the scaled vector and its norm); why: c is a cosine, so a positive rescaling of the text
    # embedding changes nothing. Control: the unnormalised product 3 <v, e> (3x the score) gives
    # 3x the map (ReLU is positively homogeneous), so the invariance is owed to the cosine and the
    # comparison can see a change of scale.
    from saliencykit.tasks.clip import Text

    base = sk.explain(clip, x, "grad_eclip", target=Text(PROMPTS[0])).raw
    scaled = sk.explain(clip, x, "grad_eclip", target=ScaledText(PROMPTS[0], 3.0)).raw
    tol = 1e-6 * float(base.abs().max())
    assert float(base.abs().max()) > 1e-3
    assert float((scaled - base).abs().max()) <= tol
    product = sk.explain(clip, x, "grad_eclip", target=ScaledText(PROMPTS[0], 3.0, cosine=False)).raw
    assert torch.allclose(product, 3 * base, atol=3 * tol)


@needs_hf
def test_non_negative_and_prompt_dependent(clip, x):
    # what: maps (raw grid and upsampled) are >= 0 (exact: ReLU) for 3 prompts explained in one
    # batched call; the maps of two different prompts differ by more than 5% of their scale; why:
    # the properties the definition implies (non-negative; prompt A != prompt B on a toy)
    from saliencykit.tasks.clip import Text

    e = sk.explain(clip, x, "grad_eclip", target=Text(PROMPTS))
    assert e.raw.shape == (3, 4, 4) and e.maps.shape == (3, 32, 32)
    assert (e.raw >= 0).all() and (e.maps >= 0).all() and torch.isfinite(e.maps).all()
    assert not torch.signbit(e.raw).any()  # no -0.0 entries either
    scale = float(e.raw.abs().max())
    assert float((e.raw[0] - e.raw[2]).abs().max()) > 0.05 * scale
    assert float((e.raw[0] - e.raw[1]).abs().max()) > 0


# --------------------------------------------------------------------------- state and errors
@needs_hf
def test_model_left_as_found_also_after_errors(clip, x, tiny, tiny_x):
    # what: training flags, requires_grad, .grad, params, buffers, hooks and in-place flags are
    # identical (exact) after a run, after an error raised inside the forward while grad_eclip's
    # hooks are installed, and after the SaliencyErrors for a non-CLIP subject and for an
    # unsupported attention module; the HF attention implementation is not switched
    from saliencykit.tasks.clip import Text

    m = clip.model.clip
    impl = m.config.vision_config._attn_implementation
    clip.model.train()  # a training model must come back training
    before = clip.state_fingerprint()
    sk.explain(clip, x, "grad_eclip", target=Text(PROMPTS[0]))
    assert_same_state(before, clip.state_fingerprint())

    calls = []

    def boom(*_):  # the one forward, hooked by grad_eclip (it also fixes the target), fails
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")

    handle = m.visual_projection.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            sk.explain(clip, x, "grad_eclip", target=Text(PROMPTS[0]))
        assert len(calls) == 1
        assert count_hooks(clip.model) == before["hooks"] + 1  # only the test's own hook
    finally:
        handle.remove()
    assert_same_state(before, clip.state_fingerprint())
    clip.model.eval()
    assert count_hooks(clip.model) == before["hooks"]
    assert m.config.vision_config._attn_implementation == impl

    before = tiny.state_fingerprint()
    with pytest.raises(SaliencyError, match="grad_eclip needs a CLIP subject"):
        sk.explain(tiny, tiny_x, "grad_eclip")
    assert_same_state(before, tiny.state_fingerprint())


def test_unsupported_attention_is_a_clear_error(x):
    # what: an open_clip-style model whose visual attention is a fused-qkv module (timm Attention)
    # raises a SaliencyError naming the missing projections; the model is left as found
    timm = pytest.importorskip("timm")
    from saliencykit.tasks.clip import CLIPSubject, Text

    class TimmCLIP(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = timm.models.vision_transformer.VisionTransformer(
                img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=16)
            self.token_embedding = nn.Embedding(VOCAB, 16)

        def encode_image(self, x):
            return self.visual(x)

        def encode_text(self, ids):
            return self.token_embedding(ids).mean(1)

    torch.manual_seed(0)
    subject = CLIPSubject(TimmCLIP().eval(), lambda p: char_tokenizer(p)["input_ids"], input_size=32)
    before = subject.state_fingerprint()
    with pytest.raises(SaliencyError, match="q_proj/k_proj/v_proj/out_proj.*has no q_proj, k_proj, v_proj, out_proj"):
        sk.explain(subject, x, "grad_eclip", target=Text("a cat"))
    assert_same_state(before, subject.state_fingerprint())


# ------------------------------------------------------------------------------------ pass counts
@needs_hf
def test_pass_counts_and_registry(clip, x2):
    # what: per image, grad_eclip makes 1 forward + 1 backward in 1 model call: alone, its hooked
    # forward is also the clean forward that fixes the target (Context.prime_under); after another
    # method it is exactly 1F+1B as well, with the same map; the registry entry (exact values)
    from saliencykit.tasks.clip import Text

    alone = sk.explain(clip, x2, "grad_eclip", target=Text(PROMPTS[:2], each=False))
    assert alone.passes == {"forward": 1.0, "backward": 1.0, "model_calls": 1}
    both = sk.explain(clip, x2, ["attention_rollout", "grad_eclip"], target=Text(PROMPTS[:2], each=False))
    assert both["grad_eclip"].passes == {"forward": 1.0, "backward": 1.0, "model_calls": 1}
    assert torch.equal(both["grad_eclip"].raw, alone.raw)
    info = sk.methods.available()["grad_eclip"]
    assert info["family"] == "transformer" and info["cost"] == "1F+1B" and not info["uses_layer"]
    assert "Zhao" in info["description"] and "ICML 2024" in info["description"]
