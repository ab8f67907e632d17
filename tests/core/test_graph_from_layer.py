"""A layer-gradient pass whose graph starts at the layer (`engine.capturing_forward`).

When only a layer's gradient is wanted (the gradient CAMs), the forward runs without autograd up
to the layer and the captured output becomes the graph's leaf. The definition it must keep: the
gradient of the target w.r.t. the layer's (last) output, and that output itself, exactly as a pass
with the graph from the input gives them. Compared with `torch.equal`: the forward computes the
same operations on the same values in both modes, so no rounding may differ."""
import threading

import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import engine
from saliencykit.methods.base import Context


def _reference(subject, x, layer, call=-1):
    """Gradient of the top-1 logit's sum w.r.t. the layer's output, graph from the input."""
    name, module = subject.find_layer(layer)
    outs = []
    h = module.register_forward_hook(lambda m, i, o: outs.append(o))
    try:
        with torch.enable_grad():
            xin = x.clone().requires_grad_(True)
            logits = subject.model.eval()(xin)
            idx = logits.argmax(1)
            kept = outs[call][0] if isinstance(outs[call], tuple) else outs[call]
            if isinstance(kept, dict):
                kept = next(iter(kept.values()))
            g, = torch.autograd.grad(logits.gather(1, idx[:, None]).sum(), kept)
    finally:
        h.remove()
    return kept.detach(), g


class SharedAct(nn.Module):
    """One activation module called twice per forward (like EfficientNet-Lite0's `_swish`)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.SiLU()
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act(self.c2(self.act(self.c1(x))))
        return self.fc(x.mean((2, 3)))


class InplaceAfter(nn.Module):
    """The layer's output is changed in place right after the layer (a residual `+=`, DenseNet's
    relu_ on `features`): the captured tensor then holds the changed values in either pass, and a
    graph that started at a leaf must not raise."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        a = self.c1(x)
        b = self.c2(a)
        b += a
        return self.fc(torch.relu(b).mean((2, 3)))


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.c1(x)).mean((2, 3)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return y, y.mean()


class TupleLayer(nn.Module):
    """The captured layer returns a tuple; the capture keeps its first element."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.block = Block()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y, _ = self.block(self.c1(x))
        return self.fc(y.mean((2, 3)))


def _x(b=2, seed=1):
    return torch.randn(b, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model, layer", [(SharedAct, "act"), (InplaceAfter, "c2"), (TupleLayer, "block")])
def test_layer_gradient_equals_the_full_graph_one(model, layer):
    torch.manual_seed(0)
    subject = sk.Subject(model(), labels=list("abcd"), input_size=(12, 12))
    x = _x()
    acts_ref, grads_ref = _reference(subject, x, layer)
    for repeat in range(2):   # the first call learns the layer's calls per forward, the second uses them
        with subject.explaining():
            xin, logits, acts = engine.capturing_forward(subject, x, [layer], input_grad=False)
            assert not xin.requires_grad, "the graph should start at the layer, not the input"
            (a,) = acts.values()
            assert a.requires_grad
            with torch.enable_grad():
                g, = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), a)
        # InplaceAfter: the kept tensor is changed by the `+=` after the layer in both passes
        assert torch.equal(a.detach(), acts_ref), layer
        assert torch.equal(g, grads_ref), (layer, repeat)


def test_grad_cam_through_explain_is_the_same_map_either_way(lite0, chelsea):
    # Lite0's auto layer is a module called twice (stem and head): the map must be that of the
    # head call, to the bit, whichever pass made it; a call with saliency keeps the input graph
    x = lite0.preprocess(chelsea)
    alone = sk.explain(lite0, x, "gradcam")
    alone_again = sk.explain(lite0, x, "gradcam")
    together = sk.explain(lite0, x, ["gradcam", "saliency"])
    assert torch.equal(alone.maps, together["gradcam"].maps)
    assert torch.equal(alone_again.maps, together["gradcam"].maps)
    assert alone.passes["forward"] == 1 and alone.passes["backward"] == 1


def test_the_prime_of_layer_methods_keeps_no_input_graph_and_saliency_still_gets_one(tiny, tiny_x):
    with tiny.explaining():
        ctx = Context(tiny, tiny_x)
        ctx.input_graph = False
        ctx.prime(["act2"])
        assert not ctx._primed[0][1].requires_grad
        target = ctx.resolve(sk.Class([1, 3]))
        # an input gradient cannot come from this pass: it is computed by its own pass, not zeros
        g = ctx.input_gradient(target)
        assert g is None
    ref = sk.explain(tiny, tiny_x, "saliency", target=sk.Class([1, 3]), reduce="sum")
    got = sk.explain(tiny, tiny_x, ["gradcam", "saliency"], target=sk.Class([1, 3]), reduce="sum")
    assert torch.equal(ref.maps, got["saliency"].maps) and ref.maps.abs().sum() > 0


class FewerCalls(nn.Module):
    """Calls its activation twice or once, as a flag says: the count remembered from one forward
    of this input shape is wrong for the next; that pass must fall back, not lose its graph."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 4)
        self.twice = True

    def forward(self, x):
        x = self.act(self.c1(x))
        if self.twice:
            x = self.act(x - 0.1)
        return self.fc(x.mean((2, 3)))


def test_a_forward_with_fewer_calls_than_remembered_falls_back_to_the_full_graph():
    torch.manual_seed(0)
    model = FewerCalls()
    subject = sk.Subject(model, labels=list("abcd"), input_size=(12, 12))
    x = _x()
    first = sk.explain(subject, x, "gradcam", layer="act")
    assert subject._layer_calls[("act", (3, 12, 12), torch.float32)] == 2
    model.twice = False
    _, ref = _reference(subject, x, "act")
    with subject.explaining():
        xin, logits, acts = engine.capturing_forward(subject, x, ["act"], input_grad=False)
        assert xin.requires_grad, "the fallback runs with the graph from the input"
        with torch.enable_grad():
            g, = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), acts["act"])
    assert torch.equal(g, ref)
    assert subject._layer_calls[("act", (3, 12, 12), torch.float32)] == 1
    again = sk.explain(subject, x, "gradcam", layer="act")
    assert not torch.equal(first.maps, again.maps) and again.maps.abs().sum() > 0


