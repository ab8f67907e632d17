"""sk.verbalize: every number in the text is a measured fact.

Checks: the numbers in each sentence are exactly the facts the sentence cites; the hide/keep
probabilities equal the model's outputs on the exact masked inputs (recomputed here with a
direct forward pass); position words follow the map; same input, same text; targets read as
contrast / group; part names are used; bad input raises SaliencyError.
"""
import json
import re

import numpy as np
import pytest
import torch

from saliencykit import Class, Contrast, Explanation, Group, SaliencyError, explain
from saliencykit.methods.gradient import make_baseline
from saliencykit.present.verbalize import verbalize

NUMBER = re.compile(r"[<>]?-?\d+(?:\.\d+)?%?")


def _numbers(text):
    # labels and part names are wrapped in *...* and may contain digits: not measured numbers
    return NUMBER.findall(re.sub(r"\*[^*]*\*", "", text))


def _shown_agrees(shown, value):
    """The printed number is the fact, rounded the documented way."""
    if shown.endswith("%"):
        s, p = shown[:-1], 100 * value
        if s == "<1":
            return 0 < p < 0.5
        if s == ">99":
            return 99.5 <= p < 100
        return abs(int(s) - p) <= 0.5
    return abs(float(shown) - value) <= 0.005


def _box_map(hw, boxes, values=None):
    m = torch.zeros(hw)
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        m[y0:y1, x0:x1] = 1.0 if values is None else values[i]
    return m


def _exp(maps, method="gradcam", signed=False):
    return Explanation(maps=maps[None] if maps.dim() == 2 else maps, method=method, signed=signed)


def _direct_probs(subject, x, base, mask, cls):
    """Independent forward pass on x*m + base*(1-m), softmax, the class probability."""
    with torch.no_grad():
        m = torch.as_tensor(mask, dtype=x.dtype)[None, None]
        logits = subject.model.eval()(x * m + base * (1 - m))
    return logits.softmax(-1)[0, cls].item()


def test_every_number_in_the_text_is_the_cited_fact(lite0, chelsea):
    x = lite0.preprocess(chelsea)
    exps = explain(lite0, x, ["gradcam", "saliency"])
    v = verbalize(lite0, x, exps["gradcam"], compare=[exps["saliency"]])
    assert v.text == " ".join(s["text"] for s in v.sentences)
    seen_keys = set()
    for sent in v.sentences:
        # the numbers printed, in order, are exactly those the sentence cites ...
        assert _numbers(sent["text"]) == [n["shown"] for n in sent["numbers"]], sent["text"]
        for n in sent["numbers"]:
            # ... each cited value is the fact stored under its key, and printed correctly rounded
            assert n["value"] == v.fact(n["key"])
            assert _shown_agrees(n["shown"], n["value"]), n
            seen_keys.add(n["key"])
    # the rank correlation is Spearman's over 14x14 blocks of positive evidence (224 = 14 x 16)
    from scipy.stats import spearmanr

    blocks = [e.maps[0].clamp(min=0).numpy().reshape(14, 16, 14, 16).mean((1, 3)).ravel()
              for e in (exps["gradcam"], exps["saliency"])]
    assert v.facts["compare"][0]["rank_correlation"] == pytest.approx(spearmanr(*blocks).statistic, abs=1e-6)
    # the main region's size, share and both measured effects are all in the text
    assert {"prob", "regions.0.area", "regions.0.evidence", "regions.0.removed", "regions.0.kept",
            "compare.0.rank_correlation"} <= seen_keys
    # shares are of one pool of positive evidence: they cannot add up to more than all of it
    assert sum(r["evidence"] for r in v.facts["regions"]) <= 1 + 1e-9
    top = lite0.predict(x, k=1)[0][0]
    assert v.facts["prob"] == pytest.approx(top["prob"], abs=1e-5)
    assert f"*{top['label']}*" in v.text


