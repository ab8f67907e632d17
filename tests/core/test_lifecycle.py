"""The model is left exactly as found, hooks removed, after success and after an exception."""
import gc
import resource

import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import SaliencyError, Subject
from saliencykit.subject import count_hooks
from tests.conftest import TinyCNN
from state import assert_same_state  # noqa: E402  (tests/ is on sys.path)

CORE = ["saliency", "gradxinput", "integrated_gradients", "smoothgrad", "guided_backprop", "deconvnet", "cam",
        "gradcam", "gradcam_pp", "smooth_gradcam_pp", "hirescam", "xgradcam", "layercam", "scorecam", "eigencam"]


def _subject_in_odd_state():
    torch.manual_seed(0)
    model = TinyCNN(inplace=True)
    model.train()                      # found in training mode
    model.conv1.weight.requires_grad_(False)  # partly frozen
    model.fc.weight.grad = torch.ones_like(model.fc.weight)  # stale gradient left by the user
    model.conv2.register_forward_hook(lambda *a: None)  # a hook of the user's own
    return Subject(model, input_size=(32, 32))


def test_model_unchanged_after_every_method():
    subject = _subject_in_odd_state()
    before = subject.state_fingerprint()
    x = torch.randn(2, 3, 32, 32)
    out = sk.explain(subject, x, method=CORE, params={"integrated_gradients": {"steps": 4},
                                                      "smoothgrad": {"samples": 3},
                                                      "smooth_gradcam_pp": {"samples": 2}})
    assert set(out) == set(CORE)
    assert_same_state(before, subject.state_fingerprint())
    assert subject.model.training  # still in training mode, as found


def test_model_unchanged_after_an_exception():
    subject = _subject_in_odd_state()
    before = subject.state_fingerprint()

    class Boom(Exception):
        pass

    def explode(*_):
        raise Boom()

    handle = subject.model.fc.register_forward_hook(explode)
    with_boom = subject.state_fingerprint()
    for method in ["gradcam", "guided_backprop", "integrated_gradients", "scorecam"]:
        with pytest.raises(Boom):
            sk.explain(subject, torch.randn(1, 3, 32, 32), method=method)
        assert_same_state(with_boom, subject.state_fingerprint())
    handle.remove()
    assert_same_state(before, subject.state_fingerprint())
    assert torch.nn.functional.relu.__module__ == "torch.nn.functional"  # the GBP patch was undone


def test_in_place_relu_does_not_corrupt_captures():
    # With inplace ReLU after conv2, a naive hook on conv2 would see post-ReLU values.
    torch.manual_seed(0)
    a = Subject(TinyCNN(inplace=True), input_size=(32, 32))
    b = Subject(TinyCNN(inplace=False), input_size=(32, 32))
    b.model.load_state_dict(a.model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    ea = sk.explain(a, x, method="hirescam", layer="conv2", relu=False)
    eb = sk.explain(b, x, method="hirescam", layer="conv2", relu=False)
    assert torch.allclose(ea.maps, eb.maps)
    assert (ea.raw < 0).any()  # pre-activation values were captured, not the ReLU output


def test_user_no_grad_context_is_handled(tiny):
    x = torch.randn(1, 3, 32, 32)
    ref = sk.explain(tiny, x, method=["saliency", "gradcam"])
    with torch.no_grad():
        inside = sk.explain(tiny, x, method=["saliency", "gradcam"])
    for k in ref:
        assert torch.equal(ref[k].maps, inside[k].maps)


def test_shared_activation_module_called_twice():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1)
            self.act = nn.ReLU()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.act(self.c2(self.act(self.c1(x)))).mean((2, 3)))

    torch.manual_seed(0)
    subject = Subject(Shared(), input_size=(16, 16))
    x = torch.randn(1, 3, 16, 16)
    # the capture of `act` is its last call (after c2): equals a capture of c2's output through ReLU
    e = sk.explain(subject, x, method="hirescam", layer="act")
    with torch.enable_grad():
        xin = x.clone().requires_grad_(True)
        a2 = subject.model.act(subject.model.c2(subject.model.act(subject.model.c1(xin))))
        s = subject.model.fc(a2.mean((2, 3)))[0].max()
        (g,) = torch.autograd.grad(s, a2)
    assert torch.allclose(e.raw[0], (g * a2).sum(1)[0].clamp_min(0), atol=1e-6)


def test_repeated_calls_do_not_grow_memory(tiny):
    x = torch.randn(1, 3, 32, 32)
    for _ in range(20):
        sk.explain(tiny, x, method=["gradcam", "saliency"])
    gc.collect()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(200):
        sk.explain(tiny, x, method=["gradcam", "saliency"])
    gc.collect()
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
    # peak RSS may rise a little from allocator noise; a leak of the maps/graphs of 200 calls would be
    # far above 20 MB on this model (each call's graph + maps ~ 100 kB)
    assert grown_kb < 20_000
    assert count_hooks(tiny.model) == 0
