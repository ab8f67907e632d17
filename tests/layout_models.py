"""Tiny models of every input layout shared by tests/methods/test_layouts_more.py and
test_layouts_paths_lrp.py (float64 where built here; seeded), and their input fixtures."""
import pytest
import torch
from torch import nn

import saliencykit as sk


def flat_mlp(features=6, classes=3):
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, classes)).double().eval()


class Clip3d(nn.Module):
    """[B,T,C,H,W] clips read by a 3-D convolution over (T,H,W): its output is [B,C',T/2,H/2,W/2]."""

    def __init__(self, classes=3):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv3d(3, 4, 3, padding=1, stride=2)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        a = torch.relu(self.conv(x.permute(0, 2, 1, 3, 4)))
        return self.fc(a.mean((2, 3, 4)))


class FrameNet(nn.Module):
    """[B,T,C,H,W] clips read frame by frame: the conv's output is [B*T,C',H,W]."""

    def __init__(self, classes=3):
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        b, t = x.shape[:2]
        f = torch.relu(self.conv(x.flatten(0, 1))).mean((2, 3)).view(b, t, -1).mean(1)
        return self.fc(f)


class PooledClip(nn.Module):
    """A clip model whose averages are pooling modules (Zennit splits a pooling module's relevance
    by the Norm rule, as we do; a functional mean it splits evenly): a 3-D conv over the permuted
    clip, or a frame-by-frame 2-D conv over its flattened frames."""

    def __init__(self, per_frame):
        super().__init__()
        torch.manual_seed(18)
        self.per_frame = per_frame
        self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=2) if per_frame else nn.Conv3d(3, 4, 3, padding=1, stride=2)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1) if per_frame else nn.AdaptiveAvgPool3d(1)
        self.time = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        b, t = x.shape[:2]
        if self.per_frame:
            f = self.pool(self.act(self.conv(x.flatten(0, 1)))).view(b, t, -1).transpose(1, 2)
            return self.fc(self.time(f).flatten(1))
        return self.fc(self.pool(self.act(self.conv(x.permute(0, 2, 1, 3, 4)))).flatten(1))


def clip_subject(model=None):
    return sk.Subject((model or Clip3d()).double().eval(), layout="BTCHW", input_size=(6, 6))


def series_cnn(stride=1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 5, 3, padding=1, stride=stride),
                         nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(5, 3)).double().eval()


def volume_cnn(stride=1):
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 5, 3, padding=1, stride=stride),
                         nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(5, 3)).double().eval()


@pytest.fixture
def features():
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture
def clip():
    return torch.randn(2, 4, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
