"""The two-logit linear toy model of the metric spec, shared by tests/metrics/test_metrics.py and
test_metrics_layouts.py."""
import torch
from torch import nn


class Linear2(nn.Module):
    """f(x) = [w.x + b, 0] over every axis of x: two logits (softmax is monotone in the first), and
    removing a set of positions onto zeros lowers the first logit by exactly the sum of w*x over them
    (and over all channels)."""

    def __init__(self, w, b=0.0):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x):
        lin = (x * self.w).flatten(1).sum(1) + self.b
        return torch.stack([lin, torch.zeros_like(lin)], 1)
