"""Integer and bool inputs explained at a named embedding layer (`Subject(model, embedding=...)`):
IG at the embedding is complete (its map adds up to s(x) - s(baseline)) and equals Captum's
LayerIntegratedGradients on that layer; the baseline token is the embedding of that id; a bool
input through a module giving one number per position works; the model is left as found; two
threads explaining at once get their own maps; what cannot work is refused with the fix."""
import threading

import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import SaliencyError

from state import assert_same_state  # noqa: E402  (tests/ is on sys.path)


class Bag(nn.Module):
    """Token ids [B,T] -> embedding -> tanh -> mean over positions -> linear: nonlinear in the
    embedding, so IG's completeness is a real check of the path integral, not of linearity."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6, padding_idx=0)    # id 0 embeds to zeros
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


def _bag():
    torch.manual_seed(0)
    return Bag().double()


def _ids(b=3, t=7, seed=1):
    return torch.randint(1, 20, (b, t), generator=torch.Generator().manual_seed(seed))


def _ig(subject, ids, steps=64, target=1):
    return sk.explain(subject, ids, "integrated_gradients", target=sk.Class(target),
                      params={"integrated_gradients": {"steps": steps}})


def test_ig_at_the_embedding_is_complete_and_per_token():
    model = _bag()
    subject = sk.Subject(model, embedding="emb")
    ids = _ids()
    before = subject.state_fingerprint()
    e = _ig(subject, ids)
    assert e.maps.shape == (3, 7) and e.attributions.shape == (3, 6, 7) and e.layout == "BCT"
    # the map is the sum over the embedding dimension per token (IG's reduce="sum")
    assert torch.allclose(e.maps, e.attributions.sum(1), rtol=0, atol=1e-15)
    with torch.no_grad():
        s = model(ids)[:, 1]
        s0 = model.head(torch.zeros(1, 6, dtype=torch.float64))[0, 1]   # zeros in embedding space
    # completeness: 64 Gauss-Legendre nodes on a tanh of a linear path integrate it to float64
    # rounding (measured 6e-17)
    assert torch.allclose(e.maps.sum(1), s - s0, rtol=0, atol=1e-12)
    assert_same_state(before, subject.state_fingerprint())        # no hook, flag or gradient left
    assert ids.dtype == torch.int64                               # the ids as given
    # the view's own forwards are counted: its capture of the embedding, the check that the ids reach
    # the model only through it (a batch of several), then saliency's one forward and backward
    sal = sk.explain(subject, ids, "saliency")
    assert sal.passes["forward"] == 3 and sal.passes["backward"] == 1
    assert sk.explain(subject, ids[:1], "saliency").passes["forward"] == 2   # one example: no check


def test_ig_agrees_with_captum_layer_integrated_gradients():
    captum = pytest.importorskip("captum.attr")
    model = _bag()
    ids = _ids(seed=2)
    ours = _ig(sk.Subject(model, embedding="emb"), ids, steps=32, target=2)
    # Captum integrates along the same straight path at the layer: from the padding id's zero embedding
    theirs = captum.LayerIntegratedGradients(model, model.emb).attribute(
        ids, baselines=torch.zeros_like(ids), target=2, n_steps=32, method="gausslegendre")
    # the same 32-node integral in float64; measured 3e-10 apart at a largest value of 0.1 (the two
    # sum the nodes in different orders and batches): 1e-8 of the largest value
    tol = 1e-8 * float(theirs.abs().max())
    assert torch.allclose(ours.attributions, theirs.transpose(1, 2), rtol=0, atol=tol)
    assert torch.allclose(ours.maps, theirs.sum(-1), rtol=0, atol=tol * 6)


def test_baseline_token_is_the_embedding_of_that_id():
    captum = pytest.importorskip("captum.attr")
    model = _bag()
    ids = _ids(seed=3)
    ours = _ig(sk.Subject(model, embedding="emb", baseline_token=5), ids, steps=32)
    base = torch.full_like(ids, 5)
    theirs = captum.LayerIntegratedGradients(model, model.emb).attribute(ids, baselines=base, target=1, n_steps=32,
                                                                         method="gausslegendre")
    assert torch.allclose(ours.maps, theirs.sum(-1), rtol=0, atol=1e-8 * float(theirs.abs().max()) * 6)
    with torch.no_grad():
        gap = model(ids)[:, 1] - model(base)[:, 1]
    assert torch.allclose(ours.maps.sum(1), gap, rtol=0, atol=1e-12)    # completeness from that baseline


class OnEmbedding(nn.Module):
    """The Bag model from its embedding's output on: what Captum explains where we explain the ids."""

    def __init__(self, bag):
        super().__init__()
        self.bag = bag

    def forward(self, e):                    # e [B,T,D]
        return self.bag.head(torch.tanh(e).mean(1))


