"""GPU readiness without a GPU: the per-chunk work of the hot loops stays on the input's device.

No GPU is needed: these check that the device-resident forms give exactly the values of their
definitions (the RISE crop, the per-row target score), and that the engine asks the device for
no host value per chunk (a `.item()`, `.tolist()` or `.cpu()` there waits for a GPU every chunk)."""
import inspect

import torch
import torch.nn.functional as F

import saliencykit as sk
from saliencykit import engine
from saliencykit.methods.perturbation import RiseMasks
from saliencykit.targets import Class, Contrast, Group


def test_rise_masks_are_the_crops_at_the_recorded_shifts():
    # the definition: mask i = upsampled grid i cropped at (shift_y[i], shift_x[i]); exact (a copy)
    for size in [(40, 36), (50,), (9, 10, 11)]:
        gen = RiseMasks(37, 4, 0.5, size, seed=3)
        idx = torch.tensor([0, 5, 36, 17, 5])
        got = gen(idx)
        up = tuple((gen.cell + 1) * st for st in gen.step)
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
        big = F.interpolate(gen.grids[idx], size=up, mode=mode, align_corners=False).clamp(0, 1)
        for r, i in enumerate(idx.tolist()):
            crop = big[(r, 0, *(slice(int(sh[i]), int(sh[i]) + n) for sh, n in zip(gen.shifts, size)))]
            assert torch.equal(got[r, 0], crop)
        assert all(sh.device == gen.grids.device for sh in gen.shifts)


def test_target_scores_of_row_subsets_equal_the_definitions(tiny):
    # rows index the resolved target on the device; each row must score as its example does by
    # definition (a class: its logit; a group: logsumexp of its logits; a contrast: the difference)
    torch.manual_seed(0)
    logits = torch.randn(3, 5)
    rows = torch.tensor([2, 0, 2, 1])
    lse = torch.logsumexp(logits[:, [0, 3]], 1)
    cases = [(Class([1, 4, 2]), logits[[0, 1, 2], [1, 4, 2]]),
             (Group([0, 3]), lse),
             (Contrast(Group([0, 3]), vs=1), lse - logits[:, 1]),
             (Contrast([1, 2, 4], vs=[0, 0, 3]), logits[[0, 1, 2], [1, 2, 4]] - logits[[0, 1, 2], [0, 0, 3]])]
    for tgt, want in cases:
        resolved = tgt.resolve(tiny, logits)
        assert torch.allclose(resolved.score(logits), want, atol=1e-6)
        assert torch.equal(resolved.score(logits[rows], rows=rows), resolved.score(logits)[rows])


def test_engine_asks_the_device_for_no_host_values():
    src = inspect.getsource(engine)
    for call in (".item()", ".tolist()", ".cpu()"):
        assert call not in src, f"engine.py calls {call}: a GPU would wait for it on every chunk"


def test_hard_masks_pick_exactly_what_the_blend_gives(tiny, tiny_x):
    # perturbed_scores picks torch.where(mask, x, baseline) for a bool mask; the definition is the
    # blend x*m + b*(1-m), which for m in {0, 1} is the same input bit for bit, so the scores are equal
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(6, 1, 32, 32, generator=g) > 0.5
    rows = torch.tensor([0, 1, 0, 1, 1, 0])
    base = torch.randn(tiny_x.shape, generator=g)
    target = sk.Class(0).resolve(tiny, tiny.forward(tiny_x))
    with tiny.explaining():
        hard = engine.perturbed_scores(tiny, tiny_x, base, target, lambda a, b: (rows[a:b], keep[a:b]), 6,
                                       batch_size=4)
        soft = engine.perturbed_scores(tiny, tiny_x, base, target, lambda a, b: (rows[a:b], keep[a:b].float()), 6,
                                       batch_size=4)
    assert torch.equal(hard, soft)
    # and they are the scores of the blended inputs themselves
    blended = tiny_x[rows] * keep + base[rows] * ~keep
    assert torch.allclose(hard, tiny.forward(blended)[:, 0].detach(), atol=1e-6)
