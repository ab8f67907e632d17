"""Concept importance: on a model whose class uses one planted concept only, its Sobol
total-order index is ~1 and the others' exactly 0, and gradient x coefficient agrees; m = 1
reproduces the model's own output; seeded and pass-counted."""
import torch

import saliencykit as sk
from saliencykit.concepts import extract, importance
from saliencykit.concepts.importance import ConceptIntervention
from test_bank import ColourNet, colour_scenes


def _red_only():
    net = ColourNet()
    with torch.no_grad():
        net.fc.weight.copy_(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))   # class 0 reads red only
    return sk.Subject(net, labels=["red", "other"], mean=(0, 0, 0), std=(1, 1, 1), input_size=(32, 32), layer="act")


def test_sobol_of_a_single_concept_model():
    subject = _red_only()
    x, _ = colour_scenes(12)
    bank = extract(subject, x, layer="act", n_concepts=3, seed=0)
    red = int((bank.basis / bank.basis.norm(dim=1, keepdim=True))[:, 0].argmax())
    res = importance(subject, bank, x[:3], target=sk.Class(0), n=256, seed=0)
    # f is linear in the red concept's mask alone: Jansen's estimator is 1 in expectation (a
    # scrambled Sobol design of 256 rows gives 1 +- 1e-6 for a linear f; 64 rows only +- 0.06)
    # and exactly 0 for the others, which f does not read
    assert torch.allclose(res.sobol[:, red], torch.ones(3), atol=1e-3)
    others = [j for j in range(3) if j != red]
    assert res.sobol[:, others].abs().max() < 1e-6
    assert res.ranking[0] == red
    g = res.gradient_x_coefficient
    assert (g[:, red] > 0).all() and g[:, others].abs().max() < 1e-2 * g[:, red].abs().min()
    assert res.passes["forward"] == 1 + 256 * 5 + 1    # clean (logits and activations), (k+2) n design rows, gradient
    again = importance(subject, bank, x[:3], target=sk.Class(0), n=256, seed=0)
    assert torch.equal(again.sobol, res.sobol)


def test_unmasked_intervention_is_the_model():
    subject = sk.Subject(ColourNet(), mean=(0, 0, 0), std=(1, 1, 1), input_size=(32, 32), layer="act")
    x, _ = colour_scenes(4)
    bank = extract(subject, x, layer="act", n_concepts=2, seed=0)   # lossy: the residual carries the rest
    from saliencykit.concepts.bank import layer_activations, nnls

    a = layer_activations(subject, x[:1], "act")[0]
    u = torch.from_numpy(nnls(a.permute(1, 2, 0).reshape(-1, 3).double().numpy(), bank.basis.double().numpy()))
    u = u.float().reshape(32, 32, 2).permute(2, 0, 1)
    view = ConceptIntervention(subject.model, "act", x[:1], u, bank.basis, a - torch.einsum("khw,kc->chw", u, bank.basis))
    with torch.no_grad():
        assert torch.allclose(view(torch.ones(2, 2)), subject.model(x[:1]).expand(2, -1), atol=1e-5)
