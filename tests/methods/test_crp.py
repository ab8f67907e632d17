"""CRP: conservation (the CRP maps of all channels of a layer, or of all concepts of a bank, sum
to the plain LRP map), agreement with Zennit's composites and a gradient mask at the layer, the
concept= keyword through sk.explain, thread safety, the model left as found, and bad input."""
import threading

import pytest
import torch

import saliencykit as sk
from saliencykit import SaliencyError
from state import assert_same_state
from test_propagation import _subject


class _Bank:
    """A concept bank by duck typing (the methods room never imports the concepts room)."""

    def __init__(self, basis, layer):
        self.basis, self.layer, self.method = basis, layer, "test"


@pytest.fixture
def x64():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def test_crp_over_all_channels_is_lrp(x64):
    # the backward below the layer is linear in the relevance arriving there, and the 0/1 masks of
    # the 8 channels sum to 1. The model runs in float64 and its explanations keep float64: the
    # sum of 8 maps is exact to rounding (measured 2e-16 of the largest value), so 1e-12
    s = _subject()
    lrp = sk.explain(s, x64, "lrp", target=1).attributions
    exps = [sk.explain(s, x64, "crp", target=1, concept=("act1", c)) for c in range(8)]
    parts = [e.attributions for e in exps]
    assert torch.allclose(sum(parts), lrp, rtol=0, atol=1e-12 * lrp.abs().max().item())
    # a list of channels is the sum of its channels
    pair = sk.explain(s, x64, "crp", target=1, concept=("act1", [2, 5]))
    assert torch.allclose(pair.attributions, parts[2] + parts[5], atol=1e-12 * lrp.abs().max().item())
    assert pair.extras["concept"] == {"layer": "act1", "channels": [2, 5]}
    # the relevance each channel kept at the layer adds up to all the relevance that reached it
    kept = torch.tensor([e.extras["concept_relevance"] for e in exps], dtype=torch.float64).sum(0)
    total = torch.tensor(exps[0].extras["layer_relevance_sum"], dtype=torch.float64)
    assert torch.allclose(kept, total, rtol=1e-9) and (total.abs() > 0).all()


def test_crp_over_all_concepts_of_a_bank_is_lrp(x64):
    # each channel's relevance at each location is split between the bank's concepts by their part
    # of the activation there; the shares sum to 1, so the concepts' maps sum to LRP's (float64
    # as above: measured 3e-16 of the largest value)
    s = _subject()
    g = torch.Generator().manual_seed(0)
    bank = _Bank(torch.rand(3, 16, generator=g, dtype=torch.float64), "act2")
    lrp = sk.explain(s, x64, "lrp", target=2).attributions
    maps = [sk.explain(s, x64, "crp", target=2, concept=("act2", (bank, k))).attributions for k in range(3)]
    assert torch.allclose(sum(maps), lrp, rtol=0, atol=1e-12 * lrp.abs().max().item())
    assert not torch.allclose(maps[0], maps[1])
    same = sk.explain(s, x64, "crp", target=2, concept=(bank, 1))      # the bank's own layer
    assert torch.equal(same.attributions, maps[1])


def test_crp_agrees_with_zennit_and_a_gradient_mask(x64):
    # Zennit's EpsilonPlusFlat (with its batch-norm canonizer) and a tensor hook that multiplies the
    # gradient at act1's output by the channel mask: in Zennit the gradient there is the relevance.
    # Zennit stabilises average pooling with 1e-6 and we do not: allow 2e-4 of the largest
    # relevance (measured 3-4e-5)
    pytest.importorskip("zennit")
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    s = _subject()
    model = s.model
    for channels in ([3], [0, 4, 7]):
        mask = torch.zeros(1, 8, 1, 1, dtype=torch.float64)
        mask[:, channels] = 1
        handle = model.act1.register_forward_hook(lambda _m, _i, out: out.register_hook(lambda g: g * mask) and None)
        try:
            with s.explaining():
                xin = x64.clone().requires_grad_(True)
                with EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()]).context(model) as m:
                    out = m(xin)
                    onehot = torch.zeros_like(out)
                    onehot[:, 3] = 1
                    ref, = torch.autograd.grad(out, xin, grad_outputs=onehot * out)
        finally:
            handle.remove()
        ours = sk.explain(s, x64, "crp", target=3, concept=("act1", channels)).attributions.double()
        assert ref.abs().max() > 0
        print("CRP vs Zennit, max error / max relevance:", channels, ((ours - ref).abs().max() / ref.abs().max()).item())
        assert torch.allclose(ours, ref, atol=2e-4 * ref.abs().max().item()), channels


def test_crp_from_threads_and_the_model_left_as_found(x64):
    s = _subject()
    before = s.state_fingerprint()
    alone = {c: sk.explain(s, x64, "crp", target=0, concept=("act2", c)).maps for c in (1, 9)}
    got, errors = [], []

    def work(c):
        try:
            for _ in range(3):
                got.append((c, sk.explain(s, x64, "crp", target=0, concept=("act2", c)).maps))
        except Exception as err:   # noqa: BLE001  reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(c,)) for c in (1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for c, maps in got:
        assert torch.equal(maps, alone[c])
    assert_same_state(before, s.state_fingerprint())


def test_bad_concepts_are_named(x64):
    # crp cannot run without a concept: listings of "every method" know to leave it out
    assert sk.methods.available()["crp"]["requires"] == ["concept"]
    assert sk.methods.available()["lrp"]["requires"] == []
    s = _subject()
    with pytest.raises(SaliencyError, match="crp needs concept"):
        sk.explain(s, x64, "crp", target=0)
    with pytest.raises(SaliencyError, match=r"not in 0\.\.7"):
        sk.explain(s, x64, "crp", target=0, concept=("act1", 8))
    with pytest.raises(SaliencyError, match="an int, a non-empty list"):
        sk.explain(s, x64, "crp", target=0, concept=("act1", "red"))
    bank = _Bank(torch.rand(2, 16, dtype=torch.float64), "act2")
    with pytest.raises(SaliencyError, match="belongs to layer"):
        sk.explain(s, x64, "crp", target=0, concept=("act1", (bank, 0)))
    with pytest.raises(SaliencyError, match="concept index 2"):
        sk.explain(s, x64, "crp", target=0, concept=(bank, 2))
