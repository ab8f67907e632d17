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
