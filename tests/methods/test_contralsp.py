"""ContraLSP on series: the gates open where the model reads and close elsewhere, channel by
channel; the run is seeded (same seed, same mask; another seed, another mask over the same
region); every step is one counted gradient pass; on the shipped series CNN its mask finds the
planted motifs far better than a random map; bad parameters are refused by name."""
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import SaliencyError

from state import assert_same_state  # noqa: E402  (tests/ is on sys.path)

T = 64


class Window(nn.Module):
    """Logit 0 = energy of steps 20..29 of channel 0: only that window of that channel matters."""

    def forward(self, x):
        s = (x[:, 0, 20:30] ** 2).sum(-1)
        return torch.stack([s, 0 * s], 1)


def _clsp(subject, x, seed=0, **p):
    return sk.explain(subject, x, "contralsp", target=sk.Class(0), seed=seed, params={"contralsp": p})


def _inside_outside(mask):
    """Mean of a [B,T] mask on steps 20-29, and off them with 2 steps of margin (the smoothing window)."""
    return mask[:, 20:30].mean(1), torch.cat([mask[:, :18], mask[:, 32:]], 1).mean(1)


def test_gates_open_on_the_window_the_model_reads_and_are_seeded():
    subject = sk.Subject(Window(), layout="BCT")
    x = 2 * torch.randn(2, 1, T, generator=torch.Generator().manual_seed(0))
    before = subject.state_fingerprint()
    e = _clsp(subject, x, steps=120)
    inside, outside = _inside_outside(e.maps)
    # the window's steps keep the score (mask near 1: measured 1.00), the l0 gates close the rest
    # (measured < 1e-3); 0.6 / 0.1 leave room for the seed's noise, as learned_mask's test does
    assert (inside > 0.6).all() and (outside < 0.1).all(), (inside, outside)
    assert e.maps.shape == (2, T) and e.attributions.shape == (2, 1, T)
    assert e.maps.min() >= 0 and e.maps.max() <= 1
    # one forward and one backward of the model per step (the target's clean forward is charged too)
    assert e.passes["backward"] == 120 and e.passes["forward"] == 121 and e.seed == 0
    assert e.extras["references"] == "flat"       # one class in the batch: the counterfactual is the flat series
    assert_same_state(before, subject.state_fingerprint())
    again = _clsp(subject, x, steps=120)
    assert torch.equal(again.maps, e.maps)                     # seeded noise and network start
    other = _clsp(subject, x, seed=1, steps=120)
    assert not torch.equal(other.maps, e.maps) and other.seed == 1
    inside, outside = _inside_outside(other.maps)
    assert (inside > 0.6).all() and (outside < 0.1).all(), (inside, outside)


def test_gates_close_on_the_channel_the_model_does_not_read():
    # per-channel sparsity, which a mask over time alone (learned_mask) cannot express
    subject = sk.Subject(Window(), layout="BCT")
    x = 2 * torch.randn(2, 2, T, generator=torch.Generator().manual_seed(3))
    e = _clsp(subject, x, steps=120)
    read, unread = e.attributions[:, 0], e.attributions[:, 1]
    assert unread.max() < 0.05, unread.max()                   # measured: exactly 0 (the gates clip at 0)
    inside, outside = _inside_outside(read)
    assert (inside > 0.6).all() and (outside < 0.1).all(), (inside, outside)
    # the map is the channel reduction (default max): here the read channel's mask
    assert torch.equal(e.maps, e.attributions.amax(1))


def test_negatives_given_and_taken_from_the_batch():
    subject = sk.Subject(Window(), layout="BCT")
    x = 2 * torch.randn(1, 1, T, generator=torch.Generator().manual_seed(5))
    neg = 0.1 * torch.randn(3, 1, T, generator=torch.Generator().manual_seed(6))
    e = _clsp(subject, x, steps=60, negatives=neg)
    assert e.extras["references"] == "negatives"
    # the mask keeps the window's energy (steps where x is near 0 matter little and may close) and drops the rest
    energy = x[0, 0, 20:30] ** 2
    assert (e.maps[0, 20:30] * energy).sum() / energy.sum() > 0.9
    assert _inside_outside(e.maps)[1].item() < 0.1
    # a model whose class is the sign of the mean: a batch of both signs holds its own references
    sign = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        sign[2].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        sign[2].bias.zero_()
    xb = torch.randn(4, 1, T, generator=torch.Generator().manual_seed(7)) + torch.tensor([1.0, -1, 1, -1]).view(4, 1, 1)
    eb = sk.explain(sk.Subject(sign, layout="BCT"), xb, "contralsp", params={"contralsp": {"steps": 2}})
    assert eb.extras["references"] == "batch"


def test_model_left_as_found_also_under_no_grad():
    # a model with weights, in training mode, called from a no_grad block: the method's own graph
    # (gates, temperature, counterfactual network) still trains, and the model comes back untouched
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.Dropout(0.5), nn.Tanh(), nn.AdaptiveMaxPool1d(1),
                        nn.Flatten(), nn.Linear(4, 3)).train()
    subject = sk.Subject(net, layout="BCT")
    x = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(8))
    before = subject.state_fingerprint()
    with torch.no_grad():
        e = sk.explain(subject, x, "contralsp", params={"contralsp": {"steps": 5}})
    assert_same_state(before, subject.state_fingerprint())
    assert e.passes["backward"] == 5 and torch.isfinite(e.attributions).all()
    assert not torch.equal(e.attributions, torch.full_like(e.attributions, e.attributions.flatten()[0]))  # it moved


def test_recovers_planted_motifs():
    # the shipped series CNN on 16 held-out series (the learned_mask test's bench): measured with
    # 100 steps pointing 0.94, energy 0.88, AUC 0.94, against a random map's 0.13, 0.20, 0.48
    # (learned_mask: 0.81, 0.82, 0.81)
    from saliencykit.benchmarks.series import leaderboard as L

    bench = L.SeriesBench(sk.load_model("series_cnn"), n=16)
    found = bench.score(L.library_maps(bench, "contralsp", params={"steps": 100}))
    rnd = bench.score(L.random_maps())
    assert found["energy"] > rnd["energy"] + 0.4 and found["pointing"] > rnd["pointing"] + 0.4, found
    assert found["auc"] > 0.8, found


def test_bad_parameters():
    subject = sk.Subject(Window(), layout="BCT")
    x = torch.randn(1, 1, T)
    for params, message in (({"steps": 0}, "steps"), ({"sigma": 0}, "sigma"), ({"l0": -1}, "l0"),
                            ({"margin": 1.5}, "margin must be at most 1"), ({"window": 100}, "longer than the series"),
                            ({"reduce": "median"}, "unknown channel reduction"),
                            ({"negatives": torch.randn(2, 3, T)}, r"negatives must be series shaped \[N,1,64\]"),
                            ({"negatives": [1, 2]}, "negatives must be a float tensor")):
        with pytest.raises(SaliencyError, match=message):
            sk.explain(subject, x, "contralsp", params={"contralsp": params})
    image = sk.Subject(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.LazyLinear(2)))
    with pytest.raises(SaliencyError, match="cannot explain a BCHW input"):
        sk.explain(image, torch.rand(1, 3, 8, 8), "contralsp")
