"""Batched forward/backward passes shared by every method and metric.

- `gradient_pass`: one forward + one backward over a batch whose rows may repeat examples
  (noisy copies, path interpolants); returns logits, scores, the input gradient and the
  activations/gradients of captured layers. Parameters never receive `.grad`: gradients are
  taken with `torch.autograd.grad` w.r.t. the input and the captured tensors only.
- `forward_scores`: forward-only scoring of many inputs generated on the fly, chunked to a
  batch size, under `torch.inference_mode()`, in the fastest form of the model on a CPU
  (`inference.plan_for`: channels-last input or a frozen trace, when safe and faster).
- `PassCounter`: counts forward/backward passes in *images* (rows), reported per input image.
- `Progress` / `with_progress`: the one progress bar every long loop uses (methods, metrics, the CLI).
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from . import inference
from .errors import SaliencyError
from .hooks import this_thread_only
from .targets import ResolvedTarget

DEFAULT_BATCH = 32      # the most rows per chunk: more does not pay on a CPU and rarely on a GPU
MEMORY_FRACTION = 0.25  # share of the available memory one chunk may use
# On a CPU, big chunks are slower per image: once a chunk's largest layer output outgrows the
# caches, every layer streams from main memory (EfficientNet-Lite0 at 224 px, 2 threads: forward
# 16-18 ms/image at 4-16 rows, 26.5 at 32; forward+backward 41-43 at 6-8 rows, 79 at 32). Chunks
# are capped so that the largest layer output of a chunk stays near this size.
CPU_CHUNK_BYTES = 32 * 2**20
# the reduced precision `explain(..., amp=True)` runs the model's passes in, per device type
AMP_DTYPES = {"cpu": torch.bfloat16, "cuda": torch.float16}
# model -> {(input shape, dtype): costs}; weak, so a freed model's entry cannot answer for a new one
_ROW_COST: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Progress:
    """A progress bar (tqdm, on stderr) whose rate and time left are measured from the end of the
    first step: the first chunk carries one-off costs (choosing the model form, warming allocators
    and caches) and, counted in the rate, made a 80-second job announce itself as 1 h 22 min.
    Until a second step is done the bar shows no estimate; the elapsed time stays the whole time.
    `enabled=False` shows nothing."""

    def __init__(self, total: int | None, desc: str = "", enabled: bool = True, leave: bool = False,
                 unit: str = "it"):
        self.bar = None
        if enabled:
            import sys

            from tqdm.auto import tqdm

            class _Bar(tqdm):
                warm = None  # (n, time) at the end of the first step

                @property
                def format_dict(self):
                    d = super().format_dict
                    done = 0 if self.warm is None else self.n - self.warm[0]
                    dt = 0 if self.warm is None else self._time() - self.warm[1]
                    d["rate"] = done / dt if done > 0 and dt > 0 else 0  # 0: tqdm shows "?"
                    return d

            self.bar = _Bar(total=total, desc=desc, leave=leave, unit=unit, smoothing=0, file=sys.stderr)

    def step(self, n: int = 1):
        if self.bar is None:
            return
        self.bar.update(n)
        if self.bar.warm is None:
            self.bar.warm = (self.bar.n, self.bar._time())

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def with_progress(iterable, desc: str = "", enabled: bool = True, total: int | None = None, leave: bool = False,
             unit: str = "it"):
    """Iterate `iterable` with a `Progress` bar; a step counts once the caller is done with an item."""
    if not enabled:
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, desc, leave=leave, unit=unit) as bar:
        for item in iterable:
            yield item
            bar.step()


def amp_dtype(device) -> torch.dtype:
    """The dtype `amp=True` computes in on `device` (a CPU: bfloat16, CUDA: float16); a
    SaliencyError for a device type without mixed precision here."""
    kind = torch.device(device).type
    if kind not in AMP_DTYPES:
        raise SaliencyError(f"amp=True runs the model under torch.autocast on a CPU (bfloat16) or CUDA (float16); "
                            f"the input is on {kind!r}: use amp=False there")
    return AMP_DTYPES[kind]


@contextlib.contextmanager
def mixed_precision(device, enabled: bool):
    """The model's passes under `torch.autocast` in `amp_dtype(device)` when `enabled` (a no-op
    otherwise). Autocast is per thread, so other threads' calls on the same model stay in float32.
    Gradients w.r.t. a float32 input come back in float32; the engine widens the activations and
    layer gradients it hands to methods (`widen`)."""
    if not enabled:
        yield None
        return
    dtype = amp_dtype(device)
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield dtype


def amp_active(device) -> bool:
    """Whether this thread runs under an enabled autocast for `device`'s type."""
    return torch.is_autocast_enabled(torch.device(device).type)


