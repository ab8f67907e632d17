"""ACE banks: the planted colour concepts are found as cluster centres, same seed same bank, the
TCAV test of each concept is recorded, the bank saves and reads like a CRAFT bank, bad input is
named, and on the parts dataset the bank is compared with a random one."""
import numpy as np
import pytest
import torch

import saliencykit as sk
from saliencykit import SaliencyError
from saliencykit.concepts import ConceptBank, concept_maps, extract
from saliencykit.concepts.ace import segment_patches
from saliencykit.concepts.bank import best_match_iou
from test_bank import ColourNet, colour_scenes


@pytest.fixture(scope="module")
def colour():
    subject = sk.Subject(ColourNet(), labels=["a", "b"], mean=(0, 0, 0), std=(1, 1, 1), input_size=(32, 32),
                         layer="act", name="colour")
    x, _ = colour_scenes(6)
    bank = extract(subject, x, layer="act", method="ace", n_concepts=4, seed=0, resolutions=(15, 50), tcav_runs=3)
    return subject, x, bank


def test_ace_finds_the_planted_colours(colour):
    subject, x, bank = colour
    assert bank.method == "ace" and bank.basis.shape == (4, 3) and (bank.basis >= 0).all()
    # the superpixels of one-colour rectangles on black activate one channel each (or none, the
    # background): three of the four centres are the three channels
    unit = bank.basis / bank.basis.norm(dim=1, keepdim=True).clamp(min=1e-12)
    coloured = unit.max(1).values > 0.95
    assert sorted(unit[coloured].argmax(1).tolist()) == [0, 1, 2]
    x_test, m_test = colour_scenes(4, seed=1)
    ious = best_match_iou(concept_maps(subject, bank, x_test).maps, m_test)
    assert all(iou > 0.9 for iou, _ in ious.values())
    ex = bank.extras
    assert sum(ex["cluster_sizes"]) == ex["segments"] and len(ex["top_segments"]) == 4
    # the recorded top segments rebuild into patches that activate their concept's channel most
    red = int(unit[:, 0].argmax())
    patches = segment_patches(subject, x, ex["top_segments"][red], resolutions=(15, 50))
    assert patches.shape[1:] == x.shape[1:] and (patches[:, 0].sum() > 10 * patches[:, 1:].sum())
    assert set(ex["tcav"]) == {str(c) for c in range(4)}
    assert all(0 <= v["score"] <= 1 and 0 <= v["p_value"] <= 1 for v in ex["tcav"].values())
    assert bank.passes["backward"] == 1.0 and bank.passes["forward"] > 1


def test_same_seed_same_bank_and_save_load(colour, tmp_path):
    subject, x, bank = colour
    again = extract(subject, x, layer="act", method="ace", n_concepts=4, seed=0, resolutions=(15, 50), tcav_runs=3)
    assert torch.equal(again.basis, bank.basis) and again.extras["tcav"] == bank.extras["tcav"]
    bank.save(tmp_path / "ace")
    back = ConceptBank.load(tmp_path / "ace")
    assert back.method == "ace" and torch.equal(back.basis, bank.basis)
    assert back.extras["top_segments"] == bank.extras["top_segments"]


def test_bad_input_is_named(colour):
    subject, x, _ = colour
    with pytest.raises(SaliencyError, match="at least 2 images"):
        extract(subject, x[:1], layer="act", method="ace", n_concepts=2)
    with pytest.raises(SaliencyError, match="too few for 40 concepts"):
        extract(subject, x[:2], layer="act", method="ace", n_concepts=40, resolutions=(15,), tcav_runs=0)
    with pytest.raises(SaliencyError, match="unknown option"):
        extract(subject, x, layer="act", method="ace", n_concepts=2, crops=3)
    with pytest.raises(SaliencyError, match="unknown option"):
        extract(subject, x, layer="act", method="craft", n_concepts=2, tcav_runs=3)
    with pytest.raises(SaliencyError, match="no spatial output"):
        extract(subject, x, layer="fc", method="ace", n_concepts=2, tcav_runs=0)


def test_ace_on_the_parts_dataset_against_a_random_bank():
    from saliencykit.benchmarks.parts import dataset as parts
    from saliencykit.datasets.runner import load_subject

    subject = load_subject("parts_cnn")
    batch = parts.generate(16, seed=5)
    x = parts.to_tensor(batch.images)
    masks = {p: m[10:] for p, m in batch.part_masks().items()}
    bank = extract(subject, x[:10], layer="features.9", method="ace", n_concepts=6, seed=0, tcav_runs=0)
    rnd = ConceptBank(torch.rand(bank.basis.shape, generator=torch.Generator().manual_seed(0)), "features.9")
    ace = best_match_iou(concept_maps(subject, bank, x[10:]).maps, masks)
    rand = best_match_iou(concept_maps(subject, rnd, x[10:]).maps, masks)
    print("ACE best-match IoU", {p: round(v[0], 3) for p, v in ace.items()}, "mean", np.mean([v[0] for v in ace.values()]))
    print("random best-match IoU", {p: round(v[0], 3) for p, v in rand.items()},
          "mean", np.mean([v[0] for v in rand.values()]))
    # robust properties only: every part is scored by both banks, IoUs are IoUs, and the ACE
    # concepts are distinct directions (no two centres the same)
    assert set(ace) == set(rand) == set(parts.PART_TYPES)
    assert all(0 <= v <= 1 for v, _ in list(ace.values()) + list(rand.values()))
    unit = bank.basis / bank.basis.norm(dim=1, keepdim=True)
    assert (unit @ unit.T - torch.eye(6)).max() < 0.999
