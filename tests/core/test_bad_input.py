"""Bad and tricky input, as one table: each row is a case, the call, and what must happen.

What must happen is one of
- `Raises("text")`: a SaliencyError whose message contains the text (a regex) naming the problem;
- `Warns("text", check)`: the call works, warns with that text, and `check(result)` holds;
- `Holds(check)`: the call works and `check(result)` holds (an invariant, usually "equals the
  map of the plain, well-formed call").

Every call runs on the tiny CNN of conftest (`s`: its Subject, 32 px, 5 classes; `x`: a [2,3,32,32]
input) or on a model built in the row. Comparisons against the well-formed call are exact where the
same kernels run on the same numbers, and allclose at float32 rounding (1e-5 relative to the
map's scale) where a cast or another memory layout reorders the arithmetic.
"""
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import SaliencyError
from saliencykit.explanation import Explanation
from saliencykit.methods.perturbation import grid_segments
from saliencykit.targets import Contrast

from conftest import TinyCNN


@dataclass
class Raises:
    text: str


@dataclass
class Warns:
    text: str
    check: Callable = lambda _r: True


@dataclass
class Holds:
    check: Callable


def tiny():
    torch.manual_seed(0)
    return sk.Subject(TinyCNN(), labels=[f"c{i}" for i in range(5)], input_size=(32, 32), name="tiny")


def tiny_model(**kw):
    torch.manual_seed(0)
    return TinyCNN(**kw)


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def reference(method="saliency", **kw):
    return sk.explain(tiny(), X, method, **kw).maps


def same(method="saliency", tol=0.0, **kw):
    """Check: the result's maps equal the well-formed call's (exactly, or within tol x max|map|)."""
    def check(result):
        ref = reference(method, **kw)
        if tol == 0:
            return torch.equal(result.maps, ref)
        return torch.allclose(result.maps, ref, rtol=0, atol=tol * float(ref.abs().max()))
    return check


def wrapped(forward):
    """TinyCNN whose output is `forward(logits, x)`."""
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_model()

        def forward(self, inp):
            return forward(self.net(inp), inp)

    return sk.Subject(Wrapped(), input_size=(32, 32), name="wrapped")


def nan_row(logits, _x):
    out = logits.clone()
    out[-1, 3] = float("nan")  # the last row (row 1 of the table's batch of 2)
    return out


def slow_forward(logits, _x):
    import time

    time.sleep(0.25)  # the clean forward (which also fixes the target) is the only forward saliency makes
    return logits


def saved(tmp, content=None):
    """A saved explanation folder, then damaged by `content(folder)`."""
    folder = tmp / "exp"
    sk.explain(tiny(), X, "saliency").save(folder)
    if content is not None:
        content(folder)
    return folder


def write(folder, name, data):
    (folder / name).write_bytes(data) if isinstance(data, bytes) else (folder / name).write_text(data)


def pickled_npz(folder):
    np.savez(folder / "maps.npz", maps=np.array([{"a": 1}], dtype=object))


def other_files(folder):
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    return folder


def scripted():
    return sk.Subject(torch.jit.script(tiny_model()), input_size=(32, 32), name="scripted")


def frozen_params():
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    return sk.Subject(model, input_size=(32, 32), name="frozen")


def training_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5))
    model.train()
    return sk.Subject(model, input_size=(32, 32), name="bn")


def seed_repeats(result):
    again = sk.explain(tiny(), X, "smoothgrad", samples=3, seed=result.seed)
    return isinstance(result.seed, int) and torch.equal(again.maps, result.maps)


def empty_mask_pointing(_s, _x):
    s = tiny()
    e = sk.explain(s, X, "saliency")
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :8, :8] = True
    return sk.evaluate(s, X, e, metrics=["pointing_game"], masks=masks, random_baseline=False)


def in_inference_mode(method):
    def call(s, x):
        with torch.inference_mode():
            return sk.explain(s, x, method)
    return call


def made_in_inference_mode(s, x):
    with torch.inference_mode():
        xi = x.clone()
    return sk.explain(s, xi, "saliency")


def under_no_grad(s, x):
    with torch.no_grad():
        return sk.explain(s, x, "saliency")


def leaves_input_alone(s, x):
    xg = x.clone().requires_grad_(True)
    e = sk.explain(s, xg, "saliency")
    assert xg.grad is None
    return e


def compiled():
    return sk.Subject(torch.compile(tiny_model(), backend="eager"), input_size=(32, 32), name="compiled")