@pytest.mark.parametrize("token", [None, 5])
def test_occlusion_of_tokens_agrees_with_captum_feature_ablation(token):
    """Occlusion through the embedding replaces one token at a time by the baseline embedding (zeros,
    or the baseline token's); Captum's FeatureAblation on the embedding output, one feature group
    per token, computes the same drops (the same float64 forwards; our maps are stored in float32, so
    1e-6 of the largest drop: float32 rounding is 6e-8 of it)."""
    captum = pytest.importorskip("captum.attr")
    model = _bag()
    ids = _ids(seed=4)
    subject = sk.Subject(model, embedding="emb", baseline_token=token)
    before = subject.state_fingerprint()
    ours = sk.explain(subject, ids, "occlusion", target=sk.Class(2))
    assert ours.maps.shape == (3, 7) and ours.params["patch"] == 1 and ours.params["stride"] == 1
    with torch.no_grad():
        e = model.emb(ids)
        base = torch.zeros(6, dtype=torch.float64) if token is None else model.emb.weight[token]
    groups = torch.arange(7).view(1, 7, 1).expand_as(e)          # every element of token t in group t
    theirs = captum.FeatureAblation(OnEmbedding(model)).attribute(e, baselines=base.view(1, 1, 6).expand_as(e),
                                                                  target=2, feature_mask=groups)
    tol = 1e-6 * float(theirs.abs().max())
    assert torch.allclose(ours.maps.double(), theirs[..., 0], rtol=0, atol=tol)
    # windows of two tokens at stride 1: Captum's Occlusion averages the drops of the windows covering a token
    two = sk.explain(subject, ids, "occlusion", target=sk.Class(2), patch=2, stride=1)
    occ = captum.Occlusion(OnEmbedding(model)).attribute(e, sliding_window_shapes=(2, 6), strides=(1, 6),
                                                         baselines=base.view(1, 1, 6).expand_as(e), target=2)
    assert torch.allclose(two.maps.double(), occ[..., 0].double(), rtol=0, atol=tol)   # Captum divides in float32
    assert_same_state(before, subject.state_fingerprint())


def test_kernelshap_of_tokens_is_captum_shapley_values_and_lime_finds_the_one_token():
    """KernelSHAP through the embedding takes each token as a feature and hides it with the baseline
    embedding; with 7 tokens all 126 coalitions fit in n_samples, so it is exact and equals Captum's
    ShapleyValues (exact, one feature group per token) on the embedding output (Captum averages its
    7! permutations in float32: measured 4e-6 apart at a largest value of 0.11, so 1e-4 of it). LIME on a model that reads only token 3 gives token 3 the largest weight."""
    captum = pytest.importorskip("captum.attr")
    model = _bag()
    ids = _ids(b=2, seed=5)
    subject = sk.Subject(model, embedding="emb", baseline_token=5)
    ours = sk.explain(subject, ids, "kernelshap", target=sk.Class(0), seed=0)
    assert ours.extras["exact"] == [True, True]
    with torch.no_grad():
        e = model.emb(ids)
        base = model.emb.weight[5].view(1, 1, 6).expand_as(e)
    groups = torch.arange(7).view(1, 7, 1).expand_as(e).contiguous()
    theirs = captum.ShapleyValues(OnEmbedding(model)).attribute(e, baselines=base, target=0, feature_mask=groups)
    assert torch.allclose(ours.maps.double(), theirs[..., 0].double(), rtol=0, atol=1e-4 * float(theirs.abs().max()))

    class Third(Bag):                            # only the token at position 3 reaches the output
        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids))[:, 3])

    torch.manual_seed(0)
    third = sk.Subject(Third().double(), embedding="emb")
    lime = sk.explain(third, ids, "lime", target=sk.Class(1), seed=0, n_samples=200)
    assert lime.maps.shape == (2, 7) and (lime.maps.abs().argmax(1) == 3).all()
    # hiding any other token changes nothing: their ridge weights only pick up the chance correlation
    # of 200 random coalitions with token 3's (measured at most 1.1 % of token 3's weight): below 5 %
    others = lime.maps[:, [0, 1, 2, 4, 5, 6]].abs().max()
    assert float(others) < 0.05 * float(lime.maps[:, 3].abs().min()), lime.maps


