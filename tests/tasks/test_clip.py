"""CLIP: Text targets, prompt batching, contrast, classification by description (small random
CLIP; no CLIP weights exist offline)."""
import importlib.util

import pytest
import torch

import saliencykit as sk
from saliencykit.errors import SaliencyError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")

from tiny_clip import PROMPTS, VOCAB, char_tokenizer  # noqa: E402  (tests/ is on sys.path)


@pytest.fixture
def x():
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))



def test_text_score_is_the_cosine(clip, x):
    # what: the Text target's score is cos(image embedding, text embedding) computed directly from
    # the HF model (1e-6); why: the quantity every method explains must be the CLIP similarity
    from saliencykit.tasks.clip import Text

    m = clip.model.clip
    with torch.no_grad():
        v = m.get_image_features(pixel_values=x).pooler_output
        t = m.get_text_features(**char_tokenizer(PROMPTS[:1])).pooler_output
        logits = clip.forward(x)
    expect = torch.cosine_similarity(v, t)
    assert torch.allclose(Text(PROMPTS[0]).resolve(clip, logits).score(logits), expect, atol=1e-6)


@pytest.mark.parametrize("method", ["gradcam", "gradxinput", "relevancy"])
def test_prompt_batch_equals_prompt_by_prompt(clip, x, method):
    # what: explaining 3 prompts in one batched call gives the maps of 3 separate calls (1e-5:
    # float32 batch reductions); why: prompt batching must not mix prompts
    from saliencykit.tasks.clip import Text, explain_prompts

    batched = explain_prompts(clip, x, PROMPTS, method)
    assert batched.maps.shape == (3, 32, 32)
    for i, p in enumerate(PROMPTS):
        one = sk.explain(clip, x, method, target=Text(p))
        assert torch.allclose(batched.maps[i], one.maps[0], atol=1e-5), (method, p)
    assert float((batched.maps[0] - batched.maps[1]).abs().max()) > 0  # different prompts, different maps
    # the same through sk.explain: a prompt list for one image explains each prompt
    via_explain = sk.explain(clip, x, method, target=Text(PROMPTS))
    assert torch.equal(via_explain.maps, batched.maps)


def test_every_prompt_for_every_image(clip, x):
    # what: Text([...], each=True) on a batch of 2 gives rows image-major (b*T + t), each equal to
    # the one-image call (1e-5, float32 batch reductions); why: the documented row layout
    from saliencykit.tasks.clip import Text

    x2 = torch.cat([x, x.flip(-1)])
    both = sk.explain(clip, x2, "gradxinput", target=Text(PROMPTS[:2], each=True))
    assert both.maps.shape == (4, 32, 32)
    for b in range(2):
        one = sk.explain(clip, x2[b:b + 1], "gradxinput", target=Text(PROMPTS[:2]))
        assert torch.allclose(both.maps[2 * b:2 * b + 2], one.maps, atol=1e-5)


def test_contrast_is_the_difference_for_linear_methods(clip, x):
    # what: for gradient x input (linear in the score) and RISE with shared masks (same seed), the
    # map of Text(a, vs=b) equals map(a) - map(b) (1e-5 / 1e-6); why: additivity of explainers linear in the score
    from saliencykit.tasks.clip import Text

    a, b = PROMPTS[0], PROMPTS[1]
    for method, kw, tol in (("gradxinput", {}, 1e-5), ("rise", {"n_masks": 64, "seed": 3}, 1e-6)):
        c = sk.explain(clip, x, method, target=Text(a, vs=b), **kw).maps
        ma = sk.explain(clip, x, method, target=Text(a), **kw).maps
        mb = sk.explain(clip, x, method, target=Text(b), **kw).maps
        assert torch.allclose(c, ma - mb, atol=tol), method


def test_attention_methods_read_only_the_image_tower(clip, x):
    # what: attention methods tap the 2 vision blocks, not the text blocks, and the auto CAM layer is
    # in the vision tower; why: a two-tower model must not mix text attention into image maps
    from saliencykit.tasks.clip import Text
    from saliencykit.tokens import transformer_blocks

    blocks = transformer_blocks(clip.model)
    assert len(blocks) == 2 and all("vision_model" in b for b, _ in blocks)
    assert "vision_model" in clip.find_layer("auto", x)[0]
    e = sk.explain(clip, x, "legrad", target=Text(PROMPTS[0]))
    assert e.raw.shape == (1, 4, 4)


def test_descriptor_prompts_follow_the_which_rules():
    # what: the which-phrase rules of Menon & Vondrick on fixed strings; why: the classifier by description is defined by these phrases
    from saliencykit.tasks.clip import descriptor_prompt

    assert descriptor_prompt("cat", "pointy ears") == "cat, which has pointy ears"
    assert descriptor_prompt("cat", "a small mammal") == "cat, which is a small mammal"
    assert descriptor_prompt("cat", "an animal") == "cat, which is an animal"
    assert descriptor_prompt("cat", "often sleeps") == "cat, which often sleeps"
    assert descriptor_prompt("cat", "can climb") == "cat, which can climb"
    assert descriptor_prompt("cat", "used as a pet") == "cat, which is used as a pet"


