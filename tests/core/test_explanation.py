"""Explanation: metadata, save/load round trip, overlays, random baseline."""
import json

import numpy as np
import pytest
import torch

import saliencykit as sk
from saliencykit import Explanation, SaliencyError


def test_metadata_and_round_trip(tiny, tmp_path):
    x = torch.randn(2, 3, 32, 32)
    exp = sk.explain(tiny, x, method="integrated_gradients", target=sk.Contrast("c1", vs="c2"), steps=8)
    assert exp.maps.shape == (2, 32, 32) and exp.maps.dtype == torch.float32
    assert exp.signed and exp.attributions.shape == (2, 3, 32, 32)
    assert exp.target[0]["indices"] == [1] and exp.target[0]["vs_indices"] == [2]
    assert exp.passes["backward"] == 8 and exp.passes["forward"] >= 8
    assert exp.params["steps"] == 8 and "torch" in exp.versions
    path = exp.save(tmp_path / "ig")
    back = Explanation.load(path)
    assert torch.equal(back.maps, exp.maps) and torch.equal(back.attributions, exp.attributions)
    assert back.metadata() == exp.metadata()
    assert json.loads((path / "explanation.json").read_text())["method"] == "integrated_gradients"


def test_cam_round_trip_keeps_raw(tiny, tmp_path):
    exp = sk.explain(tiny, torch.randn(1, 3, 32, 32), method="gradcam")
    back = Explanation.load(exp.save(tmp_path / "g"))
    assert torch.equal(back.raw, exp.raw) and back.layer == "act2"


def test_load_errors(tmp_path):
    with pytest.raises(SaliencyError, match="not a saved explanation"):
        Explanation.load(tmp_path)


def test_overlay_and_signed_display(tiny, chelsea):
    exp = sk.explain(tiny, torch.randn(1, 3, 32, 32), method="gradxinput")
    assert exp.signed and (exp.maps < 0).any() and (exp.maps > 0).any()  # signed maps stay signed
    norm = exp.normalized()
    assert norm.min() >= -1 and norm.max() <= 1 and norm.abs().max() == 1
    img = exp.overlay(chelsea, alpha=0.4)
    assert img.size == chelsea.size and img.mode == "RGB"
    with pytest.raises(SaliencyError, match="alpha"):
        exp.overlay(chelsea, alpha=2)


def test_constant_map_normalises_to_zeros():
    exp = Explanation(maps=torch.ones(1, 4, 4), method="x")
    assert torch.equal(exp.normalized(), torch.zeros(1, 4, 4))


def test_random_like_is_seeded(tiny):
    exp = sk.explain(tiny, torch.randn(2, 3, 32, 32), method="gradcam")
    a, b = Explanation.random_like(exp, seed=3), Explanation.random_like(exp, seed=3)
    assert torch.equal(a.maps, b.maps) and a.maps.shape == exp.maps.shape
    assert not torch.equal(a.maps, Explanation.random_like(exp, seed=4).maps)


def test_indexing_a_batch(tiny):
    exp = sk.explain(tiny, torch.randn(3, 3, 32, 32), method="gradcam")
    one = exp[1]
    assert len(one) == 1 and torch.equal(one.maps[0], exp.maps[1])


# ------------------------------------------------------------------------------------- warnings
def test_completeness_warning_names_the_remedy():
    # above 5 % relative completeness error a path method's map is flagged, with "more steps" and a
    # concrete count; 5 % itself and below are not (the limit is a strict >)
    from saliencykit.explanation import COMPLETENESS_LIMIT, map_warnings

    maps = torch.zeros(3, 4, 4)
    ws = map_warnings(True, maps, [{"kind": "class"}] * 3, {"steps": 50},
                      {"relative_completeness_error": [0.22, COMPLETENESS_LIMIT, 0.01]})
    assert [(w["code"], w["example"]) for w in ws] == [("completeness", 0)]
    assert "22 %" in ws[0]["message"] and "more steps (now 50; try 200)" in ws[0]["message"]
    assert ws[0]["short"].startswith("completeness error 22 %")


def test_one_signed_contrast_map_is_flagged():
    # a signed contrast map of one sign everywhere says so; a mixed-sign map, an unsigned map, a
    # constant map and a non-contrast target do not
    from saliencykit.explanation import map_warnings

    contrast = {"kind": "contrast", "name": "tabby vs Egyptian cat", "vs_name": "Egyptian cat"}
    neg = -torch.rand(1, 4, 4) - 0.1
    ws = map_warnings(True, neg, [contrast], {}, {})
    assert [w["code"] for w in ws] == ["one_signed"] and "negative everywhere" in ws[0]["message"]
    assert "tabby over Egyptian cat" in ws[0]["message"]
    assert "positive everywhere" in map_warnings(True, -neg, [contrast], {}, {})[0]["message"]
    assert map_warnings(True, torch.tensor([[[-1.0, 1.0], [0.0, 0.0]]]), [contrast], {}, {}) == []
    assert map_warnings(False, neg, [contrast], {}, {}) == []
    assert map_warnings(True, torch.zeros(1, 4, 4), [contrast], {}, {}) == []
    assert map_warnings(True, neg, [{"kind": "class"}], {}, {}) == []


def test_unsure_prediction_is_flagged():
    from saliencykit.explanation import UNSURE_BELOW, map_warnings

    ws = map_warnings(False, torch.zeros(2, 2, 2), [{}, {}], {}, {}, top=[("barbell", 0.14), ("cat", UNSURE_BELOW)])
    assert [(w["code"], w["example"]) for w in ws] == [("unsure", 0)]
    assert ws[0]["message"].startswith("the model is unsure: 14 %")


def test_explain_attaches_warnings_per_example(tiny):
    # IG with 1 step on a ReLU net misses completeness; the warnings sit in extras["warnings"],
    # per example, and an example taken from the batch keeps only its own
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    exp = sk.explain(tiny, x, method="integrated_gradients", steps=1)
    rel = exp.extras["relative_completeness_error"]
    flagged = sorted(w["example"] for w in exp.warnings if w["code"] == "completeness")
    assert flagged == [i for i, r in enumerate(rel) if r > 0.05] and flagged
    i = flagged[-1]
    assert [w["example"] for w in exp[i].warnings if w["code"] == "completeness"] == [0]
    back = sk.explain(tiny, x, method="gradcam")
    assert all(w["code"] == "unsure" for w in back.warnings)  # a CAM has no completeness to miss


def test_rise_target_output_matches_its_params(tiny):
    # RISE scores probabilities: its target description must say so, not the Class default "logit"
    exp = sk.explain(tiny, torch.randn(1, 3, 32, 32), method="rise", n_masks=16)
    assert exp.params["output"] == "prob" and exp.target[0]["output"] == "prob"
    assert sk.explain(tiny, torch.randn(1, 3, 32, 32), method="saliency").target[0]["output"] == "logit"


def test_transparency_note(tmp_path, chelsea):
    from PIL import Image

    from saliencykit.images import transparency_note

    rgba = chelsea.convert("RGBA")
    assert transparency_note(rgba) is None  # alpha present but opaque everywhere
    rgba.putpixel((0, 0), (0, 0, 0, 10))
    assert "composited on white" in transparency_note(rgba)
    rgba.save(tmp_path / "a.png")
    assert transparency_note(tmp_path / "a.png") is not None
    assert transparency_note(chelsea) is None and transparency_note(np.asarray(chelsea)) is None
    arr = np.zeros((4, 4, 4), np.uint8)
    assert transparency_note(arr) is not None
    assert transparency_note(Image.new("L", (4, 4))) is None