def widen(t):
    """A float16 / bfloat16 tensor (an activation or gradient computed under autocast) as float32;
    anything else unchanged (a float64 model keeps its precision)."""
    if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def memory_budget_bytes(device=None) -> int:
    """Bytes one chunk may use: SALIENCYKIT_MEMORY_MB if set, else a quarter of what is free."""
    import os

    env = os.environ.get("SALIENCYKIT_MEMORY_MB")
    if env:
        return int(float(env) * 2**20)
    if device is not None and torch.device(device).type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * MEMORY_FRACTION)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * MEMORY_FRACTION)
    except OSError:
        pass
    return 2 * 2**30


def row_cost_bytes(subject, shape) -> tuple[int, int]:
    """(bytes of all layer outputs, bytes of the largest one) for one input row, measured once
    per model and input shape by a probe forward with hooks on the leaf modules."""
    # the probe runs in the model's own floating dtype (a float64 model rejects float32 zeros)
    dtype = subject.dtype
    key = (tuple(shape[1:]), dtype)
    costs = _ROW_COST.setdefault(subject.model, {})
    if key not in costs:
        sizes = []

        def hook(_m, _i, out):
            if isinstance(out, torch.Tensor):
                sizes.append(out.numel() * out.element_size())

        handles = [m.register_forward_hook(this_thread_only(hook)) for m in subject.model.modules() if not list(m.children())]
        device = torch.device(subject.device)
        try:  # measured in the model's dtype even under amp, so chunk sizes never depend on call order
            with torch.inference_mode(), torch.autocast(device_type=device.type, enabled=False):
                subject.forward(torch.zeros((1, *shape[1:]), device=device, dtype=dtype))
        finally:
            for h in handles:
                h.remove()
        costs[key] = (max(sum(sizes), 1), max(sizes, default=1))
    return costs[key]


def auto_batch(subject, shape, grad: bool, rows: int | None = None) -> int:
    """Rows per chunk that fit the memory budget: a backward keeps every layer output of the
    chunk alive (~ the sum), a forward only a few at a time (~ 3 x the largest). On a CPU also
    at most `CPU_CHUNK_BYTES` of the largest layer output per chunk (cache-friendly chunks).
    `shape[1:]` is one row's shape; `rows`, when given, the number of rows to run (one row
    needs no probe forward)."""
    if rows is not None and rows <= 1:
        return 1
    total, largest = row_cost_bytes(subject, shape)
    per_row = 2 * total if grad else 3 * largest
    rows_fit = memory_budget_bytes(subject.device) // per_row
    if torch.device(subject.device).type == "cpu":
        rows_fit = min(rows_fit, CPU_CHUNK_BYTES // largest)
    return int(max(1, min(DEFAULT_BATCH, rows_fit)))


def spans(n: int, most: int) -> list[tuple[int, int]]:
    """(start, stop) of the fewest chunks of at most `most` rows covering `n` rows, their sizes
    differing by at most one: 8 rows at most 6 per chunk run as 4 + 4, not 6 + 2. A small last
    chunk costs nearly as much per call as a full one on a CPU (EfficientNet-Lite0, one thread:
    saliency of 8 rows as 6 + 2 took 1.12x the time of 4 + 4)."""
    n, most = int(n), max(1, int(most))
    k = max(1, math.ceil(n / most))
    size, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        stop = start + size + (1 if i < extra else 0)
        if stop > start:
            out.append((start, stop))
        start = stop
    return out


@dataclass
class PassCounter:
    forward: int = 0   # rows (images) pushed through the model
    backward: int = 0  # rows backpropagated
    batches: int = 0   # model calls

    def add(self, forward: int = 0, backward: int = 0):
        self.forward += forward
        self.backward += backward
        self.batches += 1 if forward else 0

    def per_image(self, n_images: int) -> dict:
        n = max(n_images, 1)
        return {"forward": self.forward / n, "backward": self.backward / n, "model_calls": self.batches}


@dataclass
class GradResult:
    logits: torch.Tensor                  # [N,K] detached
    scores: torch.Tensor                  # [N] detached
    input_grad: torch.Tensor | None       # [N,C,H,W]
    activations: dict = field(default_factory=dict)  # name -> [N,...] detached
    gradients: dict = field(default_factory=dict)    # name -> [N,...]


def graph_from_layer_ok(subject) -> bool:
    """Whether a pass that needs gradients from a layer on may run the part before the layer
    without autograd (`capturing_forward`, IIA's representation paths): no module of the model
    takes another kernel when autograd is off (`nn.MultiheadAttention`'s fast path would round
    the part before the layer differently from a pass with autograd on)."""
    model = getattr(subject, "model", None)
    if not isinstance(model, torch.nn.Module):
        return False
    return not any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())