# ------------------------------------------------------------------------------------- the table
CASES = [
    # --- the input tensor
    ("3-D input", lambda s, x: sk.explain(s, x[0], "gradcam"), Raises("4 dimensions.*unsqueeze")),
    ("1-channel input", lambda s, x: sk.explain(s, x[:, :1], "gradcam"), Raises("1 channels; the model expects 3")),
    ("int64 input", lambda s, x: sk.explain(s, x.long(), "gradcam"), Raises("floating-point")),
    ("NaN input", lambda s, x: sk.explain(s, x * float("nan"), "gradcam"), Raises("NaN")),
    ("infinite input", lambda s, x: sk.explain(s, x / 0, "saliency"), Raises("NaN or infinite")),
    ("empty batch", lambda s, x: sk.explain(s, x[:0], "gradcam"), Raises("empty")),
    ("list input", lambda s, x: sk.explain(s, [[1.0]], "gradcam"), Raises("torch.Tensor")),
    ("numpy input", lambda s, x: sk.explain(s, x.numpy(), "saliency"), Raises("torch.Tensor.*preprocess")),
    ("meta-device input", lambda s, x: sk.explain(s, x.to("meta"), "saliency"), Raises("meta device")),
    ("meta-device model", lambda s, x: sk.explain(sk.Subject(tiny_model().to("meta")), x, "saliency"),
     Raises("weights are on the meta device")),
    ("float64 input, float32 model", lambda s, x: sk.explain(s, x.double(), "saliency"),
     Warns("float64 cast to the model's torch.float32", same())),
    ("float16 input, float32 model", lambda s, x: sk.explain(s, x.half(), "saliency"),
     Holds(lambda r: torch.equal(r.maps, sk.explain(tiny(), X.half().float(), "saliency").maps))),
    ("bfloat16 input, float32 model", lambda s, x: sk.explain(s, x.bfloat16(), "gradcam"),
     Holds(lambda r: torch.equal(r.maps, sk.explain(tiny(), X.bfloat16().float(), "gradcam").maps))),
    ("input made under inference_mode", made_in_inference_mode, Holds(same())),
    ("explain under inference_mode: saliency", in_inference_mode("saliency"), Holds(same())),
    ("explain under inference_mode: gradcam", in_inference_mode("gradcam"), Holds(same("gradcam"))),
    ("explain under no_grad", under_no_grad, Holds(same())),
    ("input that requires grad", leaves_input_alone, Holds(same())),
    ("non-contiguous input", lambda s, x: sk.explain(s, x.transpose(2, 3).contiguous().transpose(2, 3), "saliency"),
     Holds(same())),
    ("channels_last input", lambda s, x: sk.explain(s, x.contiguous(memory_format=torch.channels_last), "gradcam"),
     Holds(same("gradcam", tol=1e-5))),
    # --- naming the method
    ("unknown method", lambda s, x: sk.explain(s, x, "gradcamm"), Raises(r"unknown method 'gradcamm'.*Did you mean gradcam")),
    ("'Grad-CAM'", lambda s, x: sk.explain(s, x, "Grad-CAM"), Holds(lambda r: r.method == "gradcam")),
    ("'GradCAM'", lambda s, x: sk.explain(s, x, "GradCAM"), Holds(lambda r: r.method == "gradcam")),
    ("'grad_cam'", lambda s, x: sk.explain(s, x, "grad_cam"), Holds(same("gradcam"))),
    ("'IG'", lambda s, x: sk.explain(s, x, "IG", steps=4), Holds(lambda r: r.method == "integrated_gradients")),
    ("'Grad-CAM++'", lambda s, x: sk.explain(s, x, "Grad-CAM++"), Holds(lambda r: r.method == "gradcam_pp")),
    ("list of spellings: canonical keys", lambda s, x: sk.explain(s, x, ["Grad-CAM", "IG"], steps=4),
     Holds(lambda r: set(r) == {"gradcam", "integrated_gradients"})),
    ("'Grad-CAM' for a detector", lambda s, x: sk.methods.get("Grad-CAM", "detector"),
     Holds(lambda cls: cls.__name__ == "DetectorGradCAM")),
    ("a classifier-only method for a detector", lambda s, x: sk.methods.get("Integrated-Gradients", "detector"),
     Raises("cannot explain a detector")),
    ("same method twice", lambda s, x: sk.explain(s, x, ["saliency", "Saliency"]), Raises("asked for more than once")),
    ("no method", lambda s, x: sk.explain(s, x, []), Raises("no method given")),
    ("method not a name", lambda s, x: sk.explain(s, x, 5), Raises("must be given by name")),
    ("unknown parameter", lambda s, x: sk.explain(s, x, "gradcam", stepz=3), Raises("unknown parameter")),
    ("unknown per-method parameter", lambda s, x: sk.explain(s, x, "saliency", params={"saliency": {"steps": 3}}),
     Raises(r"unknown parameter\(s\) \['steps'\] for saliency")),
    # --- the target
    ("class index out of range", lambda s, x: sk.explain(s, x, "saliency", target=5), Raises("out of range")),
    ("negative class index", lambda s, x: sk.explain(s, x, "saliency", target=-1), Raises("out of range")),
    ("unknown class label", lambda s, x: sk.explain(s, x, "saliency", target="dog"), Raises("unknown class label")),
    ("target=True", lambda s, x: sk.explain(s, x, "saliency", target=True), Raises("boolean True")),
    ("target=np.bool_", lambda s, x: sk.explain(s, x, "saliency", target=np.bool_(False)), Raises("boolean False")),
    ("fractional class", lambda s, x: sk.explain(s, x, "saliency", target=1.5), Raises("an index or a label")),
    ("per-example targets, wrong length", lambda s, x: sk.explain(s, x, "saliency", target=[1, 2, 3]),
     Raises("3 targets given for a batch of 2")),
    ("contrast of a class with itself", lambda s, x: sk.explain(s, x, "saliency", target=Contrast(1, vs=1)),
     Raises("two different classes")),
    # --- batch size and seed
    ("batch_size=-1", lambda s, x: sk.explain(s, x, "saliency", batch_size=-1), Raises("batch_size must be an integer >= 1")),
    ("batch_size=0", lambda s, x: sk.explain(s, x, "saliency", batch_size=0), Raises("batch_size must be an integer >= 1")),
    ("batch_size=1.5", lambda s, x: sk.explain(s, x, "saliency", batch_size=1.5), Raises("batch_size")),
    ("batch_size=True", lambda s, x: sk.explain(s, x, "saliency", batch_size=True), Raises("batch_size")),
    ("batch_size=1 (one row per chunk)", lambda s, x: sk.explain(s, x, "gradcam", batch_size=1),
     Holds(same("gradcam", tol=1e-6))),
    ("seed=None draws a seed and records it", lambda s, x: sk.explain(s, x, "smoothgrad", samples=3, seed=None),
     Holds(seed_repeats)),
    ("seed=None twice: two seeds", lambda s, x: [sk.explain(s, x, "rise", n_masks=8, seed=None).seed for _ in range(2)],
     Holds(lambda seeds: seeds[0] != seeds[1])),
    ("negative seed", lambda s, x: sk.explain(s, x, "smoothgrad", seed=-3), Raises("seed must be an integer >= 0")),
    ("seed as text", lambda s, x: sk.explain(s, x, "smoothgrad", seed="1"), Raises("seed must be")),
    ("evaluate seed=None records it", lambda s, x: sk.evaluate(s, x, sk.explain(s, x, "saliency"), metrics=["sparseness"],
                                                               seed=None, random_baseline=False),
     Holds(lambda r: isinstance(r.seed, int))),
    # --- the layer
    ("unknown layer", lambda s, x: sk.explain(s, x, "gradcam", layer="nolayer"), Raises("layer 'nolayer' not found")),
    ("layer without spatial output", lambda s, x: sk.explain(s, x, "gradcam", layer="fc"), Raises("spatial map")),
    ("layer given as a number", lambda s, x: sk.explain(s, x, "gradcam", layer=3), Raises("layer must be a name")),
    ("layer='auto' says what it picked", lambda s, x: sk.explain(s, x, "gradcam"),
     Holds(lambda r: "'act2'" in r.extras["layer_choice"] and "32x32" in r.extras["layer_choice"])),
    ("layer='auto' moved by a tiny input", lambda s, x: sk.explain(s, x[:, :, :2, :2], "gradcam"),
     Warns("picked 'act1', not 'act2'", lambda r: r.layer == "act1" and "'act2'" in r.extras["layer_choice"])),
    # --- what the model returns
    ("one NaN logit", lambda s, x: sk.explain(wrapped(nan_row), x, "saliency"),
     Raises(r"not finite .* in 1 of 2 rows: row 1: 1 class\(es\) \(class 3\)")),
    ("all-NaN output", lambda s, x: sk.explain(wrapped(lambda o, _x: o * float("nan")), x, "gradcam"),
     Raises("in 2 of 2 rows")),
    ("infinite logit", lambda s, x: sk.explain(wrapped(lambda o, _x: o.clamp(max=1.0) / (o > 1e9)), x, "occlusion"),
     Raises("not finite")),
    ("NaN logit, explicit target", lambda s, x: sk.explain(wrapped(nan_row), x, "gradcam", target=0), Raises("not finite")),
    ("output: list [logits]", lambda s, x: sk.explain(wrapped(lambda o, _x: [o]), x, "gradcam"), Holds(same("gradcam"))),
    ("output: tuple (logits, extra)", lambda s, x: sk.explain(wrapped(lambda o, _x: (o, o.sum())), x, "saliency"),
     Holds(same())),
    ("output: dict with logits", lambda s, x: sk.explain(wrapped(lambda o, _x: {"logits": o}), x, "saliency"),
     Holds(same())),
    ("output: dict without logits", lambda s, x: sk.explain(wrapped(lambda o, _x: {"feat": o}), x, "saliency"),
     Raises("keys \\['feat'\\] and no 'logits'")),
    ("output: 3-D", lambda s, x: sk.explain(wrapped(lambda o, _x: o[:, None]), x, "saliency"), Raises(r"\[B, classes\]")),
    ("output: a string", lambda s, x: sk.explain(wrapped(lambda o, _x: "cat"), x, "saliency"), Raises("not understood")),
    ("output rows differ from the batch", lambda s, x: sk.explain(wrapped(lambda o, _x: o[:1]), x, "saliency"),
     Raises("1 row\\(s\\) of scores for a batch of 2")),
    ("output squeezed at batch 1", lambda s, x: sk.explain(wrapped(lambda o, _x: o.squeeze(0)), x[:1], "saliency"),
     Raises(r"\[B, classes\]")),
    # --- kinds of model
    ("TorchScript model: saliency", lambda s, x: sk.explain(scripted(), x, "saliency"), Holds(same(tol=1e-6))),
    ("TorchScript model: guided backprop", lambda s, x: sk.explain(scripted(), x, "guided_backprop"),
     Warns("reached no ReLU-family activation", lambda r: r.extras["relu_rule"]["modified_calls"] == 0)),
    ("torch.compile'd model: gradcam", lambda s, x: sk.explain(compiled(), x, "gradcam"), Holds(same("gradcam", tol=1e-6))),
    ("torch.compile'd model: guided backprop", lambda s, x: sk.explain(compiled(), x, "guided_backprop"),
     Holds(same("guided_backprop", tol=1e-6))),
    ("requires_grad=False everywhere", lambda s, x: (sk.explain(frozen_params(), x, ["saliency", "gradcam"])),
     Holds(lambda r: torch.equal(r["saliency"].maps, reference()) and torch.equal(r["gradcam"].maps, reference("gradcam")))),
    ("nn.DataParallel model", lambda s, x: sk.explain(sk.Subject(nn.DataParallel(tiny_model())), x, "gradcam"),
     Holds(lambda r: r.layer == "module.act2" and torch.equal(r.maps, reference("gradcam")))),
    ("half-precision model", lambda s, x: sk.explain(sk.Subject(tiny_model().half()), x, "gradcam"),
     Warns("cast to the model's torch.float16", lambda r: torch.isfinite(r.maps).all() and
           torch.allclose(r.maps, reference("gradcam"), atol=2e-2 * float(reference("gradcam").abs().max())))),
    ("channels_last model", lambda s, x: sk.explain(sk.Subject(tiny_model().to(memory_format=torch.channels_last)), x,
                                                    "gradcam"), Holds(same("gradcam", tol=1e-5))),
    ("float64 model, float32 input", lambda s, x: sk.explain(sk.Subject(tiny_model().double()), x, "saliency"),
     # a float64 model keeps float64 maps (issue 17, item 8), equal to the float32 ones to float32 rounding
     Holds(lambda r: r.maps.dtype == torch.float64
           and torch.allclose(r.maps.float(), reference(), atol=1e-5 * float(reference().abs().max())))),
    ("model in training mode with batch norm", lambda s, x: (lambda sb: (sk.explain(sb, x, "gradcam"), sb))(training_bn()),
     Holds(lambda r: r[1].model.training and all(m.training for m in r[1].model.modules()))),
    # --- files
    ("save onto an existing file", lambda s, x: sk.explain(s, x, "saliency").save(x_file(s)), Raises("it is an existing file")),
    ("save into a folder of other files", lambda s, x: sk.explain(s, x, "saliency").save(other_files(tmpdir(s) / "o")),
     Raises("will not replace .*notes.txt")),
    ("save under a file", lambda s, x: sk.explain(s, x, "saliency").save(x_file(s) / "sub"), Raises("is a file, not a folder")),
    ("load: truncated maps.npz", lambda s, x: Explanation.load(saved(tmpdir(s), lambda f: write(f, "maps.npz", b"PK\x03"))),
     Raises("maps.npz is damaged")),
    ("load: maps.npz that needs unpickling", lambda s, x: Explanation.load(saved(tmpdir(s), pickled_npz)),
     Raises("maps.npz is damaged or not a saliencykit maps file")),
    ("load: maps.npz without maps", lambda s, x: Explanation.load(
        saved(tmpdir(s), lambda f: np.savez(f / "maps.npz", other=np.zeros(2)))), Raises("holds no 'maps' array")),
    ("load: broken JSON", lambda s, x: Explanation.load(saved(tmpdir(s), lambda f: write(f, "explanation.json", "{"))),
     Raises("explanation.json is damaged: not valid JSON")),
    ("load: JSON of something else", lambda s, x: Explanation.load(saved(tmpdir(s), lambda f: write(f, "explanation.json",
                                                                                                    "[1, 2]"))),
     Raises("needs the keys method, signed and target")),
    ("load: empty folder", lambda s, x: Explanation.load(other_files(tmpdir(s) / "e")), Raises("not a saved explanation")),
    ("save and load again", lambda s, x: Explanation.load(sk.explain(s, x, "saliency").save(tmpdir(s) / "ok")),
     Holds(same())),
    ("LIME on a noise image: the hint works", lambda s, x: sk.explain(s, x[:1], "lime", n_samples=8),
     Raises(r"single segment in example 0 .* segments=grid_segments\(32, 32, 7\)")),
    ("LIME on a noise image, following the hint", lambda s, x: sk.explain(s, x[:1], "lime", n_samples=8,
                                                                          segments=grid_segments(32, 32, 7)),
     Holds(lambda r: r.maps.shape == (1, 32, 32) and torch.isfinite(r.maps).all())),
    ("KernelSHAP, segments with one label", lambda s, x: sk.explain(s, x[:1], "kernelshap", n_samples=8,
                                                                    segments=torch.zeros(32, 32, dtype=torch.long)),
     Raises("given segments make a single segment")),
    ("seconds include the shared clean pass", lambda s, x: sk.explain(wrapped(slow_forward), x, "saliency"),
     Holds(lambda r: r.seconds >= 0.25)),
    # --- photos and metrics
    ("image of an unknown kind", lambda s, x: sk.load_image(123), Raises("cannot use int as an image")),
    ("image file not found", lambda s, x: sk.load_image("/nonexistent/photo.png"), Raises("image file not found")),
    ("pointing game with an empty mask", empty_mask_pointing,
     Warns(r"mask of row\(s\) \[1\] is empty", lambda r: np.isnan(float(r["pointing_game"]["saliency"].scores[1])))),
]


# per-test temporary folder, reached from inside the table's lambdas through the subject
def tmpdir(s):
    return s._test_tmp


def x_file(s):
    f = s._test_tmp / "taken.txt"
    f.write_text("keep")
    return f


def test_the_table_is_large_enough():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)  # every case named once


@pytest.mark.parametrize("case,call,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, call, expect, tmp_path):
    s = tiny()
    s._test_tmp = tmp_path
    before = s.state_fingerprint()
    if isinstance(expect, Raises):
        with pytest.raises(SaliencyError, match=expect.text):
            call(s, X.clone())
    elif isinstance(expect, Warns):
        with pytest.warns(UserWarning, match=expect.text):
            result = call(s, X.clone())
        assert expect.check(result), case
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch.jit's deprecation notice; the invariant is what counts
            result = call(s, X.clone())
        assert expect.check(result), case
    after = s.state_fingerprint()  # whatever happened, the shared subject is left as it was found
    for key in ("training", "requires_grad", "hooks", "inplace"):
        assert after[key] == before[key], key
    assert all(torch.equal(a, b) for a, b in zip(after["params"], before["params"]))


def test_unknown_photo_name():
    with pytest.raises(SaliencyError, match="unknown bundled photo"):
        sk.data.image("chelsae")