def test_hide_and_keep_numbers_are_the_model_outputs_on_those_masked_inputs(tiny, tiny_x):
    # two exact rectangles (smooth=0): the regions are known, so the masked inputs can be rebuilt
    x = tiny_x[:1]
    boxes = [(2, 3, 12, 14), (20, 18, 30, 30)]
    smap = _box_map((32, 32), boxes, values=[1.0, 0.8])
    v = verbalize(tiny, x, _exp(smap), smooth=0.0, baseline="black")
    cls = v.facts["target"]["indices"][0]
    black = tiny.black(x)
    assert len(v.facts["regions"]) == 2
    for rf, (y0, x0, y1, x1) in zip(v.facts["regions"], boxes):
        mask = np.zeros((32, 32), dtype=bool)
        mask[y0:y1, x0:x1] = True
        # float32 forward of the same input: differences are rounding only
        assert rf["removed"] == pytest.approx(_direct_probs(tiny, x, black, ~mask, cls), abs=1e-6)
        assert rf["kept"] == pytest.approx(_direct_probs(tiny, x, black, mask, cls), abs=1e-6)
        assert rf["area"] == pytest.approx(mask.mean())
    union = _box_map((32, 32), boxes).numpy() > 0
    assert v.facts["together"]["removed"] == pytest.approx(_direct_probs(tiny, x, black, ~union, cls), abs=1e-6)
    assert v.facts["together"]["kept"] == pytest.approx(_direct_probs(tiny, x, black, union, cls), abs=1e-6)
    # evidence shares: 100 px * 1.0 and 120 px * 0.8 of the 196 total
    assert v.facts["regions"][0]["evidence"] == pytest.approx(110 / 206)
    assert v.facts["regions"][1]["evidence"] == pytest.approx(96 / 206)
    # the random comparison: the main rectangle rolled by the recorded shifts, hidden
    main = np.zeros((32, 32), dtype=bool)
    main[2:12, 3:14] = True
    rnd = v.facts["random"]
    for (dy, dx), got in zip(rnd["shifts"], rnd["removed"]):
        moved = np.roll(main, (dy, dx), axis=(0, 1))
        assert got == pytest.approx(_direct_probs(tiny, x, black, ~moved, cls), abs=1e-6)
    assert rnd["removed_mean"] == pytest.approx(np.mean(rnd["removed"]))
    # passes: 1 clean forward + (hide, keep) x (2 regions + both together) + 8 random placements
    assert v.facts["passes"] == {"forward": 1 + 6 + 8, "backward": 0}


def test_hide_keep_on_pretrained_model_with_blur_baseline(lite0, chelsea):
    # the meaning check: Grad-CAM's main region on the cat matters more than the same-size area moved
    # to the opposite corner, and the numbers are the model's own on those exact blurred inputs
    x = lite0.preprocess(chelsea)
    exp = explain(lite0, x, "gradcam")
    v = verbalize(lite0, x, exp)
    cls = v.facts["target"]["indices"][0]
    base = make_baseline(lite0, x, "blur")
    main = v.masks[0]
    assert v.facts["regions"][0]["removed"] == pytest.approx(_direct_probs(lite0, x, base, ~main, cls), abs=1e-4)
    assert v.facts["regions"][0]["kept"] == pytest.approx(_direct_probs(lite0, x, base, main, cls), abs=1e-4)
    moved = np.roll(main, (112, 112), axis=(0, 1))
    moved_removed = _direct_probs(lite0, x, base, ~moved, cls)
    assert v.facts["regions"][0]["removed"] < moved_removed - 0.2
    assert v.facts["regions"][0]["kept"] > v.facts["regions"][0]["removed"]


@pytest.mark.parametrize("quadrant,words", [((0, 0), "upper left"), ((0, 1), "upper right"),
                                            ((1, 0), "lower left"), ((1, 1), "lower right")])