def capturing_forward(subject, x: torch.Tensor, layers: Sequence[str] = (), input_grad: bool = True,
                      counter: PassCounter | None = None):
    """Forward `x` with its autograd graph kept and the outputs of `layers` captured:
    `(input leaf, logits, {layer: output})`, the outputs still in the graph.

    When the gradient of one layer's output is all that is wanted (`input_grad=False`: the
    gradient CAMs), the graph starts at that layer: the forward runs without autograd up to the
    layer's last call and the captured output is the graph's leaf. The gradient w.r.t. that output
    does not depend on what comes before it, and the forward computes the same values, so the maps
    are the same to the bit; the part before the layer records no graph and keeps no tensors for a
    backward (EfficientNet-Lite0, forward + gradient to its head, one thread, 10 interleaved
    rounds: 27.9 -> 24.0 ms at batch 1, 471 -> 344 ms at batch 8). The layer's calls per forward
    are remembered per input shape (a shared activation module runs more than once); a forward
    that does not reach the call expected is run again with the graph from the input (that extra
    forward goes to `counter`; the caller counts the one it asked for).
    """
    late = not input_grad and len(layers) == 1 and hasattr(subject, "capture")
    if late:
        name = subject.find_layer(layers[0])[0]
        seen = subject.__dict__.setdefault("_layer_calls", {}) if hasattr(subject, "__dict__") else {}
        key = (name, tuple(x.shape[1:]), x.dtype)
        late = seen.get(key, 1) is not None and graph_from_layer_ok(subject)
    if late:
        with torch.no_grad():
            xin = x.detach().clone()
            capture = subject.capture(layers, graph_from=max(seen.get(key, 1) - 1, 0))
            with capture:
                logits = subject.forward(xin)
        outs = capture.records[name].outputs
        if outs and isinstance(outs[-1], torch.Tensor) and outs[-1].requires_grad and logits.requires_grad:
            seen[key] = len(outs)
            return xin, logits, {name: capture.get(name)}
        # the layer's output is no floating tensor (never tried again for this shape), or the forward
        # made fewer calls of it than the last one of this shape (tried again with the new count)
        tensor = bool(outs) and isinstance(outs[-1], torch.Tensor) and outs[-1].is_floating_point()
        seen[key] = len(outs) if tensor else None
        if counter is not None:
            counter.add(forward=x.shape[0])
    with torch.enable_grad():  # works even when the caller is under torch.no_grad()
        xin = x.detach().clone().requires_grad_(True)
        capture = subject.capture(layers) if layers else None
        if capture is not None:
            with capture:
                logits = subject.forward(xin)
            acts = {name: capture.get(name) for name in capture.modules}
        else:
            logits = subject.forward(xin)
            acts = {}
    for name, a in acts.items():
        if not a.requires_grad:
            raise SaliencyError(f"layer {name!r} output does not depend on the input differentiably")
    return xin, logits, acts


