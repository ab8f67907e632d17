"""The faster forms of the model for forward-only runs (`saliencykit.inference`).

Each form must compute the function the eager model computes. The frozen form folds batch norm
into the convolutions and fuses operators, so it rounds differently: outputs are compared at
1e-4 of the largest magnitude (float32 rounding through a few layers is ~1e-6; 1e-4 leaves room
and still catches a wrong weight, a stale copy or a dropped layer, which differ at order 1).
"""
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import engine, inference
from saliencykit.errors import SaliencyError
from saliencykit.targets import Class

from state import assert_same_state


class ConvBN(nn.Module):
    """conv-bn-relu twice -> GAP -> linear: what freezing folds and fuses."""

    def __init__(self, classes=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, classes)
        for bn in (self.features[1], self.features[4]):  # non-trivial statistics, so folding matters
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class FlattensWithView(ConvBN):
    """Flattens a 4-d activation with `.view`, which fails when the input (and so the
    activation) is channels-last: channels then lie innermost, not outermost."""

    def __init__(self, classes=4):
        super().__init__(classes)
        self.fc = nn.Linear(8 * 8 * 8, classes)

    def forward(self, x):
        f = self.features(x)
        return self.fc(f.view(f.shape[0], -1))


class Branches(ConvBN):
    """Control flow decided by the input's values: a trace would bake in one branch."""

    def forward(self, x):
        f = self.features(x).mean((2, 3))
        return self.fc(f) if float(x.mean()) > 0 else -self.fc(f)


def subject(model_cls=ConvBN, fast=None, seed=0):
    torch.manual_seed(seed)
    return sk.Subject(model_cls().eval(), labels=["a", "b", "c", "d"], input_size=(16, 16), fast=fast)


def scores(subj, x, n=40, batch=4):
    """`forward_scores` of n fixed inputs, as a thousand-pass method would call it."""
    g = torch.Generator().manual_seed(3)
    inputs = torch.randn(n, *x.shape[1:], generator=g) + x
    with subj.explaining(), torch.no_grad():
        target = Class(1).resolve(subj, subj.model(x))
        return engine.forward_scores(subj, lambda a, b: inputs[a:b], n, target,
                                     lambda a, b: torch.zeros(b - a, dtype=torch.long), batch_size=batch)


def close(a, b):
    return torch.allclose(a, b, rtol=0, atol=1e-4 * float(b.abs().max()))


@pytest.fixture
def x():
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("form", ["channels_last", "frozen", "onnxruntime"])
def test_each_form_computes_the_eager_scores(x, form):
    if form == "onnxruntime":
        pytest.importorskip("onnxruntime")
    eager = scores(subject(fast=False), x)
    subj = subject(fast=form)
    got = scores(subj, x)
    (plan,) = inference.plans(subj).values()
    assert plan.form == form, plan.rejected
    assert close(got, eager)


def test_auto_times_the_forms_and_keeps_one_for_later_runs(x, monkeypatch):
    monkeypatch.setattr(inference, "TUNE_MIN_CHUNKS", 5)
    subj = subject()
    first = scores(subj, x)  # 10 chunks: timed
    (plan,) = inference.plans(subj).values()
    assert set(plan.ms_per_row) | set(plan.rejected) == set(inference.FORMS)
    assert set(plan.rejected) <= {"onnxruntime"}  # only when that optional package is missing
    assert plan.form in inference.FORMS
    assert torch.equal(scores(subj, x), first)  # same plan, same rounding: one run never mixes forms
    assert close(first, scores(subject(fast=False), x))


def test_short_runs_are_not_timed(x):
    subj = subject()
    scores(subj, x, n=8)
    assert inference.plans(subj) == {}


def test_switched_off_by_the_subject_or_the_environment(x, monkeypatch):
    monkeypatch.setattr(inference, "TUNE_MIN_CHUNKS", 1)
    subj = subject(fast=False)
    scores(subj, x)
    assert inference.plans(subj) == {}
    monkeypatch.setenv("SALIENCYKIT_FAST", "0")
    subj = subject(fast="frozen")
    scores(subj, x)
    assert inference.plans(subj) == {}


def test_unknown_setting_is_named(x):
    with pytest.raises(SaliencyError, match="fast='turbo'"):
        scores(subject(fast="turbo"), x)


@pytest.mark.parametrize("form", ["frozen", "onnxruntime"])
def test_trained_weights_are_never_served_from_a_stale_copy(x, form):
    if form == "onnxruntime":
        pytest.importorskip("onnxruntime")
    subj = subject(fast=form)
    before = scores(subj, x)
    with torch.no_grad():
        subj.model.fc.weight.mul_(-2.0)  # in place, as an optimiser step does
    after = scores(subj, x)
    assert close(after, scores(_eager_copy(subj), x))
    assert not close(after, before)


