"""XRAI: region bookkeeping, greedy ranking against a literal implementation of
the definition, known answers with given segments and attributions, and the segmentation."""
import numpy as np
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit.errors import SaliencyError
from saliencykit.methods.region import xrai_rank, xrai_segments


def reference_xrai(attr, masks, algorithm, area_threshold=1.0, min_pixel_diff=1):
    """Literal, loop-by-loop reading of the XRAI definition (no incremental bookkeeping):
    full: repeatedly pick the mask with the highest mean attribution over its *new* pixels;
    fast: visit masks in order of their whole-mask mean. New pixels get the gain; uncovered
    pixels get their own mean. Returns the map and the region gains in added order."""
    a = attr.numpy().astype(np.float64)
    ms = [m.numpy() for m in masks]
    out = np.full(a.shape, -np.inf)
    cur = np.zeros(a.shape, bool)
    gains = []
    if algorithm == "full":
        remaining = list(range(len(ms)))
        while cur.mean() <= area_threshold:
            remaining = [i for i in remaining if (ms[i] & ~cur).sum() >= min_pixel_diff]
            if not remaining:
                break
            best, best_gain = None, -np.inf
            for i in remaining:
                g = a[ms[i] & ~cur].mean()
                if g > best_gain:
                    best, best_gain = i, g
            new = ms[best] & ~cur
            out[new] = best_gain
            gains.append(best_gain)
            cur |= new
            remaining.remove(best)
    else:
        whole = [a[m].mean() for m in ms]
        for i in sorted(range(len(ms)), key=lambda i: -whole[i]):
            new = ms[i] & ~cur
            if new.sum() < min_pixel_diff:
                continue
            out[new] = a[new].mean()
            gains.append(a[new].mean())
            cur |= ms[i]
            if area_threshold < 1 and cur.mean() > area_threshold:
                break
    rest = np.isinf(out)
    if rest.any():
        out[rest] = a[rest].mean()
    return torch.from_numpy(out), gains


def random_masks(seed, n=25, hw=(12, 12)):
    """Overlapping random rectangles (some tiny) plus one mask covering a random blob."""
    g = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(n):
        y0, x0 = torch.randint(0, hw[0] - 1, (2,), generator=g).tolist()
        h, w = torch.randint(1, 7, (2,), generator=g).tolist()
        m = torch.zeros(hw, dtype=torch.bool)
        m[y0:y0 + h, x0:x0 + w] = True
        masks.append(m)
    masks.append(torch.rand(hw, generator=g) > 0.7)
    return torch.stack(masks)


