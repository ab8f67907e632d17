"""Class summaries on planted evidence: class 0 of a colour model reads red and blue alike; 70 % of
its images hold a red square and 30 % a blue one (each with a green distractor the class ignores).
Two summaries must split the images exactly by the colour of their square, with frequencies 0.7
and 0.3, and each member's box must be its square."""
import numpy as np
import pytest
import torch

import saliencykit as sk
from saliencykit import SaliencyError
from saliencykit.concepts import summarize_class
from saliencykit.concepts.summaries import largest_box, salient_mask
from test_bank import ColourNet


def _red_or_blue():
    net = ColourNet()
    with torch.no_grad():
        net.fc.weight.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))    # class 0: red + blue
    return sk.Subject(net, labels=["warm", "green"], mean=(0, 0, 0), std=(1, 1, 1), input_size=(32, 32), layer="act")


def _scenes(n=20, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.zeros(n, 3, 32, 32)
    colours, boxes = [], []
    for i in range(n):
        ch = 0 if i < round(0.7 * n) else 2
        t, l_ = rng.integers(0, 12, 2)
        x[i, ch, t:t + 8, l_:l_ + 8] = 1.0
        x[i, 1, 24:30, 24:30] = 1.0 if not (t + 8 > 24 and l_ + 8 > 24) else 0.0
        colours.append(ch)
        boxes.append((int(t), int(l_), int(t) + 8, int(l_) + 8))
    return x, np.array(colours), boxes


def test_summaries_split_the_planted_evidence():
    subject = _red_or_blue()
    x, colours, boxes = _scenes()
    res = summarize_class(subject, x, target=0, method="gradcam", n_summaries=2, keep=0.2, seed=0)
    assert [round(s.frequency, 2) for s in res.summaries] == [0.7, 0.3]
    # every image of a summary has the same square colour: the red ones first (the larger summary)
    assert set(colours[res.summaries[0].members]) == {0} and set(colours[res.summaries[1].members]) == {2}
    assert (res.assignment == (colours == 2)).all()
    # Grad-CAM of "red + blue" is the square itself: the salient box is the square
    for s in res.summaries:
        for i, b in zip(s.members, s.boxes):
            assert b == boxes[i]
        assert s.spread < 1e-6           # identical features inside every red (or blue) square
    assert res.seed == 0 and res.passes["forward"] >= 1 and res.passes["backward"] >= 1
    again = summarize_class(subject, x, target=sk.Class(0), n_summaries=2, seed=0)
    assert again.assignment.tolist() == res.assignment.tolist()
    d = res.to_dict()
    assert d["images"] == 20 and len(d["summaries"]) == 2


def test_default_class_is_the_most_predicted_one():
    subject = _red_or_blue()
    x, _, _ = _scenes()
    x[:3] = 0
    x[:3, 1, 4:20, 4:20] = 1.0        # three images of green only: predicted "green", left out
    res = summarize_class(subject, x, n_summaries=2)
    assert res.cls == 0 and len(res.assignment) == 17
    assert res.to_dict()["class"] == 0


def test_salient_mask_and_box():
    m = torch.zeros(1, 8, 8)
    m[0, 2:4, 3:6] = 1.0
    mask = salient_mask(m, 0.5)             # half the pixels asked, but the zeros are not salient
    assert mask.sum() == 6
    assert largest_box(mask[0].numpy()) == (2, 3, 4, 6)


def test_bad_input():
    subject = _red_or_blue()
    x, _, _ = _scenes(4)
    with pytest.raises(SaliencyError, match="too few"):
        summarize_class(subject, x, target=0, n_summaries=5)
    with pytest.raises(SaliencyError, match="keep"):
        summarize_class(subject, x, target=0, keep=1.5)
    with pytest.raises(SaliencyError, match="one class"):
        summarize_class(subject, x, target=[0, 1])
