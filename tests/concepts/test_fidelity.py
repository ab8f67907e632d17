"""Ranking fidelity: on a model whose class reads one planted concept only, the curves start and
end where the definition says, the ranking that puts that concept first beats random rankings
(deletion falls faster, insertion rises faster) and the one that puts it last does not; the
Sobol ranking passes; seeded, pass-counted, bad rankings named."""
import pytest
import torch

import saliencykit as sk
from saliencykit import SaliencyError
from saliencykit.concepts import extract, importance
from saliencykit.concepts.fidelity import area, ranking_fidelity, ranking_from, step_masks
from test_bank import colour_scenes
from test_importance import _red_only


@pytest.fixture(scope="module")
def setup():
    subject = _red_only()
    x, _ = colour_scenes(12)
    bank = extract(subject, x, layer="act", n_concepts=3, seed=0)
    red = int((bank.basis / bank.basis.norm(dim=1, keepdim=True))[:, 0].argmax())
    return subject, x[:4], bank, red


def test_curves_follow_the_definition(setup):
    subject, x, bank, red = setup
    others = [j for j in range(3) if j != red]
    res = ranking_fidelity(subject, bank, x, [red] + others, target=sk.Class(0), n_random=8, seed=0)
    with torch.no_grad():
        own = subject.model(x)[:, 0]
    # nothing removed / everything inserted: the model's own score (the residual completes the activation)
    assert torch.allclose(res.deletion[:, 0], own, atol=1e-4) and torch.allclose(res.insertion[:, -1], own, atol=1e-4)
    # everything removed = nothing inserted: the residual alone
    assert torch.allclose(res.deletion[:, -1], res.insertion[:, 0], atol=1e-5)
    # class 0 reads the red concept only: removing it first drops the score to the residual's at
    # once, and removing the others changes nothing after that
    assert torch.allclose(res.deletion[:, 1], res.deletion[:, -1], atol=1e-4)
    # (the red concept is all of the red channel, so the residual's score is 0)
    assert (res.deletion[:, 0] > 0.05).all() and res.deletion[:, 1].abs().max() < 1e-5
    assert res.beats_random.all()
    assert torch.allclose(res.deletion_area, area(res.deletion))
    assert res.passes["forward"] == 1 + 9 * 2 * 4          # clean pass + (1 + 8 random) x 2 curves x (k + 1) rows
    worst = ranking_fidelity(subject, bank, x, others + [red], target=sk.Class(0), n_random=8, seed=0)
    assert not worst.beats_random.any()
    assert (worst.deletion_area > res.deletion_area).all()
    again = ranking_fidelity(subject, bank, x, [red] + others, target=sk.Class(0), n_random=8, seed=0)
    assert torch.equal(again.random_deletion_area, res.random_deletion_area)


def test_the_sobol_ranking_passes(setup):
    subject, x, bank, red = setup
    imp = importance(subject, bank, x, target=sk.Class(0), n=32, seed=0, tcav=True)
    for by in ("sobol", "gradient"):
        order = ranking_from(imp, by)
        assert (order[:, 0] == red).all()
        assert ranking_fidelity(subject, bank, x, order, target=sk.Class(0), seed=0).beats_random.all()
    assert ranking_from(imp, "tcav").shape == (4, 3)


def test_step_masks():
    dele, ins = step_masks(torch.tensor([2, 0, 1]), 3)
    assert ins.tolist() == [[0, 0, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1]]
    assert torch.equal(dele, 1 - ins)


def test_bad_rankings_are_named(setup):
    subject, x, bank, _ = setup
    with pytest.raises(SaliencyError, match="permutation of 0..2"):
        ranking_fidelity(subject, bank, x, [0, 0, 1])
    with pytest.raises(SaliencyError, match="permutation"):
        ranking_fidelity(subject, bank, x, [0, 1])
    with pytest.raises(SaliencyError, match="ranking_from"):
        ranking_fidelity(subject, bank, x, "sobol")