def test_a_map_in_one_quadrant_gets_that_quadrants_words(tiny, tiny_x, quadrant, words):
    qy, qx = quadrant
    y0, x0 = 2 + 20 * qy, 2 + 20 * qx  # a 8x8 blob well inside the quadrant's outer cell
    smap = _box_map((32, 32), [(y0, x0, y0 + 8, x0 + 8)])
    v = verbalize(tiny, tiny_x[:1], _exp(smap))
    r = v.facts["regions"][0]
    assert r["words"] == words and f"{words} of the image" in v.text
    assert r["grid_cell"] == [2 * qy, 2 * qx]
    assert v.facts["n_regions_found"] == 1 and "one region" in v.text
    # all positive evidence lies in that one blob (smoothing only shapes the region)
    assert r["evidence"] == pytest.approx(1.0)


def test_centre_and_same_input_same_text(tiny, tiny_x):
    smap = _box_map((32, 32), [(12, 12, 20, 20)])
    a = verbalize(tiny, tiny_x[:1], _exp(smap))
    b = verbalize(tiny, tiny_x[:1], _exp(smap.clone()))
    assert "in the centre of the image" in a.text
    assert a.text == b.text and a.to_json() == b.to_json()
    back = json.loads(a.to_json())
    assert back["text"] == a.text and back["facts"]["regions"][0]["words"] == "centre"


def test_contrast_and_group_wording(lite0, chelsea):
    x = lite0.preprocess(chelsea)
    e = explain(lite0, x, "gradcam", target=Contrast("tabby", vs="Egyptian cat"))
    v = verbalize(lite0, x, e)
    assert "*tabby*" in v.text and "rather than *Egyptian cat*" in v.text
    probs = torch.softmax(lite0.forward(x).detach(), -1)[0]
    assert v.facts["prob"] == pytest.approx(probs[lite0.class_index("tabby")].item(), abs=1e-5)
    assert v.facts["vs_prob"] == pytest.approx(probs[lite0.class_index("Egyptian cat")].item(), abs=1e-5)
    g = explain(lite0, x, "gradcam", target=Group("cat"))
    vg = verbalize(lite0, x, g)
    assert "any kind of *cat*" in vg.text
    idx = lite0.groups["cat"]
    assert vg.facts["prob"] == pytest.approx(probs[idx].sum().item(), abs=1e-5)


def test_part_names_are_used(tiny, tiny_x):
    smap = _box_map((32, 32), [(2, 2, 10, 10)])
    head = np.zeros((32, 32), dtype=bool)
    head[0:12, 0:12] = True
    tail = ~head
    v = verbalize(tiny, tiny_x[:1], _exp(smap), parts={"head": head, "tail": tail})
    assert v.facts["regions"][0]["name"] == "head" and "(the *head*)" in v.text
    vp = verbalize(tiny, tiny_x[:1], _exp(smap), parts={"head": head, "tail": tail}, regions="parts")
    assert [r["name"] for r in vp.facts["regions"]] == ["head", "tail"]
    assert vp.facts["regions"][0]["evidence"] == pytest.approx(1.0)


def test_signed_map_mentions_negative_evidence(tiny, tiny_x):
    smap = _box_map((32, 32), [(2, 2, 10, 10), (22, 22, 30, 30)], values=[1.0, -0.5])
    v = verbalize(tiny, tiny_x[:1], _exp(smap, method="integrated_gradients", signed=True))
    assert v.facts["negative"]["words"] == "lower right"
    assert "Evidence against" in v.text and "lower right" in v.text.split("Evidence against")[1]


def test_no_positive_evidence(tiny, tiny_x):
    v = verbalize(tiny, tiny_x[:1], _exp(torch.zeros(32, 32)))
    assert "finds no positive evidence" in v.text and v.facts["regions"] == []


