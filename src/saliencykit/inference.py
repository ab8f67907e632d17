"""Faster forward-only passes on a CPU, chosen by timing, for the thousand-pass methods.

Occlusion, RISE, LIME, KernelSHAP, Score-CAM and the deletion-type metrics push hundreds to
thousands of perturbed copies of an image through the model, with no gradient and no hook. For
those runs (`engine.forward_scores`) the same model can run faster in another form:

- ``"eager"``: the model as it is.
- ``"channels_last"``: the model as it is, its input in channels-last memory order (convolutions
  then run in the layout oneDNN prefers; EfficientNet-Lite0, 2 threads: 15.6 -> 13.6 ms/image).
- ``"frozen"``: a TorchScript trace of the model, frozen (weights as constants, batch norm folded
  into the convolutions) and optimised for inference (resnet50: 59 -> 42 ms/image).
- ``"onnxruntime"``: the same trace exported to ONNX and run by ONNX Runtime's CPU kernels, when
  the optional package is installed (``pip install saliencykit[fast]``; Lite0 at 6 rows:
  19.3 -> 5.7 ms/image, resnet50 at 10 rows: 55.6 -> 39.0).

Which one pays depends on the model (the frozen form gains 29 % on resnet50 and nothing on
Lite0), so the first large run on a model and input shape times each form on a copy of its
first chunk and keeps the fastest (`Plan`), cached per model. All forms compute the same
function; they round differently (logits agree to ~1e-5 relative), so every candidate's output
is checked against the eager one before it may be chosen, and one run never mixes forms.

A form other than eager is used only when it is safe: on a CPU, when no module of the model has
a hook at the time of the call (a hook would not fire in a traced form), and for the traced forms
only if tracing raised no warning (a warning means the trace baked in a value the input decides)
and its outputs match at two batch sizes. The weights are fingerprinted (storage and version of
every parameter and buffer); training the model, or moving it, drops its plans.
`Subject(..., fast=False)` or ``SALIENCYKIT_FAST=0`` keeps every pass eager; ``fast="frozen"``
(or another form's name) skips the timing and uses that form where it is safe.
"""
from __future__ import annotations

import os
import time
import warnings
import weakref
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable

import torch

from .errors import SaliencyError

FORMS = ("eager", "channels_last", "frozen", "onnxruntime")
TRACED = ("frozen", "onnxruntime")
# time the forms only for runs of at least this many chunks: the timing costs about 10 chunks once
# per model and shape (about 5 % of a Score-CAM on resnet50), which a short run would not repay.
# 32 lets one deletion curve at 224 steps (37 chunks on Lite0) pay for it, and the insertion
# curve after it reuse the plan
TUNE_MIN_CHUNKS = 32
MIN_GAIN = 0.05   # another form must be at least 5 % faster than eager to be chosen
# model -> {(row shape, dtype, rows per chunk): Plan}; weak, so a freed model's plans go with it
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass
class Plan:
    form: str                                   # one of FORMS
    fingerprint: tuple                          # the weights it was built for
    ms_per_row: dict = field(default_factory=dict)  # form -> measured ms per row (empty if forced)
    rejected: dict = field(default_factory=dict)    # form -> why it could not be used
    module: Callable | None = None              # the traced model, for forms "frozen" and "onnxruntime"

    def run(self, subject, x: torch.Tensor) -> torch.Tensor:
        """Logits of `x` in this form."""
        from .subject import extract_logits

        if self.form in TRACED:
            return extract_logits(self.module(x), dense=True)
        if self.form == "channels_last":
            return subject.forward(x.contiguous(memory_format=torch.channels_last))
        return subject.forward(x)


def weights_fingerprint(model: torch.nn.Module) -> tuple:
    return tuple((t.data_ptr(), t._version, t.device.type) for t in chain(model.parameters(), model.buffers()))


def _has_hooks(model: torch.nn.Module) -> bool:
    from .subject import count_hooks

    return count_hooks(model) > 0


def _setting(subject):
    """The subject's `fast` setting, with the environment switch applied: False, None (auto) or a form."""
    if os.environ.get("SALIENCYKIT_FAST", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    fast = getattr(subject, "fast", None)
    if fast is True:
        return None
    if fast not in (None, False) and fast not in FORMS:
        raise SaliencyError(f"Subject fast={fast!r} is not one of True, False, None or {', '.join(FORMS)}")
    return fast


def _plain_forward():
    from .subject import Subject

    return Subject.forward


def _why(err: Exception) -> str:
    """One line saying why a form could not be used."""
    text = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{type(err).__name__}: {text}"


def _tracer_warning(caught) -> str | None:
    """Why a trace cannot be trusted (it baked in a value the input decides), or None."""
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            return f"tracing warned ({str(w.message).splitlines()[0][:200]})"
    return None


def _freeze(model, x: torch.Tensor):
    """(frozen TorchScript module, None) or (None, why not)."""
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            traced = torch.jit.trace(model, x, check_trace=False, strict=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    except Exception as err:  # any model torch.jit cannot trace simply keeps running eagerly
        return None, _why(err)
    why = _tracer_warning(caught)
    return (None, why) if why else (frozen, None)


class _Logits(torch.nn.Module):
    """The model with its output reduced to the logits tensor (what an ONNX graph can return)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        from .subject import extract_logits

        return extract_logits(self.model(x), dense=True)


def _onnxruntime(model, x: torch.Tensor):
    """(callable running the model in ONNX Runtime, None) or (None, why not)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed (pip install saliencykit[fast])"
    if x.dtype != torch.float32:
        return None, f"only float32 models are exported (this one is {x.dtype})"
    import io

    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            torch.onnx.export(_Logits(model), (x,), buf, input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "rows"}, "logits": {0: "rows"}}, dynamo=False)
        why = _tracer_warning(caught)
        if why:
            return None, why
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # no busy-waiting between calls: PyTorch shares these cores between the chunks
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # a model the exporter or the runtime cannot take keeps running in torch
        return None, _why(err)

    def run(inp: torch.Tensor) -> torch.Tensor:
        arr = inp.detach().contiguous().numpy()
        return torch.from_numpy(session.run(None, {"x": arr})[0])

    return run, None


