"""Every kind of bad input gets a clear error naming the problem."""
import pytest
import torch

import saliencykit as sk
from saliencykit import SaliencyError


@pytest.mark.parametrize("x,msg", [
    (torch.randn(3, 32, 32), "4 dimensions"),
    (torch.randn(1, 1, 32, 32), "1 channels; the model expects 3"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.int64), "floating-point"),
    (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
    (torch.zeros(0, 3, 32, 32), "empty"),
])
def test_bad_tensors(tiny, x, msg):
    with pytest.raises(SaliencyError, match=msg):
        sk.explain(tiny, x, method="gradcam")


def test_not_a_tensor(tiny):
    with pytest.raises(SaliencyError, match="torch.Tensor"):
        sk.explain(tiny, [[1.0]], method="gradcam")


def test_unknown_method_lists_available(tiny):
    with pytest.raises(SaliencyError, match=r"unknown method 'gradcamm'.*Did you mean gradcam.*Available:"):
        sk.explain(tiny, torch.randn(1, 3, 32, 32), method="gradcamm")


def test_unknown_parameter(tiny):
    with pytest.raises(SaliencyError, match="unknown parameter"):
        sk.explain(tiny, torch.randn(1, 3, 32, 32), method="gradcam", stepz=3)


def test_target_out_of_range_and_unknown_label(tiny):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(SaliencyError, match="out of range"):
        sk.explain(tiny, x, method="saliency", target=5)
    with pytest.raises(SaliencyError, match="unknown class label"):
        sk.explain(tiny, x, method="saliency", target="dog")


def test_layer_without_spatial_output(tiny):
    with pytest.raises(SaliencyError, match="spatial map"):
        sk.explain(tiny, torch.randn(1, 3, 32, 32), method="gradcam", layer="fc")


def test_unknown_photo_name():
    with pytest.raises(SaliencyError, match="unknown bundled photo"):
        sk.data.image("chelsae")