def _eager_copy(subj):
    return sk.Subject(subj.model, labels=subj.labels, input_size=subj.input_size, fast=False)


@pytest.mark.parametrize("model_cls, form, why", [
    (FlattensWithView, "channels_last", "view"),       # `.view` fails on channels-last activations
    (Branches, "frozen", "tracing warned"),             # a trace would bake in one branch
])
def test_a_form_the_model_cannot_take_falls_back_to_eager(x, model_cls, form, why):
    subj = subject(model_cls, fast=form)
    got = scores(subj, x)
    (plan,) = inference.plans(subj).values()
    assert plan.form == "eager" and why in plan.rejected[form]
    assert torch.equal(got, scores(subject(model_cls, fast=False), x))


def test_without_onnxruntime_that_form_is_skipped_with_the_reason(x, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # import now raises ImportError
    subj = subject(fast="onnxruntime")
    got = scores(subj, x)
    (plan,) = inference.plans(subj).values()
    assert plan.form == "eager" and "pip install saliencykit[fast]" in plan.rejected["onnxruntime"]
    assert torch.equal(got, scores(subject(fast=False), x))


def test_a_model_with_hooks_runs_eagerly_and_its_hooks_fire(x):
    subj = subject(fast="frozen")
    calls = []
    handle = subj.model.features[0].register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        scores(subj, x, n=12)
    finally:
        handle.remove()
    assert inference.plans(subj) == {} and sum(calls) == 1 + 12  # the target's forward, then 12 rows


@pytest.mark.parametrize("form", ["frozen", "onnxruntime"])
def test_building_a_plan_keeps_the_eval_mode_of_the_run(x, form):
    # Exporting restores the train/eval mode of the module it was given; a wrapper made in
    # training mode once switched the whole model to training mode for the rest of the call,
    # so later eager passes (the next metric) ran with batch statistics. The modes must be
    # those of the run right after the plan is built, inside `explaining()`.
    if form == "onnxruntime":
        pytest.importorskip("onnxruntime")
    subj = subject(fast=form)
    subj.model.train()  # as a user may leave it: explaining() switches to eval for the call
    g = torch.Generator().manual_seed(3)
    inputs = torch.randn(12, *x.shape[1:], generator=g)
    with subj.explaining(), torch.no_grad():
        target = Class(1).resolve(subj, subj.model(x))
        engine.forward_scores(subj, lambda a, b: inputs[a:b], 12, target,
                              lambda a, b: torch.zeros(b - a, dtype=torch.long), batch_size=4)
        assert not any(m.training for m in subj.model.modules())
    assert all(m.training for m in subj.model.modules())  # and restored after the call


def test_model_is_left_as_found(x):
    subj = subject()
    before = subj.state_fingerprint()
    for form in ("channels_last", "frozen", "onnxruntime"):
        subj.fast = form
        scores(subj, x)
    assert_same_state(before, subj.state_fingerprint())


def test_a_method_gives_the_same_map_in_every_form(x):
    """Occlusion is scored through `forward_scores`: its map moves only by rounding."""
    maps = {}
    forms = ("channels_last", "frozen") + (("onnxruntime",) if _has_onnxruntime() else ())
    for fast in (False,) + forms:
        e = sk.explain(subject(fast=fast), x, "occlusion", target=1, patch=4, stride=2)
        maps[fast] = e.maps
        assert e.passes["forward"] == 1 + 49  # the timing probes are not the method's passes
    for fast in forms:
        assert close(maps[fast], maps[False])


def test_a_hook_added_after_the_plan_was_built_still_fires(x):
    # PyTorch would not call a hook added to a module after it was traced; the plan is skipped
    # whenever the model has a hook at the time of the call.
    subj = subject(fast="frozen")
    scores(subj, x)
    assert next(iter(inference.plans(subj).values())).form == "frozen"
    calls = []
    handle = subj.model.fc.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        scores(subj, x, n=12)
    finally:
        handle.remove()
    assert sum(calls) == 1 + 12


def test_a_subject_with_its_own_forward_is_never_frozen(x):
    class Scaled(sk.Subject):
        def forward(self, inp):
            return 2 * super().forward(inp)

    torch.manual_seed(0)
    subj = Scaled(ConvBN().eval(), labels=["a", "b", "c", "d"], input_size=(16, 16), fast="frozen")
    got = scores(subj, x)
    (plan,) = inference.plans(subj).values()
    assert plan.form == "eager" and "own forward" in plan.rejected["frozen"]
    assert close(got, 2 * scores(subject(fast=False), x))


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
