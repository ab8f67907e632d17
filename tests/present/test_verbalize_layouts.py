"""sk.verbalize on series, volumes and feature vectors: planted maps give the expected stretch,
slice / position and feature sentences; the hide / keep numbers are the model's outputs on
exactly those masked inputs; every number shown is a cited fact."""
import re

import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import Explanation, SaliencyError
from saliencykit.present.verbalize import verbalize


class Window(nn.Module):
    """Logits [s, -s] with s = the sum of x over the window `sl` of the last axes (all channels):
    only the planted positions matter."""

    def __init__(self, sl):
        super().__init__()
        self.sl = sl

    def forward(self, x):
        s = x[(slice(None), slice(None)) + self.sl].flatten(1).sum(1)
        return torch.stack([s, -s], 1)


def _series_case():
    subject = sk.Subject(Window((slice(20, 30),)), labels=["up", "down"], layout="BCT", input_size=(100,))
    x = torch.zeros(1, 2, 100)
    x[:, :, 20:30] = 0.2                           # s = 4: p(up) = sigmoid(8) ~ 1
    return subject, x


def _cited_numbers_agree(v):
    # every sentence's shown numbers are its cited facts (the same check as the photo words)
    for sent in v.sentences:
        for num in sent["numbers"]:
            assert num["shown"] in sent["text"]
            assert v.fact(num["key"]) == num["value"]


def test_a_planted_stretch_is_told_by_its_steps_and_measured():
    subject, x = _series_case()
    m = torch.zeros(1, 100)
    m[0, 20:30] = 1.0
    v = verbalize(subject, x, Explanation(maps=m, method="occlusion", signed=False, layout="BCT"),
                  baseline="zero", smooth=0.0)
    assert "steps 20-29" in v.text and "10% of the series" in v.text and "100% of the positive evidence" in v.text
    reg = v.facts["regions"][0]
    assert reg["steps"] == [20, 29] and reg["runs"] == 1
    # hiding the steps onto zeros: s = 0, p(up) = 0.5 exactly; keeping only them: the clean input
    assert reg["removed"] == pytest.approx(0.5, abs=1e-6)
    assert reg["kept"] == pytest.approx(float(torch.sigmoid(torch.tensor(8.0))), abs=1e-6)
    _cited_numbers_agree(v)


def test_two_stretches_and_evidence_against_in_a_signed_map():
    subject, x = _series_case()
    m = torch.zeros(1, 100)
    m[0, 20:30] = 1.0
    m[0, 60:65] = 0.6
    m[0, 80:90] = -1.0
    v = verbalize(subject, x, Explanation(maps=m, method="saliency", signed=True, layout="BCT"),
                  baseline="zero", smooth=0.0)
    assert "two separate stretches of evidence" in v.text
    assert "strongest lies in steps 20-29" in v.text
    assert "A second, weaker stretch lies in steps 60-64" in v.text
    assert "Evidence against *up* is strongest in steps 80-89 (100% of the negative evidence)" in v.text
    # the second stretch's measured hide: the model ignores steps 60-64, so it leaves p(up) as it was
    assert v.facts["regions"][1]["removed"] == pytest.approx(v.facts["prob"], abs=1e-6)
    _cited_numbers_agree(v)


def test_series_blur_baseline_is_the_default_and_said():
    subject, x = _series_case()
    m = torch.zeros(1, 100)
    m[0, 20:30] = 1.0
    v = verbalize(subject, x, Explanation(maps=m, method="occlusion", signed=False, layout="BCT"))
    assert v.facts["baseline"] == "blur" and "blurred copy of the series" in v.text


def test_a_planted_region_of_a_volume_is_told_by_its_slices_and_place():
    # evidence in slices 1-2, rows 0-2, columns 6-8 of a 4x9x9 volume: upper right, slices 1-2 of 4
    subject = sk.Subject(Window((slice(1, 3), slice(0, 3), slice(6, 9))), labels=["up", "down"], layout="BCDHW",
                         input_size=(4, 9, 9))
    x = torch.full((1, 1, 4, 9, 9), 0.1)
    m = torch.zeros(1, 4, 9, 9)
    m[0, 1:3, 0:3, 6:9] = 1.0
    v = verbalize(subject, x, Explanation(maps=m, method="gradcam", signed=False, layout="BCDHW"),
                  baseline="zero", smooth=0.0)
    reg = v.facts["regions"][0]
    assert "in the upper right of slices 1-2 of 4" in v.text
    assert reg["grid_cell"] == [1, 0, 2] and reg["slices"] == [1, 2]
    assert reg["removed"] == pytest.approx(0.5, abs=1e-6)          # the whole window set to zero: s = 0
    _cited_numbers_agree(v)


