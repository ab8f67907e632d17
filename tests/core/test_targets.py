"""Targets: resolution, scores, per-example lists, errors."""
import pytest
import torch

import saliencykit as sk
from saliencykit import Class, Contrast, Group, SaliencyError, TopK


def _logits():
    torch.manual_seed(0)
    return torch.randn(3, 5)


def test_class_default_is_top1_and_held_fixed(tiny):
    logits = _logits()
    r = Class().resolve(tiny, logits)
    assert [p.indices[0] for p in r.pos] == logits.argmax(1).tolist()
    # the score on *other* logits still reads the class fixed on the clean ones
    other = torch.randn(3, 5)
    assert torch.equal(r.score(other), other[torch.arange(3), logits.argmax(1)])


def test_contrast_group_topk_scores(tiny):
    logits = _logits()
    c = Contrast("c1", vs=3).resolve(tiny, logits)
    assert torch.allclose(c.score(logits), logits[:, 1] - logits[:, 3])
    g = Group(["c0", "c2"]).resolve(tiny, logits)
    assert torch.allclose(g.score(logits), torch.logsumexp(logits[:, [0, 2]], 1))
    gp = Group([0, 2], output="prob").resolve(tiny, logits)
    assert torch.allclose(gp.score(logits), logits.softmax(1)[:, [0, 2]].sum(1))
    t = TopK(2).resolve(tiny, logits)
    assert torch.allclose(t.score(logits), logits.topk(2, 1).values.sum(1))
    # contrast of groups: why {0,2} and not {1}
    cg = Contrast(Group([0, 2]), vs=Group([1])).resolve(tiny, logits)
    assert torch.allclose(cg.score(logits), torch.logsumexp(logits[:, [0, 2]], 1) - logits[:, 1])


def test_rows_map_repeated_copies(tiny):
    logits = _logits()
    r = Class([0, 1, 2]).resolve(tiny, logits)
    rows = torch.tensor([2, 2, 0, 1])
    big = torch.randn(4, 5)
    assert torch.equal(r.score(big, rows=rows), big[torch.arange(4), torch.tensor([2, 2, 0, 1])])


def test_per_example_length_mismatch_is_an_error(tiny):
    with pytest.raises(SaliencyError, match="2 targets given for a batch of 3"):
        Class([0, 1]).resolve(tiny, _logits())
    with pytest.raises(SaliencyError, match="batch of 2"):
        sk.explain(tiny, torch.randn(2, 3, 32, 32), method="saliency", target=[0, 1, 2])


def test_target_errors(tiny, lite0):
    with pytest.raises(SaliencyError, match="out of range"):
        Class(7).resolve(tiny, _logits())
    with pytest.raises(SaliencyError, match="unknown class label"):
        Class("c9").resolve(tiny, _logits())
    with pytest.raises(SaliencyError, match="did you mean") as err:  # labels and synonyms overlap: no repeats
        Class("egyptain cat").resolve(lite0, torch.randn(1, 1000))
    hints = str(err.value).split("did you mean ")[1].rstrip("?").split(", ")
    assert hints[0] == "'egyptian cat'" and len(hints) == len(set(hints))
    with pytest.raises(SaliencyError, match="two different classes"):
        Contrast(1, vs="c1").resolve(tiny, _logits())
    with pytest.raises(SaliencyError, match="unknown group"):
        Group("dgo").resolve(lite0, torch.randn(1, 1000))
    with pytest.raises(SaliencyError, match="output"):
        Class(1, output="probability")


def test_named_imagenet_groups(lite0):
    r = Group("dog").resolve(lite0, torch.randn(1, 1000))
    assert r.pos[0].indices[0] == 151 and r.pos[0].indices[-1] == 268 and len(r.pos[0].indices) == 118
    assert set(Group("cat").resolve(lite0, torch.randn(1, 1000)).pos[0].indices) == {281, 282, 283, 284, 285}
