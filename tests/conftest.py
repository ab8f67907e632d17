"""Shared fixtures: tiny models with known structure, and the bundled pretrained model."""
import os
import sys

import pytest
import torch
from torch import nn

# the helpers beside this file (state.py, tiny_clip.py) import from any test folder
sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(int(os.environ.get("SK_TEST_THREADS", "2")))


class TinyCNN(nn.Module):
    """conv-relu-conv-relu -> GAP -> linear: CAM == Grad-CAM == HiResCAM (x hw) holds exactly."""

    def __init__(self, classes=5, bias=True, act=nn.ReLU, inplace=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.act1 = act(inplace=inplace) if act in (nn.ReLU, nn.ReLU6) else act()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2, bias=bias)
        self.act2 = act(inplace=inplace) if act in (nn.ReLU, nn.ReLU6) else act()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes, bias=bias)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    from saliencykit import Subject

    return Subject(TinyCNN(), labels=[f"c{i}" for i in range(5)], input_size=(32, 32), name="tiny")


@pytest.fixture
def tiny_x():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=g)


@pytest.fixture(scope="session")
def lite0():
    from saliencykit import load_model

    return load_model("efficientnet_lite0")


@pytest.fixture(scope="session")
def mobilenet():
    from saliencykit import load_model

    return load_model("mobilenet_v2")


@pytest.fixture(scope="session")
def chelsea():
    from saliencykit import data

    return data.image("chelsea")


@pytest.fixture(scope="module")
def clip():
    """A small random Hugging Face CLIP subject (tests/tiny_clip.py); needs transformers."""
    from tiny_clip import make_tiny_clip

    return make_tiny_clip()


@pytest.fixture(autouse=True)
def _quiet_load_average(monkeypatch):
    """Commands run in-process see an idle machine, so the busy-machine note (tests/cli, which sets
    its own load average) does not join the lines a test compares on a loaded CI runner."""
    import os

    if hasattr(os, "getloadavg"):
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