def test_classification_by_description(clip, x):
    # what: class score = mean of descriptor cosines; one descriptor per class reduces to prompt
    # classification (1e-6); the class map equals the mean of the descriptor maps for RISE with
    # shared masks (1e-6); why: the classifier by description and additivity
    from saliencykit.tasks.clip import classify_by_description, descriptor_prompt, explain_by_description

    desc = {"cat": ["pointy ears", "whiskers", "a small mammal"], "car": ["wheels", "used for driving"]}
    res = classify_by_description(clip, x, desc)
    with torch.no_grad():
        v = clip.forward(x)
    t = clip.encode_text([descriptor_prompt("cat", d) for d in desc["cat"]])
    assert float(res["scores"][0, 0]) == pytest.approx(float((v @ t.t()).mean()), abs=1e-6)
    single = classify_by_description(clip, x, {"cat": ["whiskers"], "car": ["wheels"]})
    t2 = clip.encode_text(["cat, which has whiskers", "car, which has wheels"])
    assert torch.allclose(single["scores"], v @ t2.t(), atol=1e-6)
    out = explain_by_description(clip, x, desc, method="rise", cls="cat", n_masks=64, seed=1)
    assert out["descriptor_maps"].maps.shape == (3, 32, 32)
    assert torch.allclose(out["class_map"].maps[0], out["descriptor_maps"].maps.mean(0), atol=1e-6)
    assert out["text"].startswith("predicted cat mainly because of:")


def test_text_target_errors(clip, x, tiny, tiny_x):
    # what: a Text target on a non-CLIP model, a prompt list not matching the batch, and an
    # unknown class for the description explainer all raise clear errors
    from saliencykit.tasks.clip import Text, explain_by_description

    with pytest.raises(SaliencyError, match="CLIP subject"):
        sk.explain(tiny, tiny_x, "saliency", target=Text("a cat"))
    with pytest.raises(SaliencyError, match="each=True"):
        sk.explain(clip, torch.cat([x, x]), "saliency", target=Text(PROMPTS))
    with pytest.raises(SaliencyError, match="not in the descriptions"):
        explain_by_description(clip, x, {"cat": ["whiskers"]}, cls="dog")


class FakeOpenCLIP(torch.nn.Module):
    """open_clip layout: `visual` (a ViT) and a text `transformer` with its own attention modules."""

    def __init__(self):
        super().__init__()
        import torchvision

        self.visual = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                           hidden_dim=32, mlp_dim=64, num_classes=16)
        torch.nn.init.normal_(self.visual.heads.head.weight, std=0.3)
        self.token_embedding = torch.nn.Embedding(VOCAB, 16)
        layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
        self.transformer = torch.nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)

    def encode_image(self, x):
        return self.visual(x)

    def encode_text(self, ids):
        return self.transformer(self.token_embedding(ids)).mean(1)


def test_open_clip_layout(x):
    # what: an open_clip-style model (text transformer named `transformer`, image tower `visual`) is
    # explained through its image tower only: the tapped blocks are the visual ones, the Text score
    # is the cosine of encode_image and encode_text (1e-6); why: the open_clip loader's code path
    # without downloadable weights
    from saliencykit.tasks.clip import CLIPSubject, Text
    from saliencykit.tokens import transformer_blocks

    torch.manual_seed(0)
    model = FakeOpenCLIP().eval()
    subject = CLIPSubject(model, lambda prompts: char_tokenizer(prompts)["input_ids"], input_size=32)
    assert subject.kind == "open_clip"
    blocks = transformer_blocks(subject.model)
    assert len(blocks) == 2 and all(b.startswith("clip.visual.") for b, _ in blocks)
    with torch.no_grad():
        expect = torch.cosine_similarity(model.encode_image(x),
                                         model.encode_text(char_tokenizer(["a cat"])["input_ids"]))
        logits = subject.forward(x)
    assert torch.allclose(Text("a cat").resolve(subject, logits).score(logits), expect, atol=1e-6)
    e = sk.explain(subject, x, ["relevancy", "gradcam"], target=Text("a cat"))
    assert e["relevancy"].raw.shape == (1, 4, 4) and e["gradcam"].layer.startswith("clip.visual.")


def test_hf_clip_loader_reads_a_saved_model_offline(tmp_path, monkeypatch):
    # what: load_clip("hf:DIR") - the real Hugging Face loading code - on a tiny random CLIPModel
    # and CLIPProcessor saved to disk (a local directory is what from_pretrained reads offline, as
    # from a hub cache): input size from the config, normalisation from the processor, and a Text
    # score equal to the model's own cosine with the processor's tokenizer (1e-6, float32);
    # a missing repo, a missing open_clip and an unknown prefix give clear errors
    import json

    import huggingface_hub.constants
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from saliencykit.tasks.clip import Text, load_clip

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32},
                                                            image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]),
                         tokenizer=tok)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16, eos_token_id=1,
                                      bos_token_id=0, pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(tmp_path / "clip")
    proc.save_pretrained(tmp_path / "clip")

    subject = load_clip(f"hf:{tmp_path / 'clip'}")
    assert subject.kind == "hf" and tuple(subject.input_size) == (32, 32)
    assert torch.allclose(torch.as_tensor(subject.mean).flatten(), torch.tensor([0.4, 0.5, 0.6]))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        v = model.get_image_features(pixel_values=x).pooler_output
        t = model.get_text_features(**proc.tokenizer(["a cat"], padding=True, return_tensors="pt")).pooler_output
        logits = subject.forward(x)
    assert torch.allclose(Text("a cat").resolve(subject, logits).score(logits), torch.cosine_similarity(v, t),
                          atol=1e-6)
    assert sk.explain(subject, x, "gradcam", target=Text(["a cat", "a dog"])).maps.shape == (2, 32, 32)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SaliencyError, match="could not load CLIP"):
        load_clip("hf:no-such-org/no-such-clip")
    if importlib.util.find_spec("open_clip") is None:
        with pytest.raises(SaliencyError, match="pip install open_clip_torch"):
            load_clip("open_clip:ViT-B-32:openai")
    with pytest.raises(SaliencyError, match="unknown CLIP model"):
        load_clip("clip-vit")
