"""TCAV: agreement with Captum's TCAV given the same CAVs, a planted concept the class reads,
seeds, bank directions as CAVs beside Sobol, and bad input."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import SaliencyError
from saliencykit.concepts import extract, importance
from saliencykit.concepts.tcav import bank_tcav, sign_scores, tcav
from test_bank import colour_scenes
from test_importance import _red_only


class SmallCNN(nn.Module):
    """conv-relu-conv-relu-GAP-linear with seeded random weights: gradients at `act1` differ from
    input to input, so the TCAV scores are fractions, not 0 or 1."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.pool(self.act2(self.conv2(self.act1(self.conv1(x))))).flatten(1))


def _stripes(n, seed, freq):
    g = torch.Generator().manual_seed(seed)
    xs = torch.linspace(0, 1, 16)
    phase = torch.rand(n, 1, 1, 1, generator=g) * 6.28
    base = torch.sin(freq * 6.28 * xs.view(1, 1, 1, 16) + phase).expand(n, 3, 16, 16)
    return base + 0.3 * torch.randn(n, 3, 16, 16, generator=g)


def _sets():
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(20, 3, 16, 16, generator=g)
    concepts = {"stripes": _stripes(12, 1, 3.0), "blobs": 2.0 * torch.rand(12, 3, 16, 16, generator=g) - 0.5,
                "noise": torch.randn(12, 3, 16, 16, generator=g)}   # drawn like the random sets
    randoms = [torch.randn(12, 3, 16, 16, generator=g) for _ in range(11)]
    return inputs, concepts, randoms


def _captum_scores(model, layer, inputs, concepts, randoms, ours, target, tmp_path):
    """Captum's TCAV with a classifier that hands it our CAVs for each experimental set (so both
    use identical vectors); returns {name: [r scores]} and the random scores."""
    from captum.concept import TCAV, Concept
    from captum.concept._utils.classifier import Classifier

    def loader(t):
        return torch.utils.data.DataLoader(t, batch_size=8)

    names = list(concepts)
    cpt = {n: Concept(i, n, loader(concepts[n])) for i, n in enumerate(names)}
    rnd = [Concept(100 + i, f"random{i}", loader(r)) for i, r in enumerate(randoms)]
    table = {}
    for n in names:
        for i in range(1, len(randoms)):
            v = ours.cavs[n][i - 1].float()
            table[tuple(sorted((cpt[n].id, rnd[i].id)))] = ([cpt[n].id, rnd[i].id], torch.stack([v, -v]))
    for i in range(1, len(randoms)):
        v = ours.random_cavs[i - 1].float()
        table[tuple(sorted((rnd[0].id, rnd[i].id)))] = ([rnd[0].id, rnd[i].id], torch.stack([v, -v]))

    class Injected(Classifier):
        def __init__(self):
            self._classes, self._w = None, None

        def train_and_eval(self, dataloader, **kwargs):
            labels = torch.cat([y for _, y in dataloader]).unique().tolist()
            self._classes, self._w = table[tuple(sorted(int(v) for v in labels))]
            return {"accs": torch.tensor(1.0)}

        def weights(self):
            return self._w

        def classes(self):
            return self._classes

    runner = TCAV(model, [layer], classifier=Injected(), save_path=str(tmp_path / "captum"))
    sets = [[cpt[n], rnd[i]] for n in names for i in range(1, len(randoms))]
    sets += [[rnd[0], rnd[i]] for i in range(1, len(randoms))]
    out = runner.interpret(inputs, sets, target=target)
    r = len(randoms) - 1
    key = lambda s: "-".join(str(c.id) for c in s)  # noqa: E731  Captum's key: the concept ids joined by "-"
    scores = {n: [float(out[key(sets[j * r + i])][layer]["sign_count"][0]) for i in range(r)]
              for j, n in enumerate(names)}
    random_scores = [float(out[key(s)][layer]["sign_count"][0]) for s in sets[len(names) * r:]]
    return scores, random_scores


def test_tcav_agrees_with_captum_on_the_same_cavs(tmp_path):
    from scipy.stats import pearsonr, ttest_ind

    model = SmallCNN().eval()
    subject = sk.Subject(model, labels=["a", "b", "c"], mean=(0, 0, 0), std=(1, 1, 1), input_size=(16, 16),
                         layer="act2")
    inputs, concepts, randoms = _sets()
    # at act1 the class gradient passes conv2 and its ReLU, so it differs from input to input
    ours = tcav(subject, inputs, concepts, randoms, layer="act1", target=sk.Class(0), seed=0)
    theirs, theirs_random = _captum_scores(model, "act1", inputs, concepts, randoms, ours, 0, tmp_path)
    a = np.concatenate([ours.run_scores[n] for n in concepts] + [ours.random_scores])
    b = np.concatenate([theirs[n] for n in concepts] + [theirs_random])
    assert a.std() > 0                         # scores are fractions that vary, so Pearson is meaningful
    # Captum's sign count and ours are the same statistic of the same gradients and vectors: they can
    # only differ where a directional derivative is ~0 (float32 vs float64 dot products)
    assert pearsonr(a, b)[0] >= 0.99 and np.abs(a - b).max() <= 1 / len(inputs)
    # the significance test done on Captum's scores (Welch t-test, Bonferroni over the three concepts)
    # decides as ours does at this seed
    with warnings.catch_warnings():   # a constant list of scores makes scipy warn; its p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        theirs_decision = {n: bool(ttest_ind(theirs[n], theirs_random, equal_var=False).pvalue < 0.05 / 3)
                           for n in concepts}
    print("TCAV vs Captum:", {n: (np.mean(ours.run_scores[n]), np.mean(theirs[n])) for n in concepts},
          "decisions", ours.decisions, theirs_decision)
    assert theirs_decision == ours.decisions
    assert set(ours.decisions.values()) == {True, False}     # both kinds of decision are compared
    assert model.training is False and all(p.grad is None for p in model.parameters())