def gradient_pass(subject, x: torch.Tensor, target: ResolvedTarget, rows: torch.Tensor | None = None,
                  layers: Sequence[str] = (), input_grad: bool = True, counter: PassCounter | None = None,
                  output: str | None = None) -> GradResult:
    """Forward `x` (rows mapped to examples by `rows`), backprop the summed target score.

    Samples do not interact in eval mode, so the gradient of the sum is each row's own gradient.
    Must be called inside `subject.explaining()`.
    """
    xin, logits, acts = capturing_forward(subject, x, layers, input_grad, counter)
    with torch.enable_grad():  # works even when the caller is under torch.no_grad()
        scores = target.score(logits, rows=rows, output=output)
        wrt = ([xin] if input_grad else []) + list(acts.values())
        grads = torch.autograd.grad(scores.sum(), wrt, allow_unused=True)
    if counter is not None:
        counter.add(forward=x.shape[0], backward=x.shape[0])
    gi = grads[0] if input_grad else None
    if input_grad and gi is None:
        gi = torch.zeros_like(xin)
    layer_grads = {}
    for (name, a), g in zip(acts.items(), grads[1 if input_grad else 0:]):
        layer_grads[name] = widen(torch.zeros_like(a) if g is None else g.detach())
    return GradResult(logits=widen(logits.detach()), scores=widen(scores.detach()),
                      input_grad=None if gi is None else widen(gi.detach()),
                      activations={k: widen(v.detach()) for k, v in acts.items()}, gradients=layer_grads)


def chunked_gradient(subject, inputs: torch.Tensor, target: ResolvedTarget, rows: torch.Tensor,
                     batch_size: int | None, counter: PassCounter | None = None, layers: Sequence[str] = (),
                     input_grad: bool = True, reduce: Callable | None = None):
    """`gradient_pass` over a large row set in chunks; returns concatenated input gradients
    (or, with `reduce`, feeds each chunk's GradResult to `reduce(start, result)`)."""
    bs = batch_size or auto_batch(subject, inputs.shape, grad=True, rows=inputs.shape[0])
    out = []
    for start, stop in spans(inputs.shape[0], bs):
        res = gradient_pass(subject, inputs[start:stop], target, rows=rows[start:stop],
                            layers=layers, input_grad=input_grad, counter=counter)
        if reduce is not None:
            reduce(start, res)
        else:
            out.append(res.input_grad)
    return torch.cat(out) if out else None


@torch.inference_mode()
def forward_logits(subject, x: torch.Tensor, batch_size: int | None = None,
                   counter: PassCounter | None = None) -> torch.Tensor:
    """The subject's outputs for `x` in chunks, no grad: float logits `[B, K]` for a classifier, or
    whatever a black-box subject's `forward` returns per row (a detector: a list of detections)."""
    bs = batch_size or auto_batch(subject, x.shape, grad=False, rows=x.shape[0])
    outs = []
    for start, stop in spans(x.shape[0], bs):
        chunk = x[start:stop]
        outs.append(_as_scores_input(subject.forward(chunk)))
        if counter is not None:
            counter.add(forward=chunk.shape[0])
    if all(isinstance(o, torch.Tensor) for o in outs):
        return torch.cat(outs)
    return [row for o in outs for row in o]


def _as_scores_input(out):
    """Logits as float32 for the targets' scores; a black box's per-row outputs as they are."""
    return out.float() if isinstance(out, torch.Tensor) else out


def forward_scores(subject, make_inputs: Callable[[int, int], torch.Tensor], n: int, target: ResolvedTarget,
                   rows_of: Callable[[int, int], torch.Tensor], batch_size: int | None = None,
                   counter: PassCounter | None = None, output: str | None = None,
                   progress: bool = False, desc: str = "",
                   on_chunk: Callable[..., None] | None = None) -> torch.Tensor:
    """Scores of `n` inputs produced lazily by `make_inputs(start, stop)`, in chunks, no grad.

    `on_chunk(start, stop, logits, scores)`, when given, also receives each chunk's full outputs
    (`[k,K]` float logits, or a black box's per-row outputs) and the chunk's scores, so a caller can
    weight its masks as they go and keep the scores of every class from the same passes (RISE)."""
    bs = batch_size or DEFAULT_BATCH
    scores = []
    chunks = spans(n, bs) if n > 0 else []     # even chunks, as the gradient passes: no small last call
    it = with_progress(chunks, desc, enabled=progress, total=len(chunks))
    plan = None
    with torch.inference_mode():
        for start, stop in it:
            chunk = make_inputs(start, stop)
            if start == 0:  # the form of the model this run uses (timed once per model and shape)
                # under amp the eager model runs in autocast; the other forms would not honour it
                plan = None if amp_active(chunk.device) else inference.plan_for(subject, chunk, len(chunks))
            logits = _as_scores_input(inference.run(subject, plan, chunk))
            scores.append(target.score(logits, rows=rows_of(start, stop), output=output))
            if on_chunk is not None:
                on_chunk(start, stop, logits, scores[-1])
            if counter is not None:
                counter.add(forward=stop - start)
    return torch.cat(scores) if scores else torch.zeros(0)


