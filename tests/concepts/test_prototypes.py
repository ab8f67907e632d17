"""Post-hoc prototypes: a query that is one of the references finds itself, at its own cells,
with cosine similarity 1; the regions are the top cells of the Grad-CAM map; shapes, boxes,
determinism, passes, the picture and the errors for a reference set made another way."""
import pytest
import torch

import saliencykit as sk
from saliencykit import SaliencyError
from saliencykit.concepts.prototypes import context_box
from state import assert_same_state


@pytest.fixture
def refs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(6, 3, 32, 32, generator=g)


def test_query_among_references_finds_itself(tiny, refs):
    before = tiny.state_fingerprint()
    res = sk.concepts.prototypes(tiny, refs[4:5], refs, layer="act2", k=3, n_regions=3)
    assert_same_state(before, tiny.state_fingerprint())
    assert res.similarity.shape == res.indices.shape == (3, 3) and res.boxes.shape == (3, 3, 4)
    assert res.grid == (16, 16)
    # the query's own features are among the references: for each region, image 4 at that very
    # cell has cosine 1 (float64 cosine of identical vectors; 1e-6 covers float32 features)
    for n, cell in enumerate(res.regions):
        assert int(res.indices[n, 0]) == 4 and res.cells[n][0] == cell
        assert float(res.similarity[n, 0]) == pytest.approx(1.0, abs=1e-6)
        assert (res.similarity[n, 1:] < 1 - 1e-4).all()                   # the others are other images
        assert (res.similarity[n, :-1] >= res.similarity[n, 1:]).all()    # best first
    # the regions are the top cells of the Grad-CAM map at that layer, most relevant first
    cam = sk.explain(tiny, refs[4:5], "gradcam", layer="act2").raw[0]
    top = torch.argsort(cam.flatten(), descending=True, stable=True)[:3].tolist()
    assert res.regions == [(i // 16, i % 16) for i in top]
    again = sk.concepts.prototypes(tiny, refs[4:5], refs, layer="act2", k=3, n_regions=3)
    assert torch.equal(again.similarity, res.similarity) and torch.equal(again.indices, res.indices)
    assert res.passes["forward"] >= 1 + 6 and res.passes["backward"] >= 1
    assert len(res.describe()) == 3 and "looks like reference 4" in res.describe()[0]


def test_picture_and_boxes(tiny, refs):
    res = sk.concepts.prototypes(tiny, refs[:1], refs[1:], layer="act2", k=2, n_regions=2)
    img = res.image(patch=64)
    assert img.width >= 224 and img.height > 224 + 2 * 64
    # a 2x2-pixel cell of the 16x16 grid on 32 px, widened twice about its centre, kept inside
    assert context_box((0, 0), (16, 16), (32, 32), 2.0) == (0.0, 0.0, 4.0, 4.0)
    assert context_box((5, 7), (16, 16), (32, 32), 2.0) == (13.0, 9.0, 17.0, 13.0)
    assert context_box((15, 15), (16, 16), (32, 32), 2.0) == (28.0, 28.0, 32.0, 32.0)


def test_reference_made_another_way(tiny, refs):
    with pytest.raises(SaliencyError, match="empty"):
        sk.concepts.prototypes(tiny, refs[:1], refs[:0], layer="act2")
    with pytest.raises(SaliencyError, match="one input size"):
        sk.concepts.prototypes(tiny, refs[:1], torch.randn(2, 3, 48, 48), layer="act2")
    with pytest.raises(SaliencyError, match="normalised range"):
        sk.concepts.prototypes(tiny, refs[:1], (refs * 0.5 + 0.5).clamp(0, 1) * 255, layer="act2")
    with pytest.raises(SaliencyError, match="one image"):
        sk.concepts.prototypes(tiny, refs[:2], refs, layer="act2")
