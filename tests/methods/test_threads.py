"""Several threads explaining with one Subject at once get exactly the maps each would get alone.

Nothing a call does may reach another thread's call: guided backprop's rule is a torch-function
mode (kept per thread by torch), every hook a call puts on the shared model acts only on that
thread's forwards, eval mode and the in-place flags are restored by the last call to leave, and a
method that changes the weights for a moment (LRP) has the model to itself. The comparisons are
exact (`torch.equal`): the same rows through the same kernels in the same order give the same bits,
so any difference is a leak between calls, not rounding.
"""
import threading

import pytest
import torch
import torchvision

import saliencykit as sk
from saliencykit import Subject


def _resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.train()  # left in training mode: a call that restored it early would switch BN to batch statistics
    return Subject(model, input_size=(48, 48), name="resnet18")


def _run_threads(subject, x, jobs, rounds):
    """Each job (method, params) in its own thread, `rounds` times, all started together."""
    barrier = threading.Barrier(len(jobs))
    results = {i: [] for i in range(len(jobs))}
    errors = []

    def work(i, method, params):
        try:
            barrier.wait()
            for _ in range(rounds):
                results[i].append(sk.explain(subject, x, method, target=3, **params).maps)
        except BaseException as err:  # reported by the test, not lost in the thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i, m, p)) for i, (m, p) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    return results


@pytest.mark.slow
def test_four_threads_three_methods_on_one_subject():
    # the audit's case: guided backprop running while saliency ran in another thread gave saliency the
    # guided map (20 of 20 calls); gradcam's capture hooks would also catch another thread's activations
    subject = _resnet()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    methods = ["saliency", "guided_backprop", "gradcam"]
    alone = {m: sk.explain(subject, x, m, target=3).maps for m in methods}
    assert not torch.equal(alone["saliency"], alone["guided_backprop"])
    # 4 threads, each running the three methods in its own order, twice
    per_thread = [[methods[(i + k) % 3] for k in range(3)] for i in range(4)]
    barrier = threading.Barrier(4)
    got, errors = [], []

    def work(order):
        try:
            barrier.wait()
            for _ in range(2):
                for m in order:
                    got.append((m, sk.explain(subject, x, m, target=3).maps))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(order,)) for order in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(got) == 4 * 2 * 3
    for m, maps in got:
        assert torch.equal(maps, alone[m]), m
    assert subject.model.training  # left as found, by the last call to leave
    assert all(mod.training for mod in subject.model.modules())


@pytest.mark.slow
def test_threads_with_methods_that_hook_or_change_the_model():
    # deconvnet (per-thread rule), integrated gradients (chunked passes), LRP (merges batch norm into the
    # weights for the call: the others must not run a forward on merged weights) and layercam (captures)
    subject = _resnet()
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    jobs = [("deconvnet", {}), ("integrated_gradients", {"steps": 4}), ("lrp", {}), ("layercam", {})]
    alone = {m: sk.explain(subject, x, m, target=3, **p).maps for m, p in jobs}
    results = _run_threads(subject, x, jobs, rounds=2)
    for i, (m, _p) in enumerate(jobs):
        for maps in results[i]:
            assert torch.equal(maps, alone[m]), m
    assert all(mod.training for mod in subject.model.modules())
    weights = [p.detach().clone() for p in subject.model.parameters()]
    sk.explain(subject, x, "lrp", target=3)
    assert all(torch.equal(a, b) for a, b in zip(weights, subject.model.parameters()))


@pytest.mark.slow
def test_two_threads_evaluating_lrp_with_a_metric_that_re_explains():
    # max_sensitivity re-runs LRP (which merges batch norm into the weights for a moment) inside the
    # evaluation: each evaluation takes the model to itself for its whole length, so two of them in two
    # threads neither wait for each other for ever nor see merged weights; scores equal the ones alone
    subject = _resnet()
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    exp = sk.explain(subject, x, "lrp", target=3)
    settings = dict(metrics=["max_sensitivity"], target=3, seed=1, random_baseline=False,
                    params={"max_sensitivity": {"n_samples": 2}})
    alone = sk.evaluate(subject, x, exp, **settings)["max_sensitivity"]["lrp"].scores
    got, errors = [], []

    def work():
        try:
            got.append(sk.evaluate(subject, x, exp, **settings)["max_sensitivity"]["lrp"].scores)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(got) == 2 and all(torch.equal(g, alone) for g in got)
