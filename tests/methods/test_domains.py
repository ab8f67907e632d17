"""Cross-domain integrated gradients of series: a model that reads one frequency puts all of its
attribution on that frequency bin; the domain attributions add up to the time-domain ones (IG's
completeness carried over: the transform is linear and invertible); and the frequency-domain
attributions equal Captum's IG run on the model composed with the inverse FFT, with the
frequency coefficients (real and imaginary parts) as its inputs."""
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import SaliencyError

T = 64


class OneFrequency(nn.Module):
    """Logit 0 = <x, cos(2 pi 5 t / T)>: a linear read of frequency bin 5 only."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.cos(2 * torch.pi * 5 * torch.arange(T, dtype=torch.float64) / T))

    def forward(self, x):
        s = (x[:, 0] * self.w).sum(-1)
        return torch.stack([s, -s], 1)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.Tanh(), nn.Conv1d(4, 4, 3, padding=1), nn.Softplus(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3)).double()


def _cdig(subject, x, target, **p):
    return sk.explain(subject, x, "cross_domain_ig", target=target, params={"cross_domain_ig": p})


def test_a_model_of_one_frequency_is_explained_by_that_bin():
    subject = sk.Subject(OneFrequency(), layout="BCT")
    x = torch.randn(2, 1, T, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    e = _cdig(subject, x, sk.Class(0), domain="frequency", steps=4)
    r = e.raw[:, 0]                                               # [2, 33] bins
    assert r.shape == (2, T // 2 + 1) and e.maps.shape == (2, T)
    # a linear model: IG is exact, all of s(x) - s(0) sits on bin 5, none elsewhere (float64 rounding)
    s = subject.forward(x)[:, 0].detach()
    assert torch.allclose(r[:, 5], s, rtol=1e-12)
    others = torch.cat([r[:, :5], r[:, 6:]], 1)
    assert others.abs().max() < 1e-12
    assert e.extras["frequencies"][5] == 5 / T


@pytest.mark.parametrize("domain", ["frequency", "time_frequency"])
def test_domain_attributions_add_up_to_the_time_attributions(domain):
    subject = sk.Subject(_net(), layout="BCT")
    x = torch.randn(3, 2, T, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    e = _cdig(subject, x, sk.Class(1), domain=domain, steps=16, n_fft=16 if domain != "frequency" else None)
    ig = sk.explain(subject, x, "integrated_gradients", target=sk.Class(1),
                    params={"integrated_gradients": {"steps": 16}})
    assert torch.allclose(e.attributions, ig.attributions, rtol=0, atol=1e-14)   # the same path and quadrature
    assert max(abs(v) for v in e.extras["domain_sum_error"]) < 1e-12
    if domain == "time_frequency":
        assert e.raw.shape[:3] == (3, 2, 9) and e.extras["n_fft"] == 16 and e.extras["hop"] == 4


def test_frequency_ig_agrees_with_captum_on_the_composed_model():
    captum = pytest.importorskip("captum.attr")
    net = _net()
    subject = sk.Subject(net, layout="BCT")
    x = torch.randn(2, 2, T, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ours = _cdig(subject, x, sk.Class(2), domain="frequency", steps=20).raw           # [2,2,33]

    class Composed(nn.Module):                     # frequency coefficients (re, im) -> the model's logits
        def forward(self, r):
            return net(torch.fft.irfft(torch.view_as_complex(r.contiguous()), n=T, dim=-1))

    X = torch.view_as_real(torch.fft.rfft(x, dim=-1))
    theirs = captum.IntegratedGradients(Composed()).attribute(X, baselines=torch.zeros_like(X), target=2,
                                                               n_steps=20, method="gausslegendre")
    # the same integral with 20 Gauss-Legendre nodes in float64; measured 7e-11 apart at a largest value
    # of 2e-2 (the two differ in how they sum the nodes and in the FFT's rounding): 1e-8 of the largest
    assert torch.allclose(ours, theirs.sum(-1), rtol=0, atol=1e-8 * float(ours.abs().max()))


def test_bad_input():
    subject = sk.Subject(_net(), layout="BCT")
    x = torch.randn(1, 2, T, dtype=torch.float64)
    with pytest.raises(SaliencyError, match="unknown domain"):
        _cdig(subject, x, sk.Class(0), domain="wavelet")
    with pytest.raises(SaliencyError, match="more than half"):
        _cdig(subject, x, sk.Class(0), domain="time_frequency", n_fft=16, hop=12)
    with pytest.raises(SaliencyError, match="longer than the series"):
        _cdig(subject, x, sk.Class(0), domain="time_frequency", n_fft=128)
    image = sk.Subject(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.LazyLinear(2)))
    with pytest.raises(SaliencyError):
        sk.explain(image, torch.rand(1, 3, 8, 8), "cross_domain_ig")


def test_spectrum_plot(tmp_path):
    # the frequency view draws one bar per bin; an explanation without bins is refused by name
    from saliencykit.present.viz import spectrum_plot

    subject = sk.Subject(OneFrequency(), layout="BCT")
    x = torch.randn(1, 1, T, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    e = _cdig(subject, x, sk.Class(0), domain="frequency", steps=4)
    fig = spectrum_plot(e)
    assert len(fig.axes[0].patches) == T // 2 + 1
    tf = _cdig(subject, x, sk.Class(0), domain="time_frequency", steps=4, n_fft=16)
    assert spectrum_plot(tf, path=tmp_path / "tf.png").exists()
    with pytest.raises(SaliencyError, match="cross-domain IG"):
        spectrum_plot(sk.explain(subject, x, "saliency", target=sk.Class(0)))


# ------------------------------------------------------------------ learned masks over time
class Window(nn.Module):
    """Logit 0 = energy of steps 20..29 of channel 0: only that window matters."""

    def forward(self, x):
        s = (x[:, 0, 20:30] ** 2).sum(-1)
        return torch.stack([s, 0 * s], 1)


@pytest.mark.parametrize("contrast", [False, True])
def test_learned_mask_finds_the_window_the_model_reads(contrast):
    subject = sk.Subject(Window(), layout="BCT")
    x = 2 * torch.randn(2, 1, T, generator=torch.Generator().manual_seed(0))
    e = sk.explain(subject, x, "learned_mask", target=sk.Class(0),
                   params={"learned_mask": {"steps": 150, "contrast": contrast}})
    inside, outside = e.maps[:, 20:30].mean(1), torch.cat([e.maps[:, :18], e.maps[:, 32:]], 1).mean(1)
    # kept where the score lives (a sigmoid mask: near 1), dropped elsewhere by the sparsity term
    assert (inside > 0.6).all() and (outside < 0.1).all(), (inside, outside)
    per_step = 2 if contrast else 1
    assert e.passes["backward"] == 150 * per_step and e.seed == 0
    again = sk.explain(subject, x, "learned_mask", target=sk.Class(0),
                       params={"learned_mask": {"steps": 150, "contrast": contrast}})
    assert torch.equal(again.maps, e.maps)                 # seeded start, deterministic steps


def test_learned_mask_recovers_planted_motifs():
    # the shipped series CNN on held-out series: the mask's energy sits on the planted motif far
    # above a random map's (measured: energy 0.82 vs 0.20, pointing 0.81 vs 0.13 on 16 series)
    from saliencykit.benchmarks.series import leaderboard as L

    bench = L.SeriesBench(sk.load_model("series_cnn"), n=16)
    learned = bench.score(L.library_maps(bench, "learned_mask", params={"steps": 100}))
    rnd = bench.score(L.random_maps())
    assert learned["energy"] > rnd["energy"] + 0.3 and learned["pointing"] > rnd["pointing"] + 0.3


def test_learned_mask_bad_input():
    subject = sk.Subject(Window(), layout="BCT")
    x = torch.randn(1, 1, T)
    with pytest.raises(SaliencyError, match="l1 and tv"):
        sk.explain(subject, x, "learned_mask", params={"learned_mask": {"l1": -1}})
    with pytest.raises(SaliencyError):
        sk.explain(subject, x, "learned_mask", params={"learned_mask": {"steps": 0}})