def test_bool_flags_through_a_module_of_one_number_per_position():
    class Flags(nn.Module):                      # bool [B,F] -> one float per flag
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.linspace(-1, 1, 5, dtype=torch.float64))

        def forward(self, x):
            return x.double() * self.w

    model = nn.Sequential()
    model.flags = Flags()
    model.head = nn.Linear(5, 2).double()
    x = torch.tensor([[True, False, True, True, False]])
    e = sk.explain(sk.Subject(model, embedding="flags"), x, "gradxinput", target=sk.Class(0))
    # a linear model: gradient x input at the flags' values is w_head[0, f] * w_f * flag
    want = model.head.weight[0] * model.flags.w * x.double()
    assert e.maps.shape == (1, 5) and torch.allclose(e.maps[0], want[0].detach(), rtol=0, atol=1e-15)


def test_two_threads_get_their_own_maps():
    model = _bag()
    subject = sk.Subject(model, embedding="emb")
    a, b = _ids(2, 7, seed=4), _ids(2, 7, seed=5)
    alone = {k: sk.explain(subject, v, "gradxinput", target=sk.Class(0)).maps for k, v in (("a", a), ("b", b))}
    got, errors = {}, []
    barrier = threading.Barrier(2)

    def work(key, ids):
        try:
            barrier.wait()
            for _ in range(20):       # many overlapping forwards with their own replacing hooks
                m = sk.explain(subject, ids, "gradxinput", target=sk.Class(0)).maps
                if not torch.equal(m, alone[key]):
                    raise AssertionError(f"thread {key} got another map")
            got[key] = m
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=kv) for kv in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert torch.equal(got["a"], alone["a"]) and torch.equal(got["b"], alone["b"])
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_refusals_name_the_fix():
    model = _bag()
    ids = _ids()
    with pytest.raises(SaliencyError, match=r"input is torch.int64.*Subject\(model, embedding="):
        sk.explain(sk.Subject(model), ids, "saliency")
    with pytest.raises(SaliencyError, match="embedding 'embed' is not a module of the model.*closest: emb"):
        sk.Subject(model, embedding="embed")
    with pytest.raises(SaliencyError, match="baseline_token needs an embedding"):
        sk.Subject(model, baseline_token=0)
    subject = sk.Subject(model, embedding="emb")
    with pytest.raises(SaliencyError, match="batch axis"):
        sk.explain(subject, ids[0], "saliency")
    with pytest.raises(SaliencyError, match="rise cannot explain integer inputs.*use saliency.*occlusion"):
        sk.explain(subject, ids, "rise")
    # a float input to a subject that reads ids would fail inside torch's embedding lookup
    with pytest.raises(SaliencyError, match="input is torch.float32, but this subject reads token ids"):
        sk.explain(subject, torch.randn(2, 7), "saliency")

    class Masked(Bag):                           # reads the ids twice: a padding mask besides the embedding
        def forward(self, ids):
            keep = (ids > 3).double().unsqueeze(-1)
            return self.head((torch.tanh(self.emb(ids)) * keep).mean(1))

    torch.manual_seed(0)
    masked = sk.Subject(Masked().double(), embedding="emb")
    with pytest.raises(SaliencyError, match="reads the ids elsewhere.*one example at a time"):
        sk.explain(masked, _ids(2, 7, seed=6), "integrated_gradients")
    ids1 = _ids(1, 7, seed=6)
    one = sk.explain(masked, ids1, "integrated_gradients", target=sk.Class(1),
                     params={"integrated_gradients": {"steps": 64}})
    with torch.no_grad():          # a batch of one is exact: every row gets its ids, the mask included
        gap = masked.model(ids1)[0, 1] - masked.model.head.bias[1]     # the zero embedding's score is the bias
    assert torch.allclose(one.maps.sum(), gap, rtol=0, atol=1e-12)