@pytest.mark.parametrize("algorithm", ["full", "fast"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_literal_definition(algorithm, seed):
    # The vectorised, incrementally updated greedy loop must give exactly the map and gains of a
    # literal loop over the definition (float64; ties are broken by mask order in both).
    attr = torch.randn(12, 12, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    masks = random_masks(seed)
    ref_map, ref_gains = reference_xrai(attr, masks, algorithm, min_pixel_diff=3)
    res = xrai_rank(attr, masks, algorithm, min_pixel_diff=3)
    torch.testing.assert_close(res["map"], ref_map, rtol=0, atol=1e-12)
    added = [res["values"][r].item() for r in res["order"]]
    np.testing.assert_allclose(added, ref_gains, rtol=0, atol=1e-12)


def test_area_threshold_stops_early():
    attr = torch.randn(12, 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    masks = random_masks(3)
    for algorithm in ("full", "fast"):
        ref_map, ref_gains = reference_xrai(attr, masks, algorithm, area_threshold=0.3, min_pixel_diff=3)
        res = xrai_rank(attr, masks, algorithm, area_threshold=0.3, min_pixel_diff=3)
        torch.testing.assert_close(res["map"], ref_map, rtol=0, atol=1e-12)
        assert len(res["order"]) == len(ref_gains)


def test_regions_cover_once_and_are_ranked_by_gain():
    attr = torch.randn(12, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    res = xrai_rank(attr, random_masks(4), "full", min_pixel_diff=2)
    regions, values, ranks = res["regions"], res["values"], res["ranks"]
    # every pixel in exactly one region; rank map = index of that region + 1 (1 = highest gain)
    assert torch.equal(regions.sum(0), torch.ones(12, 12, dtype=torch.long))
    for r in range(regions.shape[0]):
        assert torch.equal(ranks == r + 1, regions[r])
        # the map is constant on each region and equals the region's gain there
        assert torch.allclose(res["map"][regions[r]], values[r].expand(int(regions[r].sum())))
    # ranked by gain, except the uncovered remainder, always last; rank 1 holds the map's maximum
    covered = values[:len(res["order"])]
    assert torch.all(covered[:-1] >= covered[1:])
    assert res["map"][regions[0]][0] == res["map"].max()
    assert not torch.isinf(res["map"]).any()


def test_hand_computed_toy():
    # 1x6 image, attr [10, 0, 0, 6, 6, 1]; masks A={0}, B={0,1}, C={3,4}, D={2,3,4,5}.
    # full: A (10); then new-pixel gains B{1}=0, C=6, D{2,3,4,5}=13/4 -> C; then B{1}=0,
    # D{2,5}=0.5 -> D; then B{1}=0 -> B. Map [10, 0, 0.5, 6, 6, 0.5]; ranks A, C, D, B.
    attr = torch.tensor([[10.0, 0, 0, 6, 6, 1]], dtype=torch.float64)
    idx = [[0], [0, 1], [3, 4], [2, 3, 4, 5]]
    masks = torch.zeros(4, 1, 6, dtype=torch.bool)
    for i, cols in enumerate(idx):
        masks[i, 0, cols] = True
    res = xrai_rank(attr, masks, "full", min_pixel_diff=1)
    torch.testing.assert_close(res["map"][0], torch.tensor([10, 0, 0.5, 6, 6, 0.5], dtype=torch.float64))
    assert res["ranks"][0].tolist() == [1, 4, 3, 2, 2, 3]
    # fast: whole-mask means A 10, C 6, B 5, D 3.25 -> A, C, B {1}=0, D {2,5}=0.5: same pixels here
    fast = xrai_rank(attr, masks, "fast", min_pixel_diff=1)
    torch.testing.assert_close(fast["map"], res["map"])
    # min_pixel_diff = 3 drops A, B and C (fewer than 3 pixels): only D is added (3.25); pixels
    # {0, 1} stay uncovered and get their own mean (5), ranked after every added region
    res3 = xrai_rank(attr, masks, "full", min_pixel_diff=3)
    torch.testing.assert_close(res3["map"][0], torch.tensor([5, 5, 3.25, 3.25, 3.25, 3.25], dtype=torch.float64))
    assert res3["ranks"][0].tolist() == [2, 2, 1, 1, 1, 1]


class Linear(nn.Module):
    """s = <w_c, x>: IG is (x - x') * w_c exactly for any quadrature rule."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 16 * 16, 3, bias=True)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_explain_with_tiling_segments_gives_per_tile_means_of_ig():
    # End to end on a linear model, where the XRAI base attribution is known in closed form:
    # mean over the black and white baselines of (x - x') * w, then the maximum over channels.
    # With 4x4 tiles tiling the image, the output is the per-tile mean of that attribution.
    s = sk.Subject(Linear(), input_size=(16, 16), name="linear")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = (torch.arange(16).view(-1, 1) // 4) * 4 + torch.arange(16).view(1, -1) // 4
    e = sk.explain(s, x, "xrai", target=[0, 2], steps=3, segments=labels, min_pixel_diff=1)
    w = s.model.fc.weight.detach()[[0, 2]].view(2, 3, 16, 16)
    black, white = s.black(x), s.normalize_pixels(torch.ones_like(x))
    base = (((x - black) * w + (x - white) * w) / 2).amax(1)
    tiles = base.view(2, 4, 4, 4, 4).mean((2, 4))  # [B, tile_y, tile_x]
    expected = tiles.repeat_interleave(4, 1).repeat_interleave(4, 2)
    torch.testing.assert_close(e.maps, expected, rtol=1e-4, atol=1e-6)
    assert e.passes["backward"] == 6  # 3 steps x 2 baselines
    assert e.raw.shape == (2, 16, 16) and int(e.raw.max()) == 16 and len(e.extras["regions"]) == 2


def test_given_attribution_and_masks_both_algorithms(tiny, tiny_x):
    # A given attribution skips IG (no passes beyond the clean forward); tiles -> per-tile means.
    attr = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(2))
    masks = torch.stack([(torch.arange(32).view(-1, 1) // 8 == i) & (torch.arange(32).view(1, -1) // 8 == j)
                         for i in range(4) for j in range(4)])
    expected = attr.view(2, 4, 8, 4, 8).mean((2, 4)).repeat_interleave(8, 1).repeat_interleave(8, 2)
    for algorithm in ("full", "fast"):
        e = sk.explain(tiny, tiny_x, "xrai", base_attribution=attr, segments=masks, algorithm=algorithm)
        torch.testing.assert_close(e.maps, expected, rtol=1e-5, atol=1e-6)
        assert e.passes["backward"] == 0
        # the first region has the maximal value and covers its tile
        for b in range(2):
            first = e.extras["regions"][b][0]
            assert e.maps[b][first].max() == e.maps[b].max()


def test_felzenszwalb_segments(chelsea):
    img = np.asarray(chelsea.resize((64, 48)), dtype=np.float64) / 255
    raw = xrai_segments(img, scales=(50, 500), dilation=0)
    dil = xrai_segments(img, scales=(50, 500), dilation=5)
    assert raw.shape[1:] == (48, 64) and raw.shape == dil.shape
    # without dilation each scale is a partition: every pixel lies in exactly one mask per scale
    assert torch.equal(raw.sum(0), torch.full((48, 64), 2))
    # dilation only grows masks, by at most the disk radius
    assert torch.equal(dil | raw, dil) and torch.all(dil.sum((1, 2)) > raw.sum((1, 2)))
    grown = (dil & ~raw).nonzero()
    for m, y, x in grown[:: max(1, len(grown) // 50)].tolist():  # each added pixel is within 5 px of its mask
        ys, xs = raw[m].nonzero(as_tuple=True)
        assert ((ys - y) ** 2 + (xs - x) ** 2).min() <= 25


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_xrai_runs_on_torchvision_models(arch):
    s = sk.load_model(f"torchvision:{arch}:random")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = s.state_fingerprint()
    e = sk.explain(s, x, "xrai", steps=2, scales=(100, 500), algorithm="fast" if arch == "resnet18" else "full")
    assert e.maps.shape == (1, 64, 64) and torch.isfinite(e.maps).all()
    regions = e.extras["regions"][0]
    assert torch.equal(regions.sum(0), torch.ones(64, 64, dtype=torch.long))
    assert e.passes["backward"] == 4
    after = s.state_fingerprint()
    assert all(torch.equal(a, b) for a, b in zip(before["params"], after["params"]))
    assert before["training"] == after["training"] and before["hooks"] == after["hooks"]


def test_bad_parameters(tiny, tiny_x):
    bad = [{"algorithm": "slow"}, {"area_threshold": 0.0}, {"area_threshold": 1.5}, {"min_pixel_diff": -1},
           {"segments": torch.zeros(3, 5, 5, dtype=torch.bool)}, {"segments": torch.rand(32, 32)},
           {"base_attribution": torch.zeros(3, 7, 7)}, {"scales": ()}, {"baselines": []}]
    for params in bad:
        with pytest.raises(SaliencyError):
            sk.explain(tiny, tiny_x, "xrai", steps=1, **params)


# --------------------------------------------------------------------------- agreement with PAIR saliency
@pytest.mark.parametrize("algorithm", ["full", "fast"])
def test_agrees_with_pair_xrai(chelsea, algorithm):
    # PAIR's own XRAI on the same image and base attribution (its Felzenszwalb segments, dilation,
    # and greedy loop): the segments are the same masks, and map and rank map are equal.
    core = pytest.importorskip("saliency.core")
    from saliency.core.xrai import _get_segments_felzenszwalb

    img = np.asarray(chelsea.resize((48, 40)), dtype=np.float64) / 255
    attr = np.random.default_rng(0).normal(size=img.shape)
    ours_masks = xrai_segments(img)
    pair_masks = _get_segments_felzenszwalb(img)
    # PAIR also lists labels that vanish when the label map is resized back (empty masks, never
    # selected); ours keeps only the labels present
    nonempty = np.stack([m for m in pair_masks if m.any()])
    assert torch.equal(ours_masks, torch.from_numpy(nonempty))
    params = core.XRAIParameters(algorithm=algorithm, return_xrai_segments=True)
    ref = core.XRAI().GetMaskWithDetails(img, None, base_attribution=attr, segments=pair_masks,
                                         extra_parameters=params)
    res = xrai_rank(torch.from_numpy(attr).amax(-1), ours_masks, algorithm)
    torch.testing.assert_close(res["map"], torch.from_numpy(ref.attribution_mask).double(), rtol=0, atol=1e-12)
    assert np.array_equal(res["ranks"].numpy(), ref.segments)
