"""Counterfactual visual explanations: on a model whose class is decided by two known cells of
its feature grid, the greedy search (and the relaxed one) finds exactly those two swaps; the
reported edited map, run through the head again, gives the reported class; probabilities,
seeds, passes, the model's state, the picture and the errors."""
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import SaliencyError
from saliencykit.concepts.bank import layer_activations
from saliencykit.concepts.counterfactual import FeatureHead
from state import assert_same_state

CELLS = [(1, 2), (2, 3)]   # the cells of the 4x4 grid the class reads


class TwoCellNet(nn.Module):
    """32 px -> 8x8 average pooling -> a 4x4 grid of RGB means (`grid`) -> class 1 iff the red mean
    of BOTH cells (1,2) and (2,3) is high: logit1 = 5 (r12 + r23) - 7, logit0 = 0. Not a Sequential:
    the head reads the grid in its own forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.conv.bias.zero_()
        self.grid = nn.AvgPool2d(8)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0]]))
            self.fc.bias.copy_(torch.tensor([0.0, -7.0]))

    def forward(self, x):
        g = self.grid(self.conv(x))
        reds = torch.stack([g[:, 0, r, c] for r, c in CELLS], 1)
        return self.fc(reds)


def red_at(cells, size=32):
    x = torch.zeros(1, 3, size, size)
    for r, c in cells:
        x[0, 0, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 1.0
    return x


@pytest.fixture
def two_cell():
    subject = sk.Subject(TwoCellNet(), labels=["plain", "two reds"], mean=(0, 0, 0), std=(1, 1, 1),
                         input_size=(32, 32), name="two-cell")
    query = red_at([(0, 0)])                       # red elsewhere: class 0
    distractor = red_at(CELLS + [(3, 0)])          # red at both cells (and one more): class 1
    return subject, query, distractor


def _check_reported_map(subject, res, query, distractor):
    """The edited map is the query's map with exactly the reported swaps, and the head run on it
    again gives `predicted_after` and `probs_after` (to float rounding)."""
    a = layer_activations(subject, torch.cat([query, distractor]), res.layer)
    expect = a[0].clone()
    for (qr, qc), (dr, dc) in res.cells:
        expect[:, qr, qc] = a[1][:, dr, dc]
    assert torch.equal(res.edited, expect)
    with torch.no_grad():
        out = FeatureHead(subject.model, res.layer, query)(res.edited.unsqueeze(0))[0]
    assert int(out.argmax()) == res.predicted_after
    assert torch.allclose(out.softmax(-1), res.probs_after, atol=1e-6)


def test_greedy_finds_the_two_deciding_cells(two_cell):
    subject, query, distractor = two_cell
    before = subject.state_fingerprint()
    res = sk.counterfactual(subject, query, distractor, layer="grid")
    assert_same_state(before, subject.state_fingerprint())
    # one swap gives logit1 = -2 < 0 (no flip) whichever cell: the minimum is two, at the two cells,
    # each taking a distractor cell that is red (the head reads only red at the two query cells)
    assert res.n_edits == 2 and res.flipped
    assert sorted(q for q, _ in res.cells) == CELLS
    assert {d for _, d in res.cells} <= set(CELLS + [(3, 0)])
    assert res.query_class == 0 and res.distractor_class == 1 and res.predicted_after == 1
    assert res.grid == (4, 4)
    _check_reported_map(subject, res, query, distractor)
    assert torch.allclose(res.probs_before.sum(), torch.tensor(1.0)) and torch.allclose(res.probs_after.sum(),
                                                                                       torch.tensor(1.0))
    assert res.probs_before[0] > 0.5 and res.probs_after[1] > 0.5
    # passes: 2 clean rows, 16*16 pairs at step 1, 15*15 at step 2, 1 re-read of the reported map
    assert res.passes["forward"] == 2 + 256 + 225 + 1
    again = sk.counterfactual(subject, query, distractor, layer="grid")
    assert again.cells == res.cells and torch.equal(again.probs_after, res.probs_after)


def test_relaxed_finds_the_same_minimum(two_cell):
    subject, query, distractor = two_cell
    res = sk.counterfactual(subject, query, distractor, layer="grid", method="relaxed", steps=50, seed=3)
    # the gate is pushed up only where the head reads (the two cells), the sparsity term pulls the
    # rest down: rounding in gate order, the shortest flipping prefix is the two cells
    assert res.flipped and res.n_edits == 2
    assert sorted(q for q, _ in res.cells) == CELLS
    _check_reported_map(subject, res, query, distractor)
    trace = res.extras["log_prob_trace"]
    assert trace[-1] > trace[0]
    assert res.passes["backward"] == 50
    again = sk.counterfactual(subject, query, distractor, layer="grid", method="relaxed", steps=50, seed=3)
    assert again.cells == res.cells and again.extras["log_prob_trace"] == trace


def test_picture_shows_both_images(two_cell, tmp_path):
    subject, query, distractor = two_cell
    res = sk.counterfactual(subject, query, distractor, layer="grid")
    img = res.image()
    assert img.width > 2 * 224 and img.height >= 224     # both images, enlarged from 32 px
    import numpy as np

    arr = np.asarray(img)
    # the first pair's colour (PALETTE[0]) appears on both halves
    from saliencykit.concepts.pictures import PALETTE

    hit = (arr == np.array(PALETTE[0], dtype=np.uint8)).all(-1)
    half = img.width // 2
    assert hit[:, :half].any() and hit[:, half:].any()
    out = res.save(tmp_path / "cf.png")
    assert out.exists() and out.stat().st_size > 0


def test_bad_input(two_cell):
    subject, query, distractor = two_cell
    with pytest.raises(SaliencyError, match="both predicted"):
        sk.counterfactual(subject, query, red_at([(3, 3)]), layer="grid")
    with pytest.raises(SaliencyError, match="same grid|input size"):
        sk.counterfactual(subject, query, torch.zeros(1, 3, 48, 48), layer="grid")
    with pytest.raises(SaliencyError, match="spatial"):
        sk.counterfactual(subject, query, distractor, layer="fc")
    with pytest.raises(SaliencyError, match="one image"):
        sk.counterfactual(subject, torch.cat([query, query]), distractor, layer="grid")
    with pytest.raises(SaliencyError, match="unknown counterfactual method"):
        sk.counterfactual(subject, query, distractor, layer="grid", method="exact")


class SharedAct(nn.Module):
    """One ReLU module called twice per forward at two sizes (like EfficientNet's shared swish)."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        a = self.act(x)                   # [B, 3, 8, 8]
        b = self.act(self.pool(a) - 0.5)  # [B, 3, 4, 4]
        return b.flatten(1)[:, :2]


def test_forward_replacing_picks_the_call_with_the_map_shape():
    from saliencykit.hooks import forward_replacing

    model, x = SharedAct(), torch.rand(2, 3, 8, 8)
    new = torch.full((2, 3, 4, 4), 7.0)
    out = forward_replacing(model, "act", x, new)        # only the second call has the map's shape
    assert torch.equal(out, torch.full((2, 2), 7.0))
    new8 = torch.zeros(2, 3, 8, 8)                        # the first call: the second runs on zeros
    assert torch.equal(forward_replacing(model, "act", x, new8), torch.zeros(2, 2))
    with pytest.raises(SaliencyError, match="exactly one call"):
        forward_replacing(model, "act", x, torch.zeros(2, 3, 5, 5))
