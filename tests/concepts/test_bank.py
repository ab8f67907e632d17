"""CRAFT concept banks: recovery of planted concepts (a model whose layer sees three colour
channels), the identities of the concept maps, seeds, saving, bad input, and the Concept target
explained by existing methods (the gradient of the concept score, checked against autograd)."""
import numpy as np
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import SaliencyError
from saliencykit.concepts import ConceptBank, concept_maps, extract
from saliencykit.concepts.bank import best_match_iou, layer_activations


class ColourNet(nn.Module):
    """A 1x1 conv that passes the R, G, B channels through a ReLU: at `act`, the three planted
    concepts are exactly the three channels. The head sums them differently per class."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


def colour_scenes(n, size=32, seed=0):
    """Images with one red, one green and one blue rectangle on black, and the three masks."""
    rng = np.random.default_rng(seed)
    x = torch.zeros(n, 3, size, size)
    masks = {c: torch.zeros(n, size, size, dtype=torch.bool) for c in "rgb"}
    for i in range(n):
        for ch, c in enumerate("rgb"):
            h, w = rng.integers(6, 12, 2)
            t, l_ = rng.integers(0, size - h), rng.integers(0, size - w)
            region = torch.zeros(size, size, dtype=torch.bool)
            region[t:t + h, l_:l_ + w] = True
            region &= ~(masks["r"][i] | masks["g"][i] | masks["b"][i])    # later rectangles do not cover earlier ones
            x[i, ch][region] = 1.0
            masks[c][i] = region
    return x, masks


@pytest.fixture(scope="module")
def colour():
    subject = sk.Subject(ColourNet(), labels=["a", "b"], mean=(0, 0, 0), std=(1, 1, 1), input_size=(32, 32),
                         layer="act", name="colour")
    x, masks = colour_scenes(24)
    return subject, x, masks


def test_craft_recovers_planted_concepts(colour):
    subject, x, masks = colour
    bank = extract(subject, x, layer="act", n_concepts=3, seed=0, crops_per_image=6, crop=0.5)
    assert bank.layer == "act" and bank.basis.shape == (3, 3)
    # each concept direction is one colour channel (up to scale): NMF of channel indicators
    unit = bank.basis / bank.basis.norm(dim=1, keepdim=True)
    assert sorted(unit.argmax(1).tolist()) == [0, 1, 2]
    assert (unit.max(1).values > 0.99).all()
    assert bank.reconstruction_error < 1e-3          # three channels, three concepts: exact
    # and each concept's map covers its rectangle: best-match IoU ~1 for every colour
    x_test, m_test = colour_scenes(6, seed=1)
    cm = concept_maps(subject, bank, x_test)
    ious = best_match_iou(cm.maps, m_test)
    assert {c: j for c, (_, j) in ious.items()} == {c: int(unit.argmax(1).tolist().index(ch))
                                                    for ch, c in enumerate("rgb")}
    assert all(iou > 0.9 for iou, _ in ious.values())   # bilinear upsampling of a 32 px map: edges only
    # a random bank does not find them
    rnd = ConceptBank(torch.rand(3, 3, generator=torch.Generator().manual_seed(0)) + 0.5, "act")
    assert np.mean([v for v, _ in best_match_iou(concept_maps(subject, rnd, x_test).maps, m_test).values()]) < 0.8


def test_concept_maps_recombine_into_the_projection(colour):
    subject, x, _ = colour
    bank = extract(subject, x, layer="act", n_concepts=2, seed=0)      # fewer concepts than channels: lossy
    cm = concept_maps(subject, bank, x[:3])
    a = layer_activations(subject, x[:3], "act").clamp(min=0)
    recon = torch.einsum("bkhw,kc->bchw", cm.layer_maps.double(), bank.basis.double())
    err = (a.double() - recon).flatten(1).norm(dim=1) / a.double().flatten(1).norm(dim=1)
    assert torch.allclose(err.float(), cm.projection_error, atol=1e-5)   # the reported error is the recombination's
    assert (cm.layer_maps >= 0).all() and cm.maps.shape == (3, 2, 32, 32)
    assert torch.allclose(cm.coefficients, cm.layer_maps.mean((2, 3)))


def test_same_seed_same_bank_and_save_load(colour, tmp_path):
    subject, x, _ = colour
    a = extract(subject, x, layer="act", n_concepts=3, seed=4)
    b = extract(subject, x, layer="act", n_concepts=3, seed=4)
    assert torch.equal(a.basis, b.basis) and a.seed == 4
    c = extract(subject, x, layer="act", n_concepts=3, seed=None)
    assert isinstance(c.seed, int) and torch.equal(extract(subject, x, layer="act", n_concepts=3, seed=c.seed).basis,
                                                   c.basis)
    a.save(tmp_path / "bank")
    back = ConceptBank.load(tmp_path / "bank")
    assert torch.equal(back.basis, a.basis) and back.layer == "act" and back.reconstruction_error == a.reconstruction_error
    (tmp_path / "bank" / "basis.npz").write_bytes(b"damaged")
    with pytest.raises(SaliencyError, match="damaged concept bank"):
        ConceptBank.load(tmp_path / "bank")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("x")
    with pytest.raises(SaliencyError, match="not a saved concept bank"):
        a.save(tmp_path / "other")


def test_bad_input_is_named(colour):
    subject, x, _ = colour
    with pytest.raises(SaliencyError, match="too few for 10 concepts"):
        extract(subject, x[:1], layer="act", n_concepts=10, crops_per_image=4)
    with pytest.raises(SaliencyError, match="no spatial output"):
        extract(subject, x, layer="fc", n_concepts=2)
    with pytest.raises(SaliencyError, match="unknown concept extractor"):
        extract(subject, x, layer="act", method="magic")
    with pytest.raises(SaliencyError, match="concept index 5"):
        sk.Concept(extract(subject, x, layer="act", n_concepts=3), 5)


def test_methods_explain_a_concept_score(colour):
    subject, x, _ = colour
    bank = extract(subject, x, layer="act", n_concepts=3, seed=0)
    k = int((bank.basis / bank.basis.norm(dim=1, keepdim=True))[:, 0].argmax())   # the red concept
    e = sk.explain(subject, x[:2], "saliency", target=sk.Concept(bank, k))
    assert e.target[0]["name"] == f"concept {k}"
    # saliency = |d score / d x|, max over channels; the score is the mean coefficient of concept k
    from saliencykit.concepts.target import ConceptHead

    head = ConceptHead(subject.model, bank)
    xi = x[:2].clone().requires_grad_(True)
    head(xi)[:, k].sum().backward()
    assert torch.allclose(e.maps, xi.grad.abs().amax(1), atol=1e-6)
    # a CAM of the concept lights up the red rectangle, not the green one
    cam = sk.explain(subject, x[:2], "gradcam", target=sk.Concept(bank, k), layer="act")
    red = x[:2, 0] > 0
    green = x[:2, 1] > 0
    assert (cam.maps[red].mean() > 5 * cam.maps[green].mean())
    # and the metrics score it: deletion on the concept score runs through the same view
    ev = sk.evaluate(subject, x[:2], cam, metrics=["deletion"], target=sk.Concept(bank, k),
                     params={"deletion": {"step": 64}})
    assert ev.score("deletion", "gradcam").shape == (2,)


def test_a_concept_explanation_is_not_called_unsure(colour, monkeypatch):
    # concept scores are not class probabilities, so the "model is unsure" warning (top-1
    # probability under a limit) must not be read off them. With the limit raised above 1 every
    # class explanation is flagged (the control); the concept explanation still is not
    import saliencykit.explanation as explanation

    subject, x, _ = colour
    bank = extract(subject, x, layer="act", n_concepts=3, seed=0)
    monkeypatch.setattr(explanation, "UNSURE_BELOW", 1.01)
    assert any(w["code"] == "unsure" for w in sk.explain(subject, x[:2], "saliency").warnings)
    e = sk.explain(subject, x[:2], "saliency", target=sk.Concept(bank, 0))
    assert all(w["code"] != "unsure" for w in e.warnings)