def test_a_concept_the_class_reads_is_significant():
    # class 0 reads only the red channel at `act`: every input's gradient there is (2/hw, 0, 0)
    # per location, so a CAV towards red images (against noise) has a positive derivative for
    # every input (score 1 in every run), while random-vs-random CAVs point anywhere
    subject = _red_only()
    x, _ = colour_scenes(8)
    g = torch.Generator().manual_seed(0)
    red = torch.zeros(12, 3, 32, 32)
    red[:, 0] = torch.rand(12, 32, 32, generator=g) + 0.5
    pool = torch.rand(80, 3, 32, 32, generator=g)
    res = tcav(subject, x, {"red": red, "like_random": pool[:12]}, pool[12:], layer="act", target=sk.Class(0),
               n_runs=20, seed=0)
    assert res.run_scores["red"] == [1.0] * 20
    assert res.significant["red"] and res.p_values["red"] < 0.05 / 2
    assert 0 < np.mean(res.random_scores) < 1
    assert res.cavs["red"].shape == (20, 3 * 32 * 32)            # flattened activations (Kim et al. 2018)
    assert torch.allclose(res.cavs["red"].norm(dim=1), torch.ones(20, dtype=torch.float64))
    assert res.passes["backward"] == 1.0
    again = tcav(subject, x, {"red": red, "like_random": pool[:12]}, pool[12:], layer="act", target=sk.Class(0),
                 n_runs=20, seed=0)
    assert again.run_scores == res.run_scores and again.p_values == res.p_values


def test_bank_directions_as_cavs_beside_sobol():
    subject = _red_only()
    x, _ = colour_scenes(12)
    bank = extract(subject, x, layer="act", n_concepts=3, seed=0)
    red = int((bank.basis / bank.basis.norm(dim=1, keepdim=True))[:, 0].argmax())
    scores, deriv = bank_tcav(subject, bank, x[:4], target=sk.Class(0))
    # the derivative along W_k is (2/hw) * hw * W_k[red] = 2 W_k[0]: known exactly
    assert torch.allclose(deriv, 2 * bank.basis[:, 0].expand(4, -1), atol=1e-5)
    assert scores[red] == 1.0
    res = importance(subject, bank, x[:3], target=sk.Class(0), n=32, seed=0, tcav=True)
    assert res.tcav.shape == (3,) and res.tcav[red] == 1.0
    assert res.passes["backward"] == 2.0                       # the concept-mask gradient + the layer gradient
    assert importance(subject, bank, x[:3], target=sk.Class(0), n=32, seed=0).tcav is None


def test_sign_scores_is_the_fraction_of_positive_derivatives():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 2.0], [0.5, -3.0]])
    cavs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert sign_scores(grads, cavs).tolist() == [2 / 3, 1 / 3]


def test_bad_input_is_named():
    subject = sk.Subject(SmallCNN().eval(), mean=(0, 0, 0), std=(1, 1, 1), input_size=(16, 16), layer="act2")
    inputs, concepts, randoms = _sets()
    with pytest.raises(SaliencyError, match="at least 3 random sets"):
        tcav(subject, inputs, concepts, randoms[:2], layer="act2")
    with pytest.raises(SaliencyError, match="at least 2"):
        tcav(subject, inputs, {"one": concepts["blobs"][:1]}, randoms, layer="act2")
    with pytest.raises(SaliencyError, match="non-empty dict"):
        tcav(subject, inputs, {}, randoms, layer="act2")


def test_tcav_at_a_dense_layer_follows_the_definition():
    # after the last hidden ReLU the class gradient is the head's weight row w_c for every input,
    # so each run's score is 1 when w_c . v > 0 and 0 otherwise: known for every CAV v
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    subject = sk.Subject(net, mean=(0, 0, 0), std=(1, 1, 1), input_size=(16, 16), layer="1")
    inputs, concepts, randoms = _sets()
    res = tcav(subject, inputs, {"stripes": concepts["stripes"]}, randoms[:5], layer="5", target=sk.Class(2), seed=0)
    w = net[6].weight[2].detach().double()
    assert res.cavs["stripes"].shape == (4, 6)
    assert res.run_scores["stripes"] == [float(w @ v > 0) for v in res.cavs["stripes"]]
    assert res.random_scores == [float(w @ v > 0) for v in res.random_cavs]
