"""CRAFT's recursive split: a model whose later layer merges the red and green channels of its
earlier layer into one "warm" channel (blue stays apart). Split at the earlier layer, the warm
concept's sub-concepts are red and green."""
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import SaliencyError
from saliencykit.concepts import extract
from test_bank import colour_scenes


class TwoStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 1, bias=False)
        self.act1 = nn.ReLU()       # red, green, blue
        self.conv2 = nn.Conv2d(3, 2, 1, bias=False)
        self.act2 = nn.ReLU()       # warm (red + green), blue
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.conv2.weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).view(2, 3, 1, 1))

    def forward(self, x):
        return self.fc(self.pool(self.act2(self.conv2(self.act1(self.conv1(x))))).flatten(1))


def test_split_finds_the_sub_concepts_at_an_earlier_layer():
    subject = sk.Subject(TwoStage(), labels=["a", "b"], mean=(0, 0, 0), std=(1, 1, 1), input_size=(32, 32),
                         layer="act2")
    x, _ = colour_scenes(24)
    bank = extract(subject, x, layer="act2", n_concepts=2, seed=0)
    warm = int((bank.basis / bank.basis.norm(dim=1, keepdim=True))[:, 0].argmax())
    sub = bank.split(warm, subject, x, layer="act1", n_concepts=2)
    assert sub.layer == "act1" and sub.basis.shape == (2, 3)
    assert sub.extras["parent"] == {"layer": "act2", "concept": warm, "method": "craft", "n_concepts": 2}
    # the crops the warm concept leads are mostly red and green: its sub-concepts are those two
    # channels of act1 (a little blue where a crop also catches a blue rectangle)
    unit = sub.basis / sub.basis.norm(dim=1, keepdim=True)
    assert sorted(unit.argmax(1).tolist()) == [0, 1]
    assert (unit.max(1).values > 0.9).all()
    again = bank.split(warm, subject, x, layer="act1", n_concepts=2)
    assert torch.equal(again.basis, sub.basis)
    with pytest.raises(SaliencyError, match="not earlier"):
        bank.split(warm, subject, x, layer="act2")
    with pytest.raises(SaliencyError, match="too few for 40 sub-concepts"):
        bank.split(warm, subject, x[:2], layer="act1", n_concepts=40)
    with pytest.raises(SaliencyError, match="concept index 7"):
        bank.split(7, subject, x, layer="act1")
