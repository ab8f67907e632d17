"""`explain(..., amp=True)`: the model's passes under torch.autocast (bfloat16 on a CPU).

Compared: the amp maps against the float32 maps of the same call (relative L2 error per map),
and amp=False against the exact float32 gradient (bit for bit), so the switch cannot change
the default path."""
import pytest
import torch

import saliencykit as sk
from saliencykit import engine
from saliencykit.errors import SaliencyError


def _rel_l2(a, b):
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()


@pytest.mark.parametrize("method", ["saliency", "gradcam", "integrated_gradients"])
def test_amp_maps_are_close_to_float32(tiny, tiny_x, method):
    ref = sk.explain(tiny, tiny_x, method)
    amp = sk.explain(tiny, tiny_x, method, amp=True)
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2 % per operation); through the
    # tiny CNN's two convolutions and their backward the measured error is 0.4 % (Grad-CAM) to 3 %
    # (saliency, an absolute value of single gradients); 6 % leaves room for other CPUs' kernels
    # while a map computed wrongly (another class, a sign, no autocast widening) is far above it
    assert _rel_l2(amp.maps, ref.maps) < 0.06
    assert amp.maps.dtype == torch.float32
    assert amp.extras["amp"] == "bfloat16"
    assert "amp" not in ref.extras
    if amp.attributions is not None:
        assert amp.attributions.dtype == torch.float32


def test_amp_really_runs_in_reduced_precision(tiny, tiny_x):
    # the test above could pass with amp ignored; the maps must differ from float32 somewhere
    ref = sk.explain(tiny, tiny_x, "saliency")
    amp = sk.explain(tiny, tiny_x, "saliency", amp=True)
    assert not torch.equal(ref.maps, amp.maps)


def test_amp_off_is_the_exact_float32_gradient(tiny, tiny_x):
    # saliency with max-abs over channels is |d score / d x| of the top-1 class, computed here by hand
    e = sk.explain(tiny, tiny_x, "saliency", amp=False)
    x = tiny_x.clone().requires_grad_(True)
    logits = tiny.model.eval()(x)
    top = logits.argmax(1)
    (g,) = torch.autograd.grad(logits.gather(1, top[:, None]).sum(), x)
    assert torch.equal(e.maps, g.abs().amax(1))
    assert torch.equal(e.maps, sk.explain(tiny, tiny_x, "saliency").maps)


def test_amp_leaves_no_autocast_behind(tiny, tiny_x):
    sk.explain(tiny, tiny_x, "gradcam", amp=True)
    assert not torch.is_autocast_enabled("cpu")
    assert tiny.forward(tiny_x).dtype == torch.float32


def test_amp_refuses_bad_values_and_devices(tiny, tiny_x):
    with pytest.raises(SaliencyError, match="amp must be True or False"):
        sk.explain(tiny, tiny_x, "saliency", amp="yes")
    with pytest.raises(SaliencyError, match="use amp=False"):
        engine.amp_dtype("meta")
    assert engine.amp_dtype("cpu") == torch.bfloat16 and engine.amp_dtype("cuda") == torch.float16


def test_cli_explain_amp_records_it(tmp_path):
    import json

    from saliencykit.cli import main

    out = tmp_path / "out"
    assert main(["explain", "chelsea", "--method", "gradcam", "--amp", "--out", str(out), "--quiet"]) == 0
    meta = json.loads((out / "summary.json").read_text())["photos"][0]["maps"]["gradcam"]
    assert meta["extras"]["amp"] == "bfloat16"