def test_the_features_of_most_evidence_are_named_with_their_signed_values():
    subject = sk.Subject(nn.Sequential(nn.Linear(5, 2)), labels=["a", "b"], layout="BF")
    x = torch.randn(1, 5)
    m = torch.tensor([[0.05, 0.41, -0.22, 0.0, 0.10]])
    v = verbalize(subject, x, Explanation(maps=m, method="gradxinput", signed=True, layout="BF"),
                  feature_names=["age", "bmi", "bp", "s1", "s2"], random_regions=4)
    assert "the three features that carry most of the evidence" in v.text
    assert "bmi (+0.41), bp (-0.22) and s2 (+0.10)" in v.text
    assert "bp speaks against" in v.text
    assert v.facts["baseline"] == "zero" and "setting them to zero" in v.text
    # the hide number is the model on x with those three features zeroed
    with torch.no_grad():
        xz = x.clone()
        xz[0, [1, 2, 4]] = 0
        p = subject.model(xz).softmax(1)[0, v.facts["target"]["indices"][0]]
    assert v.facts["features"]["removed"] == pytest.approx(float(p), abs=1e-6)
    _cited_numbers_agree(v)
    # no names: indices
    v2 = verbalize(subject, x, Explanation(maps=m, method="gradxinput", signed=True, layout="BF"), random_regions=0)
    assert "f1 (+0.41), f2 (-0.22) and f4 (+0.10)" in v2.text


def test_subject_feature_names_are_read_by_verbalize_and_checked_at_explain_time():
    names = ["age", "bmi", "bp", "s1", "s2"]
    subject = sk.Subject(nn.Sequential(nn.Linear(5, 2)), labels=["a", "b"], layout="BF", feature_names=names)
    x = torch.randn(1, 5)
    m = torch.tensor([[0.05, 0.41, -0.22, 0.0, 0.10]])
    # the subject's names stand where feature_names= would (the same words as the test above)
    v = verbalize(subject, x, Explanation(maps=m, method="gradxinput", signed=True, layout="BF"), random_regions=0)
    assert subject.feature_names == names and "bmi (+0.41), bp (-0.22) and s2 (+0.10)" in v.text
    assert sk.explain(subject, x, "saliency").maps.shape == (1, 5)
    with pytest.raises(SaliencyError, match="5 feature_names but the input is \\(1, 4\\)"):
        sk.explain(sk.Subject(nn.Linear(4, 2), layout="BF", feature_names=names), torch.randn(1, 4), "saliency")
    with pytest.raises(SaliencyError, match="feature_names must be a list of names for a layout='BF'"):
        sk.Subject(nn.Linear(5, 2), layout="BCT", feature_names=names)
    with pytest.raises(SaliencyError, match="feature_names must be a list"):
        sk.Subject(nn.Linear(5, 2), layout="BF", feature_names="age")


def test_layout_words_refuse_what_they_cannot_do():
    subject, x = _series_case()
    m = Explanation(maps=torch.rand(1, 100), method="occlusion", signed=False, layout="BCT")
    with pytest.raises(SaliencyError, match="regions='search' and parts= describe photos"):
        verbalize(subject, x, m, regions="search")
    with pytest.raises(SaliencyError, match="needs a map"):
        verbalize(subject, x, torch.rand(1, 50))
    flat = sk.Subject(nn.Linear(5, 2), labels=["a", "b"], layout="BF")
    with pytest.raises(SaliencyError, match="no neighbouring positions to blur"):
        verbalize(flat, torch.randn(1, 5), Explanation(maps=torch.rand(1, 5), method="m", signed=False, layout="BF"),
                  baseline="blur")
    with pytest.raises(SaliencyError, match="3 feature names for 5 features"):
        verbalize(flat, torch.randn(1, 5), Explanation(maps=torch.rand(1, 5), method="m", signed=False, layout="BF"),
                  feature_names=["a", "b", "c"])


