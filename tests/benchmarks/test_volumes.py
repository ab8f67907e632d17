"""Procedural volumes with known organ masks and the shipped tiny 3-D U-Net (no training here)."""
import numpy as np
import pytest
import torch

import saliencykit as sk
from saliencykit.benchmarks.volumes import dataset as V
from saliencykit.errors import SaliencyError


def test_same_seed_same_volumes_and_disjoint_organs():
    a, b, c = V.generate(3, seed=2), V.generate(3, seed=2), V.generate(3, seed=3)
    # exact equality: a pure function of (seed, index)
    assert np.array_equal(a.volumes, b.volumes) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.volumes, c.volumes)
    assert a.volumes.shape == (3, 1, 32, 32, 32) and a.labels.shape == (3, 32, 32, 32)
    masks = a.organ_masks()
    assert sum(m.astype(int) for m in masks.values()).max() == 1          # one label per voxel
    assert all(m.reshape(3, -1).any(1).all() for m in masks.values())     # every organ in every volume


def test_organ_masks_match_what_is_drawn():
    batch = V.generate(6, seed=4)
    v, lab = batch.volumes[:, 0], batch.labels
    means = [float(v[lab == k].mean()) for k in range(4)]
    # background 0.1, organ_a 0.9, organ_b 0.55, organ_c 0.35 (noise averages out over the voxels)
    assert means == pytest.approx([0.1, 0.9, 0.55, 0.35], abs=0.03)
    # organ_b carries the +/-0.3 checker on top of the noise, organ_c only the noise (sigma 0.15)
    assert float(v[lab == 2].std()) == pytest.approx((0.3 ** 2 + 0.15 ** 2) ** 0.5, abs=0.03)
    assert float(v[lab == 3].std()) == pytest.approx(0.15, abs=0.02)


def test_dice_known_answers_and_bad_input():
    lab = V.generate(2, seed=1).labels
    assert V.dice(lab, lab)["mean"] == 1.0
    shifted = np.where(lab > 0, lab % 3 + 1, 0)          # every organ labelled as another one
    assert V.dice(shifted, lab)["mean"] == 0.0
    with pytest.raises(SaliencyError, match="shape"):
        V.dice(lab[:1], lab)
    with pytest.raises(SaliencyError, match="n must be"):
        V.generate(0)
    with pytest.raises(SaliencyError, match="size must be"):
        V.generate(1, size=15)


@pytest.fixture(scope="module")
def seg():
    return sk.load_model("volume_seg")


def test_shipped_segmenter_reaches_dice_085(seg):
    test = V.generate(8, seed=4242)                      # a seed never used for training
    with torch.inference_mode():
        pred = seg.model(torch.from_numpy(test.volumes)).argmax(1).numpy()
    d = V.dice(pred, test.labels)
    assert d["mean"] >= 0.85 and min(d[o] for o in V.ORGANS[1:]) >= 0.75, d
    assert seg.info["heldout_dice_mean"] >= 0.85 and seg.info["seed"] == 0


def test_aggregated_gradient_of_an_organ_lies_near_it(seg):
    """Ground truth for aggregated attributions: the gradient of the summed organ-k logit over the
    voxels predicted as k falls mostly within a few voxels of organ k (torch directly), far more
    than the organ's share of the volume (the U-Net's receptive field is ~18 voxels wide, hence a 3-voxel halo and
    60 % rather than all)."""
    test = V.generate(1, seed=77)
    x = torch.from_numpy(test.volumes).requires_grad_(True)
    out = seg.model(x)
    pred = out.argmax(1)
    for k in (1, 2, 3):
        x.grad = None
        (out[:, k] * (pred == k)).sum().backward(retain_graph=True)
        g = x.grad[:, 0].abs()
        near = torch.nn.functional.max_pool3d(torch.from_numpy(test.labels == k).float()[:, None], 7, 1, 3)[:, 0] > 0
        share = float(near.float().mean())
        inside = float((g * near).sum() / g.sum())
        assert inside > 0.6 and inside > 4 * share, (k, inside, share)