def upsample(maps: torch.Tensor, size, mode: str = "bilinear", align_corners: bool = False) -> torch.Tensor:
    """[B,h,w] or [B,C,h,w] -> same at `size` (bilinear, align_corners=False by default). A 1-D
    `size` (a series) resamples linearly, a 3-D one (a volume) trilinearly."""
    size = tuple(size)
    squeeze = maps.dim() == len(size) + 1
    m = maps.unsqueeze(1) if squeeze else maps
    if tuple(m.shape[2:]) != size:
        if len(size) != 2 and mode in ("bilinear", "bicubic"):
            mode = {1: "linear", 3: "trilinear"}[len(size)]
        m = F.interpolate(m.float(), size=size, mode=mode,
                          align_corners=align_corners if mode in ("linear", "bilinear", "bicubic", "trilinear") else None)
    return m.squeeze(1) if squeeze else m


def reduce_channels(attr: torch.Tensor, mode: str, layout: str | None = None) -> torch.Tensor:
    """[B,C,H,W] -> [B,H,W]: "sum", "abs_sum", "max_abs", "l2", "mean", over the channel axis of
    `layout` (default BCHW: axis 1; BTCHW: axis 2). A flat BF input has no channel axis: the
    map is the attribution itself (its magnitude for the unsigned reductions)."""
    from .subject import channel_axis

    axis = 1 if layout is None else channel_axis(layout)
    if axis is None:
        if mode not in ("sum", "abs_sum", "max_abs", "l2", "mean"):
            raise SaliencyError(f"unknown channel reduction {mode!r}; use sum, abs_sum, max_abs, l2 or mean")
        return attr if mode in ("sum", "mean") else attr.abs()
    if mode == "sum":
        return attr.sum(axis)
    if mode == "abs_sum":
        return attr.abs().sum(axis)
    if mode == "max_abs":
        return attr.abs().amax(axis)
    if mode == "l2":
        return attr.pow(2).sum(axis).sqrt()
    if mode == "mean":
        return attr.mean(axis)
    raise SaliencyError(f"unknown channel reduction {mode!r}; use sum, abs_sum, max_abs, l2 or mean")


def generator(seed: int | None, device=None) -> torch.Generator:
    g = torch.Generator(device=device if device is not None else "cpu")
    g.manual_seed(0 if seed is None else int(seed))
    return g


def perturbed_scores(subject, x: torch.Tensor, baseline: torch.Tensor, target: ResolvedTarget,
                     masks: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], n: int,
                     batch_size: int | None = None, counter: PassCounter | None = None,
                     output: str | None = None, progress: bool = False, desc: str = "",
                     on_chunk: Callable[..., None] | None = None) -> torch.Tensor:
    """The one perturbation runner: scores of `n` blends `x*m + baseline*(1-m)`.

    `masks(start, stop)` returns `(rows, m)`: for each of the rows start..stop-1 the example index
    it perturbs ([k] long) and its keep-mask ([k,1|C,H,W] in [0,1]; 1 keeps the input). Masks are
    made per chunk, so N masks are never all in memory. Used by occlusion, RISE, LIME,
    KernelSHAP, Score-CAM-like methods and the deletion/insertion-type metrics.
    `on_chunk(start, stop, logits, scores)` receives every chunk's outputs and scores (see `forward_scores`).
    """
    batch_size = batch_size or auto_batch(subject, x.shape, grad=False, rows=n)
    cache: dict = {}

    def make_inputs(start, stop):
        rows, m = masks(start, stop)
        cache[(start, stop)] = rows
        if m.dtype == torch.bool:  # a hard mask picks, the same values as the blend with one pass less
            return torch.where(m, x[rows], baseline[rows])
        m = m.to(x.dtype)
        return x[rows] * m + baseline[rows] * (1 - m)

    def rows_of(start, stop):
        return cache.pop((start, stop))

    return forward_scores(subject, make_inputs, n, target, rows_of, batch_size=batch_size, counter=counter,
                          output=output, progress=progress, desc=desc, on_chunk=on_chunk)