def test_grad_mode_is_the_callers_after_the_pass_in_every_thread(tiny, tiny_x):
    # the hook switches autograd on for the rest of its own thread's forward only
    seen, errors = [], []

    def worker(no_grad):
        try:
            ctx = torch.no_grad() if no_grad else torch.enable_grad()
            with ctx:
                for _ in range(5):
                    sk.explain(tiny, tiny_x, "gradcam", layer="act2")
                    seen.append((no_grad, torch.is_grad_enabled()))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(flag,)) for flag in (True, False, True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(seen) == 20 and all(enabled == (not no_grad) for no_grad, enabled in seen)


def test_models_with_multihead_attention_keep_the_graph_from_the_input():
    # nn.MultiheadAttention takes a fused kernel when autograd is off, which rounds differently
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 8, 3, padding=1)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            t = self.proj(x).flatten(2).transpose(1, 2)
            t, _ = self.mha(t, t, t)
            return self.fc(t.mean(1))

    subject = sk.Subject(Attn().eval(), labels=list("abcd"), input_size=(12, 12))
    with subject.explaining():
        xin, _, _ = engine.capturing_forward(subject, _x(), ["proj"], input_grad=False)
    assert xin.requires_grad


@pytest.mark.parametrize("method", ["gradcam", "smooth_gradcam_pp", "iia"])
def test_maps_are_bit_equal_with_the_lever_off(tiny, tiny_x, monkeypatch, method):
    # the same call with the graph from the input everywhere (the lever switched off) gives the
    # same map to the bit: Grad-CAM (clean pass), Smooth Grad-CAM++ (gradient_pass per noisy
    # copy), IIA (the representation path's forwards)
    from saliencykit.methods import paths

    on = sk.explain(tiny, tiny_x, method, layer="act2", seed=3)
    monkeypatch.setattr(engine, "graph_from_layer_ok", lambda subject: False)
    monkeypatch.setattr(paths, "graph_from_layer_ok", lambda subject: False)
    off = sk.explain(tiny, tiny_x, method, layer="act2", seed=3)
    assert torch.equal(on.maps, off.maps) and on.maps.abs().sum() > 0


class DictLayer(nn.Module):
    """The captured layer returns a dict (as a Hugging Face sub-model's ModelOutput does)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.block = _DictBlock()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.block(self.c1(x))["hidden"].mean((2, 3)))


class _DictBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        return {"hidden": torch.relu(self.conv(x))}


def test_a_layer_whose_output_is_no_tensor_falls_back_once_then_keeps_the_full_graph(monkeypatch):
    # the late start cannot hand on a leaf inside a dict: the pass falls back to the full graph,
    # and later passes of this shape go there directly instead of paying a forward twice
    torch.manual_seed(0)
    subject = sk.Subject(DictLayer(), labels=list("abcd"), input_size=(12, 12))
    x = _x()
    forwards = []
    real = subject.forward
    monkeypatch.setattr(subject, "forward", lambda t: (forwards.append(1), real(t))[1])
    _, ref = _reference(subject, x, "block")
    forwards.clear()
    for expected in (2, 1):
        with subject.explaining():
            xin, logits, acts = engine.capturing_forward(subject, x, ["block"], input_grad=False)
            with torch.enable_grad():
                g, = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), acts["block"])
        assert xin.requires_grad and torch.equal(g, ref)
        assert len(forwards) == expected
        forwards.clear()
    # the forward that fell back is reported: Grad-CAM on a fresh shape costs 2 forwards, then 1
    x3 = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))   # a shape not seen yet
    first = sk.explain(subject, x3, "gradcam", layer="block")
    again = sk.explain(subject, x3, "gradcam", layer="block")
    assert first.passes["forward"] == 2 and again.passes["forward"] == 1
    assert torch.equal(first.maps, again.maps)