def test_bad_input_and_model_left_as_found(tiny, tiny_x):
    before = tiny.state_fingerprint()
    smap = _exp(_box_map((32, 32), [(2, 2, 10, 10)]))
    with pytest.raises(SaliencyError, match="threshold"):
        verbalize(tiny, tiny_x[:1], smap, threshold=0)
    with pytest.raises(SaliencyError, match="NaN"):
        verbalize(tiny, tiny_x[:1], _exp(torch.full((32, 32), float("nan"))))
    with pytest.raises(SaliencyError, match="index"):
        verbalize(tiny, tiny_x, smap, index=5)
    e = explain(tiny, tiny_x[:1], "gradcam", target=Class(1))
    with pytest.raises(SaliencyError, match="made for"):
        verbalize(tiny, tiny_x[:1], e, target=Class(2))
    verbalize(tiny, tiny_x[:1], e)
    after = tiny.state_fingerprint()
    assert after["hooks"] == before["hooks"] and after["training"] == before["training"]
    assert all(torch.equal(a, b) for a, b in zip(after["params"], before["params"]))
    assert after["requires_grad"] == before["requires_grad"]


class RegionModel(torch.nn.Module):
    """Class 0's logit is 5 x the mean input over the square [8:16, 8:16]; class 1's is minus that."""

    def forward(self, x):
        s = 5 * x[:, :, 8:16, 8:16].mean((1, 2, 3))
        return torch.stack([s, -s], 1)


def test_oracle_map_beats_random_regions_on_a_region_model():
    # Hiding the region an oracle map names must matter more than hiding the same
    # shape at random places (comprehensiveness above chance)
    from saliencykit import Subject

    subject = Subject(RegionModel(), labels=["inside", "outside"], input_size=(32, 32), name="region")
    x = subject.normalize_pixels(torch.full((1, 3, 32, 32), 0.9))
    oracle = _box_map((32, 32), [(8, 8, 16, 16)])
    v = verbalize(subject, x, _exp(oracle), target=0, baseline="black", smooth=0.0, random_regions=16, seed=1)
    r = v.facts["regions"][0]
    assert r["evidence"] == pytest.approx(1.0) and r["area"] == pytest.approx(64 / 1024)
    drop = v.facts["prob"] - r["removed"]
    random_drop = v.facts["prob"] - v.facts["random"]["removed_mean"]
    assert drop > 0.9 and random_drop < 0.5 * drop
    assert "For comparison" in v.text
    # seeded: same seed, same placements; another seed, other placements
    again = verbalize(subject, x, _exp(oracle), target=0, baseline="black", smooth=0.0, random_regions=16, seed=1)
    other = verbalize(subject, x, _exp(oracle), target=0, baseline="black", smooth=0.0, random_regions=16, seed=2)
    assert again.facts["random"] == v.facts["random"] and other.facts["random"]["shifts"] != v.facts["random"]["shifts"]


def test_specks_do_not_hide_a_weaker_region(tiny, tiny_x):
    # a 2-pixel spike at 10 and a 10x10 plateau at 2: at 0.5 and 0.25 of the maximum only the spike
    # passes (too small to be a region); at 0.125 (1.25) the plateau is found
    smap = _box_map((32, 32), [(20, 20, 30, 30)], values=[2.0])
    smap[3, 3:5] = 10.0
    v = verbalize(tiny, tiny_x[:1], _exp(smap), smooth=0.0)
    assert v.facts["threshold_used"] == pytest.approx(0.125)
    r = v.facts["regions"][0]
    assert r["area"] == pytest.approx(100 / 1024) and r["evidence"] == pytest.approx(200 / 220)
    specks = torch.zeros(32, 32)
    specks[3, 3:5] = 1.0
    w = verbalize(tiny, tiny_x[:1], _exp(specks), smooth=0.0)
    assert w.facts["regions"] == [] and "scattered specks" in w.text