def test_words_on_the_series_cnn_point_at_the_planted_motif():
    # the shipped series CNN and occlusion: the main stretch overlaps the planted motif, and hiding it
    # lowers the class probability more than hiding a stretch of the same length at random places
    from saliencykit.benchmarks.series import dataset as S

    subject = sk.load_model("series_cnn")
    data = S.generate(4, seed=11)
    x = S.to_tensor(data.series)
    e = sk.explain(subject, x, "occlusion", target=data.labels.tolist(), patch=10, stride=5)
    for i in range(4):
        v = verbalize(subject, x, e, index=i)
        lo, hi = v.facts["regions"][0]["steps"]
        motif = set(map(int, data.masks[i].nonzero()[0]))
        assert motif & set(range(lo, hi + 1)), (i, lo, hi)
        assert v.facts["regions"][0]["removed"] < v.facts["random"]["removed_mean"]
        assert re.search(r"steps \d+-\d+", v.text)


def test_compare_on_a_series_and_clips_have_no_words_yet():
    # a second map: its share of positive evidence inside the main stretch (0.5 here: half its mass in
    # steps 20-29) and the rank correlation of the two maps' positive evidence over the steps
    subject, x = _series_case()
    m = torch.zeros(1, 100)
    m[0, 20:30] = 1.0
    other = torch.zeros(1, 100)
    other[0, 20:30] = 1.0
    other[0, 50:60] = 1.0
    v = verbalize(subject, x, Explanation(maps=m, method="occlusion", signed=False, layout="BCT"), baseline="zero",
                  smooth=0.0, compare=[Explanation(maps=other, method="saliency", signed=False, layout="BCT")],
                  random_regions=0)
    c = v.facts["compare"][0]
    assert c["evidence_in_main_region"] == pytest.approx(0.5)
    assert "Gradient saliency puts 50% of its positive evidence in that same main stretch" in v.text
    clip = sk.Subject(nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 4 * 4, 2)), labels=["a", "b"], layout="BTCHW",
                      input_size=(4, 4), mean=(0, 0, 0), std=(1, 1, 1))
    with pytest.raises(SaliencyError, match="a BTCHW input has no words yet"):
        verbalize(clip, torch.randn(1, 2, 3, 4, 4), Explanation(maps=torch.rand(1, 2, 4, 4), method="m", signed=False,
                                                                  layout="BTCHW"))


def test_the_channel_that_carries_the_motif_is_named():
    # integrated gradients keeps per-channel attributions [B,C,T]: inside the main stretch the channel
    # with most |attribution| is the one the motif was planted on (the benchmark knows it)
    from saliencykit.benchmarks.series import dataset as S

    subject = sk.load_model("series_cnn")
    data = S.generate(4, seed=11)
    x = S.to_tensor(data.series)
    e = sk.explain(subject, x, "integrated_gradients", target=data.labels.tolist(), steps=16)
    for i in range(4):
        v = verbalize(subject, x, e, index=i, random_regions=0)
        reg = v.facts["regions"][0]
        assert reg["channel"] == int(data.channels[i]), i
        assert f"channel {reg['channel']} carries" in v.text
        assert sum(reg["channels"]) == pytest.approx(1.0)


def test_a_series_map_that_misses_completeness_says_so_with_a_cited_number():
    # the photo words and the layout words end with the same notes (one helper, words._warning_notes):
    # IG at 2 steps on the series CNN misses completeness, and the note cites the warning's value
    from saliencykit.benchmarks.series import dataset as S

    subject = sk.load_model("series_cnn")
    x = S.to_tensor(S.generate(1, seed=11).series)
    e = sk.explain(subject, x, "integrated_gradients", steps=2)
    assert [w["code"] for w in e.warnings] == ["completeness"]
    v = verbalize(subject, x, e)
    notes = [s for s in v.sentences if s["text"].startswith("Note:")]
    assert len(notes) == 1 and "more integration steps" in notes[0]["text"]
    assert [n["key"] for n in notes[0]["numbers"]] == ["warnings.0.value"]
    _cited_numbers_agree(v)
