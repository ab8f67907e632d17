"""`Subject.explaining()` looks only at what it must change: the states it restores are compared
before, inside and after, for the three ways a module can carry an in-place flag."""
import torch
from torch import nn

import saliencykit as sk


class ClassFlag(nn.Module):
    inplace = True    # a class attribute, not set in __init__

    def forward(self, x):
        return x


class PropertyFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self._on = True

    @property
    def inplace(self):
        return self._on

    @inplace.setter
    def inplace(self, v):
        self._on = v

    def forward(self, x):
        return x


def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), ClassFlag(), PropertyFlag(), nn.BatchNorm2d(4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_explaining_switches_and_restores_every_kind_of_flag():
    for training in (True, False):
        model = _model().train(training)
        s = sk.Subject(model, input_size=(8, 8))
        before = s.state_fingerprint()
        with s.explaining():
            assert not any(m.training for m in model.modules())
            assert [m.inplace for m in (model[1], model[2], model[3])] == [False, False, False]
        after = s.state_fingerprint()
        assert before["training"] == after["training"] and before["inplace"] == after["inplace"]
        assert model[1].inplace and model[2].inplace and model[3].inplace
        assert "inplace" not in model[2].__dict__ or model[2].__dict__["inplace"] is True


def test_a_train_override_still_runs_when_a_module_trains():
    # eval() goes through the model's own train(False) whenever something is in training mode
    calls = []

    class Custom(nn.Sequential):
        def train(self, mode=True):
            calls.append(mode)
            return super().train(mode)

    model = Custom(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).train()
    with sk.Subject(model, input_size=(8, 8)).explaining():
        assert not model.training
    assert False in calls and model.training
