"""Concept metrics against planted ground truth: on the colour model the three concepts ARE the
three colour channels, so a CRAFT bank must locate, detect and rank them perfectly and a random
bank must not; removing a concept from the layer has a known effect on a model that reads red
only (its logit is 2 x the mean red activation)."""
import numpy as np
import pytest
import torch

import saliencykit as sk
from saliencykit import SaliencyError
from saliencykit.concepts import extract
from saliencykit.concepts.metrics import auroc, random_bank, removal_effect, score_bank
from test_bank import ColourNet, colour_scenes


def _red_only():
    net = ColourNet()
    with torch.no_grad():
        net.fc.weight.copy_(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
    return sk.Subject(net, labels=["red", "other"], mean=(0, 0, 0), std=(1, 1, 1), input_size=(32, 32), layer="act")


def _with_missing(n, seed):
    """Colour scenes where each rectangle is left out with probability 1/3 (its mask emptied)."""
    x, masks = colour_scenes(n, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for i in range(n):
        for ch, c in enumerate("rgb"):
            if rng.random() < 1 / 3:
                x[i, ch][masks[c][i]] = 0.0
                masks[c][i] = False
    return x, masks


@pytest.fixture(scope="module")
def setup():
    subject = _red_only()
    x_fit, _ = colour_scenes(16)
    bank = extract(subject, x_fit, layer="act", n_concepts=3, seed=0)
    red = int((bank.basis / bank.basis.norm(dim=1, keepdim=True))[:, 0].argmax())
    return subject, bank, red


def test_removal_effect_is_known_on_a_red_only_model(setup):
    subject, bank, red = setup
    x, _ = colour_scenes(4, seed=3)
    rem = removal_effect(subject, bank, x, target=sk.Class(0))
    logits = subject.forward(x).detach()
    # the clean row rebuilds the activation from its decomposition plus the residual: the model's own logit
    assert torch.allclose(rem.clean, logits[:, 0], atol=1e-5)
    # class 0 = 2 x mean(red): removing the red concept removes all of it, removing green or blue
    # changes nothing, up to how far NMF's directions are from the pure channels (their off-channel
    # weights are ~1e-4 of the on-channel one; 1e-3 leaves room)
    assert torch.allclose(rem.drop[:, red], torch.ones(4), atol=1e-3)
    others = [j for j in range(3) if j != red]
    assert rem.drop[:, others].abs().max() < 1e-3
    assert rem.passes["forward"] == 1 + 4        # the clean pass, then k + 1 rows per image


def test_a_craft_bank_scores_perfectly_and_a_random_one_does_not(setup):
    subject, bank, red = setup
    x, masks = _with_missing(30, seed=7)
    # ground-truth effect of each part: the red-only logit drop when the rectangle is removed
    eff = np.zeros((30, 3))
    logits = subject.forward(x).detach()[:, 0]
    for ch, c in enumerate("rgb"):
        xr = x.clone()
        xr[:, ch] = 0
        eff[:, ch] = (logits - subject.forward(xr).detach()[:, 0]).numpy()
    imp = removal_effect(subject, bank, x, target=sk.Class(0)).drop
    sc = score_bank(subject, bank, x, masks, importance=imp, part_effect=eff, top=1)
    assert sorted(p for p in sc.part) == ["b", "g", "r"]
    assert sc.part[red] == "r"
    assert sc.location_mean == 1.0                 # each channel's map peaks inside its rectangle
    assert sc.existence_auc_mean > 0.99            # a concept's share is 0 exactly when its rectangle is gone
    assert sc.existence == 1.0                     # every image's strongest concept is one it shows
    assert sc.global_importance > 0.6              # Spearman of concept importance with the true drops
    rnd = score_bank(subject, random_bank(bank, seed=0), x, masks,
                     importance=removal_effect(subject, random_bank(bank, seed=0), x, target=sk.Class(0)).drop,
                     part_effect=eff, top=1)
    # random directions mix the channels: they pile onto some colours and miss others, and the
    # importance they give does not follow the true effects
    assert sc.coverage == 1.0 and rnd.coverage < 1.0
    assert rnd.global_importance < sc.global_importance - 0.3
    assert rnd.existence < sc.existence
    d = sc.to_dict()
    assert d["location_mean"] == 1.0 and len(d["concepts"]) == 3


def test_auroc_definition():
    assert auroc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5       # ties count half
    assert np.isnan(auroc(np.array([1.0, 2.0]), np.array([1, 1])))


def test_bad_input(setup):
    subject, bank, _ = setup
    x, masks = colour_scenes(4)
    with pytest.raises(SaliencyError, match="part mask"):
        score_bank(subject, bank, x, {"r": masks["r"][:2]})
    with pytest.raises(SaliencyError, match="no part masks"):
        score_bank(subject, bank, x, {})
    with pytest.raises(SaliencyError, match="importance must be"):
        score_bank(subject, bank, x, masks, importance=torch.zeros(4, 2))
    with pytest.raises(SaliencyError, match="part_effect must be"):
        score_bank(subject, bank, x, masks, part_effect=np.zeros((4, 2)))
    with pytest.raises(SaliencyError, match="ConceptBank"):
        removal_effect(subject, "bank", x)