# ------------------------------------------------------------------- search over region candidates
def test_search_finds_the_known_cells_and_respects_its_rules():
    # a 7x7 cell grid on 28x28 (4x4-pixel cells): evidence only in cells (1,1) and (1,3) (a
    # non-contiguous pair) plus a weaker cell (5,5). By the definition: the best candidate is the
    # pattern {(1,1),(1,3)} (value 2; the 3x3 window over both has value 2 too but more cells, and
    # ties go to the smaller set); next, windows holding (1,3) add nothing new (their value counts
    # only cells not yet described), so the weak cell comes second; nothing else carries evidence
    from saliencykit.present.verbalize import searched_regions

    ev = np.zeros((28, 28))
    ev[4:8, 4:8] = 1.0
    ev[4:8, 12:16] = 1.0
    ev[20:24, 20:24] = 0.5
    found = searched_regions(ev, cells=7, k=3)
    assert sorted(map(tuple, found[0]["cells"])) == [(1, 1), (1, 3)] and found[0]["kind"] == "pattern"
    assert found[0]["value"] == pytest.approx(2.0) and found[0]["coverage"] == pytest.approx(16 / 20)
    assert found[0]["mask"].sum() == 32 and found[0]["mask"][4:8, 4:8].all()
    assert [tuple(c) for c in found[1]["cells"]] == [(5, 5)] and found[1]["coverage"] == pytest.approx(4 / 20)
    assert len(found) == 2
    for i, a in enumerate(found):  # the overlap rule: cell-set IoU <= 0.3 between any two taken
        for b in found[i + 1:]:
            sa, sb = set(map(tuple, a["cells"])), set(map(tuple, b["cells"]))
            assert len(sa & sb) / len(sa | sb) <= 0.3
    # the salience threshold: value >= tau * mean(cell score) * size for every region returned
    cell = ev.reshape(7, 4, 7, 4).sum((1, 3))
    a = cell / cell.max()
    for r in found:
        assert r["value"] >= 0.4 * a.mean() * len(r["cells"]) - 1e-12
    assert searched_regions(np.zeros((28, 28))) == []


def test_verbalize_with_searched_regions(tiny, tiny_x):
    # the "search" mode feeds the same measured sentences: a blob in the upper left is found there,
    # its cells are facts, and the hide/keep numbers are the model's outputs (checked elsewhere for
    # the components mode; here that the region's mask is what was hidden: its area matches)
    smap = _box_map((32, 32), [(4, 4, 12, 12)])
    v = verbalize(tiny, tiny_x[:1], _exp(smap), regions="search", search_cells=8)
    r = v.facts["regions"][0]
    assert r["words"] == "upper left" and "upper left of the image" in v.text
    # the 8x8 blob covers exactly cells (1,1),(1,2),(2,1),(2,2) of the 8x8-cell grid (4 px cells):
    # the smallest candidate with all the evidence is that 2x2 window
    assert v.facts["search"][0]["cells"] == [[1, 1], [1, 2], [2, 1], [2, 2]]
    assert v.facts["search"][0]["coverage"] == pytest.approx(1.0)
    assert r["evidence"] == pytest.approx(1.0)
    same = verbalize(tiny, tiny_x[:1], _exp(smap), regions="search", search_cells=8)
    assert same.text == v.text
    with pytest.raises(SaliencyError, match="search_cells"):
        verbalize(tiny, tiny_x[:1], _exp(smap), regions="search", search_cells=2)


def test_warnings_end_the_words_with_cited_numbers(lite0):
    # astronaut's top answer has 14 % and IG at 2 steps misses completeness: the words end with
    # both notes, and their numbers are cited facts like every other number in the text
    from saliencykit import data

    x = lite0.preprocess(data.image("astronaut"))
    ig = explain(lite0, x, "integrated_gradients", steps=2)
    assert {w["code"] for w in ig.warnings} == {"completeness", "unsure"}
    v = verbalize(lite0, x, ig)
    notes = [s for s in v.sentences if s["text"].startswith("Note:")]
    assert len(notes) == 2 and "more integration steps" in v.text and "the model is unsure (14%" in v.text
    for sent in notes:
        assert _numbers(sent["text"]) == [n["shown"] for n in sent["numbers"]]
        assert all(_shown_agrees(n["shown"], v.fact(n["key"])) for n in sent["numbers"])