def build(form: str, model: torch.nn.Module, x: torch.Tensor):
    """(callable, None) running `model` in the traced `form` ("frozen" or "onnxruntime") for
    inputs like `x`, or (None, why not). Tracing and exporting switch train/eval modes and restore
    the mode of the module they were handed (the ONNX logits wrapper is new, so in training mode);
    every module's mode is put back here, so the run that asked keeps the modes it set."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        return (_freeze if form == "frozen" else _onnxruntime)(model, x)
    finally:
        for m, was in modes:
            m.training = was


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    if out.shape != ref.shape:
        return False
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    return bool(torch.allclose(out.float(), ref.float(), rtol=1e-3, atol=1e-4 * max(scale, 1.0)))


def _time(fn, x, warmup: int) -> tuple[float, torch.Tensor]:
    for _ in range(warmup):
        fn(x)
    t0 = time.perf_counter()
    out = fn(x)
    return (time.perf_counter() - t0) * 1000 / x.shape[0], out


def plan_for(subject, x: torch.Tensor, n_chunks: int) -> Plan | None:
    """The form for a forward-only run whose chunks look like `x` ([rows, C, H, W]); None = eager.

    Builds (times) a plan only for runs of at least `TUNE_MIN_CHUNKS` chunks; a plan already built
    for this model, shape and chunk size is used for a run of any length."""
    setting = _setting(subject)
    if setting is False or x.dim() != 4 or not x.is_floating_point() or x.device.type != "cpu":
        return None  # a black-box subject (a detector) sets fast = False: it has no other form
    model = subject.model
    if _has_hooks(model):
        return None
    key = (tuple(x.shape), x.dtype)
    plans = _PLANS.setdefault(model, {})
    plan = plans.get(key)
    fingerprint = weights_fingerprint(model)
    if plan is not None and plan.fingerprint == fingerprint and (setting is None or plan.form == setting):
        return plan
    if setting is None and n_chunks < TUNE_MIN_CHUNKS:
        return None

    def forward(form, module=None):
        probe = Plan(form=form, fingerprint=fingerprint, module=module)
        return lambda inp: probe.run(subject, inp)

    plan = Plan(form="eager", fingerprint=fingerprint)
    probe_x = x.detach().clone()
    with torch.inference_mode():
        eager_ms, ref = _time(forward("eager"), probe_x, warmup=1)
    plan.ms_per_row["eager"] = eager_ms
    if setting is None:
        candidates = ["channels_last", "frozen", "onnxruntime"]
    else:
        candidates = [] if setting == "eager" else [setting]
    for form in candidates:
        module = None
        if form in TRACED:
            if type(subject).forward is not _plain_forward():
                plan.rejected[form] = f"{type(subject).__name__} has its own forward; only the model's is traced"
                continue
            module, why = build(form, model, probe_x)
            if module is None:
                plan.rejected[form] = why
                continue
        fn = forward(form, module)
        with torch.inference_mode():
            try:
                ms, out = _time(fn, probe_x, warmup=2 if form in TRACED else 1)
                ok = _close(out, ref) and (probe_x.shape[0] == 1 or _close(fn(probe_x[:1]), ref[:1]))
            except Exception as err:
                plan.rejected[form] = _why(err)
                continue
        if not ok:
            plan.rejected[form] = "outputs differ from the eager model's"
            continue
        plan.ms_per_row[form] = ms
        if form == setting:
            plan.form, plan.module = form, module
        elif setting is None and ms < (1 - MIN_GAIN) * eager_ms and ms <= min(plan.ms_per_row.values()):
            plan.form, plan.module = form, module
    plans[key] = plan
    return plan


def plans(subject) -> dict:
    """What was chosen for this subject's model: {(chunk shape, dtype): Plan}."""
    return dict(_PLANS.get(subject.model, {}))


def run(subject, plan: Plan | None, x: torch.Tensor) -> torch.Tensor:
    """Logits of `x` under `plan` (eager when None, or when a hook appeared since it was built)."""
    if plan is None or plan.form == "eager" or _has_hooks(subject.model):
        return subject.forward(x)
    return plan.run(subject, x)
