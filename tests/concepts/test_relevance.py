"""Relevance maximisation against activation maximisation on a constructed model where a channel
is most active exactly where it does not matter: the red channel feeds the class only through
relu(red - green), so on red-and-green squares it is very active and irrelevant."""
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import SaliencyError
from saliencykit.concepts import relevance_max


class GateNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.act = nn.ReLU()
        self.mix = nn.Conv2d(3, 1, 1, bias=False)
        self.gate = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.mix.weight.copy_(torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))

    def forward(self, x):
        return self.fc(self.pool(self.gate(self.mix(self.act(self.conv(x))))).flatten(1))


def _images():
    """Images 0-3: a bright red-and-green square (red active, cancelled); 4-7: a dim red square
    (red less active, and all of class 0's evidence). Squares at known places."""
    x = torch.zeros(8, 3, 32, 32)
    corners = [(2, 2), (2, 20), (20, 2), (20, 20)] * 2
    for i, (t, l_) in enumerate(corners):
        if i < 4:
            x[i, 0, t:t + 8, l_:l_ + 8] = 1.0
            x[i, 1, t:t + 8, l_:l_ + 8] = 1.0
        else:
            x[i, 0, t:t + 8, l_:l_ + 8] = 0.5
    return x, corners


def test_relevance_max_differs_from_activation_max():
    subject = sk.Subject(GateNet(), labels=["red", "other"], mean=(0, 0, 0), std=(1, 1, 1), input_size=(32, 32),
                         layer="act")
    x, corners = _images()
    before = subject.state_fingerprint()
    res = relevance_max(subject, x, "act", 0, n=4, target=sk.Class(0), patch=0.25)
    assert sorted(res.activation.indices) == [0, 1, 2, 3]         # most active: the bright cancelled squares
    assert sorted(res.relevance.indices) == [4, 5, 6, 7]          # most relevant: the dim squares that count
    # by definition: the cancelled squares get no relevance at all, the dim ones all of it
    assert torch.all(res.relevance_per_image[:4].abs() < 1e-7) and torch.all(res.relevance_per_image[4:] > 0)
    assert torch.allclose(res.activation_per_image, torch.tensor([1.0] * 4 + [0.5] * 4))
    # each patch is centred on the most relevant cell, which lies on the square (on a tie, its first
    # cell, the top-left corner: the crop then covers a quarter of the square)
    for i, (t, l_, b, r) in zip(res.relevance.indices, res.relevance.boxes):
        ct, cl = corners[i]
        assert b - t == 8 and r - l_ == 8 and abs(t - ct) <= 4 and abs(l_ - cl) <= 4
    assert res.relevance.patches.shape == (4, 3, 8, 8) and (res.relevance.patches[:, 0] > 0).float().mean() >= 0.25
    assert res.passes["backward"] == 1.0
    from state import assert_same_state

    assert_same_state(before, subject.state_fingerprint())


def test_bad_input_is_named():
    subject = sk.Subject(GateNet(), mean=(0, 0, 0), std=(1, 1, 1), input_size=(32, 32), layer="act")
    x, _ = _images()
    with pytest.raises(SaliencyError, match="channel 5 is not in 0..2"):
        relevance_max(subject, x, "act", 5)
    with pytest.raises(SaliencyError, match="no spatial output"):
        relevance_max(subject, x, "fc", 0)
    with pytest.raises(SaliencyError, match="patch must be"):
        relevance_max(subject, x, "act", 0, patch=2)
