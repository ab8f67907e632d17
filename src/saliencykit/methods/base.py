"""Method registry, the per-call context that lets methods share passes, and `explain()`."""
from __future__ import annotations

import contextlib
import inspect
import time
from typing import Any, Sequence

import torch

from ..engine import (DEFAULT_BATCH, GradResult, PassCounter, Progress, auto_batch, capturing_forward, forward_logits,
                      gradient_pass, mixed_precision, spans, widen)
from ..errors import SaliencyError, positive_int, resolve_seed
from ..hooks import model_lock
from ..explanation import Explanation, map_warnings
from ..subject import LAYOUTS
from ..targets import ResolvedTarget, Target

REGISTRY: dict[str, type["Method"]] = {}
ANY_LAYOUT = tuple(LAYOUTS)  # `Method.layouts` of a method that never looks at the input's axes
# (subject kind, name or alias) -> the method that runs under that name on that kind of subject:
# "gradcam" is one method on a classifier and another on a detector
BY_KIND: dict[tuple[str, str], type["Method"]] = {}


def register(cls):
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no registry name")
    for kind in cls.kinds:
        for key in (cls.name, *cls.aliases):
            BY_KIND[(kind, key)] = cls
    if cls.name not in REGISTRY or "classifier" in cls.kinds:  # what `available()` lists under the name
        REGISTRY[cls.name] = cls
        for alias in cls.aliases:
            REGISTRY[alias] = cls
    return cls


class Method:
    """One attribution method. Subclasses set the class attributes and implement `run`."""

    name: str = ""
    aliases: tuple = ()
    kinds: tuple = ("classifier",)  # the subjects it runs on (`Subject.subject_kind`, `Detector.subject_kind`)
    family: str = ""
    cost: str = ""          # passes per image at defaults, e.g. "1F+1B", "50F+50B"
    signed: bool = False
    randomized: bool = False
    experimental: bool = False
    uses_layer: bool = False
    clean_pass: bool = False  # uses gradients/activations of the clean input (shares `Context.prime`)
    # changes the model's weights for a moment (and restores them): its call has the model to
    # itself, other threads' calls on that model wait (`hooks.model_lock`)
    changes_model: bool = False
    # a classmethod `prime(ctx)` when the method, run first, can make the clean forward that fixes
    # the target itself (under its own rules: `Context.prime_under`); None otherwise
    prime = None
    defaults: dict = {}
    # parameters a call must give, no default working (CRP's `concept`): runs over "every method"
    # (the benchmark's --all-methods, the web app's list) leave such a method out
    requires: tuple = ()
    description: str = ""
    # the input layouts it can explain (`subject.LAYOUTS`); asked for another, `explain` refuses
    # before any pass: a window, a superpixel or a token grid means nothing on axes it does not know
    layouts: tuple = ("BCHW",)
    # layout -> why the method cannot read it, added to the refusal (the CAMs on a flat input)
    not_for: dict = {}

    def run(self, ctx: "Context", target: ResolvedTarget, layer, **params) -> dict:
        raise NotImplementedError

    @classmethod
    def wrong_subject(cls, kind: str) -> str:
        """The error for a request to run this method on a `kind` subject it does not support."""
        supported = sorted({name for (k, name), c in BY_KIND.items() if k == kind and name == c.name})
        return (f"method {cls.name} cannot explain a {kind}; a {kind} supports {', '.join(supported)}" if supported
                else f"method {cls.name} cannot explain a {kind}")

    @classmethod
    def info(cls) -> dict:
        return {"name": cls.name, "family": cls.family, "cost": cls.cost, "signed": cls.signed, "kinds": list(cls.kinds),
                "randomized": cls.randomized, "experimental": cls.experimental, "uses_layer": cls.uses_layer,
                "defaults": dict(cls.defaults), "description": cls.description, "aliases": list(cls.aliases),
                "requires": list(cls.requires), "layouts": list(cls.layouts)}


def available(include_experimental: bool = True) -> dict[str, dict]:
    """Registered methods: name -> {family, cost, signed, randomized, experimental, ...}."""
    return {name: cls.info() for name, cls in sorted(REGISTRY.items())
            if name == cls.name and (include_experimental or not cls.experimental)}


def method_key(name: str) -> str:
    """The spelling-free form of a method name: case, '-', '_', '.' and spaces do not count and
    '+' reads as 'p' ("Grad-CAM", "GradCAM", "grad_cam" -> "gradcam"; "gradcam++" -> "gradcampp")."""
    return "".join("p" if ch == "+" else ch for ch in name.lower() if ch not in "-_. ")


def get(name: str, kind: str = "classifier") -> type[Method]:
    """The method registered under `name` (or an alias, in any spelling: `method_key`) for subjects
    of `kind`. Every entry point resolves names here, before any computation, and reports results
    under the canonical `Method.name`."""
    if not isinstance(name, str):
        raise SaliencyError(f"method must be given by name, got {type(name).__name__}")
    key = method_key(name)
    for (k, registered), cls in BY_KIND.items():  # each name and alias of each kind's methods
        if k == kind and method_key(registered) == key:
            return cls
    for registered, cls in REGISTRY.items():
        if method_key(registered) == key:
            raise SaliencyError(cls.wrong_subject(kind))
    import difflib

    names = sorted(n for n, c in REGISTRY.items() if n == c.name)
    close = difflib.get_close_matches(name.lower().replace("-", "_"), names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise SaliencyError(f"unknown method {name!r}.{hint} Available: {', '.join(names)}")


class Context:
    """Everything shared by the methods of one `explain` call on one input batch.

    The clean forward pass and each layer capture (forward + backward for a given layer set and
    target) run at most once, whatever number of methods ask for them.
    """

    def __init__(self, subject, x: torch.Tensor, seed: int | None = 0, batch_size: int | None = None,
                 progress: bool = False):
        self.subject = subject
        self.x = x
        self.seed = seed
        self.batch_size = batch_size
        self.progress = progress
        self.counter = PassCounter()
        for rows in getattr(subject, "setup_passes", ()):   # forwards a view made for this call (an embedding's)
            self.counter.add(forward=rows)
        layout_for = getattr(subject, "layout_for", None)
        self.layout = layout_for(x) if callable(layout_for) else "BCHW"
        self._logits: torch.Tensor | None = None
        self._captures: dict = {}
        # [(first row, input, logits, activations)] per chunk of one clean forward that kept its graph
        self._primed = None
        self._primed_out: tuple | None = None  # (logits, {layer: activations}) of that pass, detached
        # methods of this call still to use the primed graph (None: unknown, keep the graph); the
        # last one's backward frees the graph as it goes, which on a CPU is 8-26 % faster per row
        # at 6-row chunks than keeping it (EfficientNet-Lite0, resnet50)
        self.primed_users: int | None = None
        self._graph_freed = False
        # whether the primed pass keeps its graph back to the input; False when only layer
        # gradients are wanted (its graph then starts at the layer, `engine.capturing_forward`)
        self.input_graph = True
        self._own_primed: dict = {}  # key -> (input, logits): a clean forward under a method's own rules

    def prime(self, layers: Sequence[str] = (), chunk: int | None = None) -> None:
        """One forward of the clean input that keeps its autograd graph and captures `layers`.

        Its logits fix the target, and every later backward on the clean input (gradient CAMs,
        saliency, gradient x input) reuses it: a call asking for the target and several such
        methods costs one forward in total instead of one per method plus one for the target.
        The rows run in even chunks of at most `chunk` (default: all at once), each with its own graph; on a
        CPU cache-sized chunks are faster per row, forward and backward (EfficientNet-Lite0,
        10 rows: 0.65 s in one chunk, 0.38 s in two).
        """
        b = self.batch
        chunk = max(1, int(chunk or b))
        parts = []
        for start, stop in spans(b, chunk):
            xin, logits, acts = capturing_forward(self.subject, self.x[start:stop], layers, self.input_graph,
                                                  self.counter)
            self.counter.add(forward=xin.shape[0])
            parts.append((start, xin, logits, acts))
        self._primed = parts
        # the whole batch's logits and activations, detached, joined once for every reader
        self._primed_out = (widen(torch.cat([p[2].detach() for p in parts])),
                            {n: widen(torch.cat([p[3][n].detach() for p in parts])) for n in parts[0][3]})
        self._logits = self._primed_out[0].float()

    def _primed_grads(self, target: ResolvedTarget, layers: Sequence[str], input_grad: bool):
        """Backward through the primed graph (chunk by chunk), or None when it cannot serve the request."""
        if self._primed is None or self._graph_freed:
            return None
        if not set(layers) <= set(self._primed_out[1]) or (input_grad and not self._primed[0][1].requires_grad):
            return None
        retain = self.primed_users is None or self.primed_users > 1
        gis, scores_all, layer_grads = [], [], {n: [] for n in layers}
        for start, xin, logits, acts in self._primed:
            rows = None if len(self._primed) == 1 else torch.arange(start, start + xin.shape[0], device=xin.device)
            with torch.enable_grad():
                scores = target.score(logits, rows=rows)
                wrt = ([xin] if input_grad else []) + [acts[n] for n in layers]
                grads = torch.autograd.grad(scores.sum(), wrt, retain_graph=retain, allow_unused=True)
            if input_grad:
                gis.append(torch.zeros_like(xin) if grads[0] is None else grads[0].detach())
            for n, g in zip(layers, grads[1 if input_grad else 0:]):
                layer_grads[n].append(widen(torch.zeros_like(acts[n]) if g is None else g.detach()))
            scores_all.append(widen(scores.detach()))
        self.counter.add(backward=self.batch)
        self._graph_freed = not retain
        logits, acts = self._primed_out
        return GradResult(logits=logits, scores=torch.cat(scores_all),
                          input_grad=torch.cat(gis) if input_grad else None,
                          activations={n: acts[n] for n in layers},
                          gradients={n: torch.cat(v) for n, v in layer_grads.items()})

    def prime_under(self, key, rules) -> None:
        """One clean forward with its graph kept, run inside the context manager `rules` (a
        modified backward rule, or hooks that record tensors): its logits fix the target, and
        `own_input_gradient(key, ...)` / `take_own_primed(key)` use it once, so a method with its
        own forward rules that runs alone costs 1F+1B instead of a target forward plus its own
        forward and backward."""
        with rules as recorded, torch.enable_grad():
            xin = self.x.detach().clone().requires_grad_(True)
            logits = self.subject.forward(xin)
        self.counter.add(forward=self.batch)
        self._own_primed[key] = (xin, logits, recorded)
        if self._logits is None:
            self._logits = logits.detach().float()

    def take_own_primed(self, key):
        """`(input, logits, what the rules' context manager returned)` of `prime_under(key, ...)`,
        handed over once (None if there was no such pass)."""
        return self._own_primed.pop(key, None)

    def own_input_gradient(self, key, target: ResolvedTarget):
        """`(input gradient, what the rules' context manager returned)` through the graph
        `prime_under(key, ...)` kept (used once, then freed); None if there was no such pass."""
        primed = self.take_own_primed(key)
        if primed is None:
            return None
        xin, logits, recorded = primed
        with torch.enable_grad():
            (g,) = torch.autograd.grad(target.score(logits).sum(), xin, allow_unused=True)
        self.counter.add(backward=self.batch)
        return (torch.zeros_like(xin) if g is None else g.detach()), recorded

    def input_gradient(self, target: ResolvedTarget) -> torch.Tensor | None:
        """Gradient of the target w.r.t. the clean input from the primed pass (None if not primed)."""
        key = ("input", target.key())
        if key not in self._captures:
            res = self._primed_grads(target, (), True)
            if res is None:
                return None
            self._captures[key] = res
        return self._captures[key].input_grad

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = forward_logits(self.subject, self.x, self.batch_size, self.counter)
        return self._logits

    def resolve(self, target: Target) -> ResolvedTarget:
        logits = self.logits()
        if isinstance(logits, torch.Tensor) and logits.dim() >= 1 and logits.shape[0] != self.batch:
            raise SaliencyError(f"the model returned {logits.shape[0]} row(s) of scores for a batch of {self.batch} "
                                "inputs; its output must have one row per input, whatever the batch size (logits [B, classes], "
                                "or one score per example [B])")
        check_finite_output(logits, self.subject)
        if isinstance(logits, torch.Tensor) and logits.dim() > 2 and not getattr(target, "dense", False):
            raise SaliencyError(f"the model's output is dense, shape {tuple(logits.shape)}, not logits [B, classes]: "
                                f"{target!r} needs one score per class; explain a region of the output with "
                                "sk.Region(mask, label=c), sk.Pixel(y, x, label=c) or sk.OutputRegion(mask)")
        resolved = target.resolve(self.subject, logits)
        if len(resolved) != self.batch:
            raise SaliencyError(f"target resolved to {len(resolved)} examples for a batch of {self.batch}")
        return resolved

    def activations(self, layers: Sequence[str]) -> tuple[dict, torch.Tensor]:
        """Activations of `layers` on the clean input (and the logits): reuses any capture of
        these layers made in this call, else one forward pass without gradients."""
        layers = tuple(layers)
        if self._primed is not None and set(layers) <= set(self._primed_out[1]):
            return {n: self._primed_out[1][n] for n in layers}, self._primed_out[0]
        for k, res in self._captures.items():
            if k[0] not in ("forward-only", "input") and set(layers) <= set(k[0]):
                return res.activations, res.logits
        key = ("forward-only", layers)
        if key not in self._captures:
            with self.subject.capture(layers) as cap, torch.no_grad():
                logits = self.subject.forward(self.x)
                acts = {name: widen(cap.get(name).detach()) for name in cap.modules}
            self.counter.add(forward=self.batch)
            self._logits = logits.detach().float() if self._logits is None else self._logits
            self._captures[key] = GradResult(logits=widen(logits.detach()), scores=torch.zeros(0), input_grad=None,
                                             activations=acts)
        res = self._captures[key]
        return res.activations, res.logits

    def capture(self, layers: Sequence[str], target: ResolvedTarget, input_grad: bool = False) -> GradResult:
        """One forward + backward capturing `layers`, cached per (layers, target)."""
        key = (tuple(layers), target.key(), input_grad)
        if key not in self._captures:
            # a capture that already has the input gradient serves requests without it
            for k, res in self._captures.items():
                if len(k) == 3 and k[0] == tuple(layers) and k[1] == target.key() and k[2]:
                    return res
            primed = self._primed_grads(target, layers, input_grad)
            if primed is not None:
                self._captures[key] = primed
                return primed
            self._captures[key] = gradient_pass(self.subject, self.x, target, layers=layers,
                                                input_grad=input_grad, counter=self.counter)
            self._logits = self._captures[key].logits if self._logits is None else self._logits
        return self._captures[key]


def check_finite_output(logits, subject=None) -> None:
    """Refuse a clean pass whose scores are not all finite, naming the rows and classes: a NaN
    would become the top-1 class (argmax) and every map would be NaN or zero."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        return
    bad = ~torch.isfinite(logits)
    if not bad.any():
        return
    rows = bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten().tolist()
    where = []
    for r in rows[:4]:
        cols = bad[r].reshape(-1).nonzero().flatten().tolist() if bad.dim() > 1 else []
        label = getattr(subject, "label", None)
        shown = ", ".join(label(c) if callable(label) else str(c) for c in cols[:5])
        more = f" and {len(cols) - 5} more" if len(cols) > 5 else ""
        where.append(f"row {r}: {len(cols)} class(es) ({shown}{more})")
    more_rows = f"; and {len(rows) - 4} more rows" if len(rows) > 4 else ""
    raise SaliencyError(f"the model's output on the input is not finite (NaN or infinite) in "
                        f"{len(rows)} of {bad.shape[0]} rows: {'; '.join(where)}{more_rows}. No map can be made "
                        "from it: check the model (weights, numerics) and the input's scale")


def _prime_layers(ctx, layer) -> list[str]:
    items = layer if isinstance(layer, (list, tuple)) else [layer]
    if not items:
        return []  # the methods themselves report the empty list
    names = []
    for item in items:
        name = ctx.subject.find_layer(item, ctx.x)[0]
        if name not in names:
            names.append(name)
    return names


def _split_params(methods: list[type[Method]], params: dict, per_method: dict | None):
    per_method = per_method or {}
    known = set()
    for m in methods:
        known |= set(m.defaults)
    unknown = set(params) - known
    if unknown:
        names = ", ".join(m.name for m in methods)
        raise SaliencyError(f"unknown parameter(s) {sorted(unknown)} for method(s) {names}; "
                            f"accepted: {sorted(known)}")
    if not isinstance(per_method, dict):
        raise SaliencyError(f"params must be a dict of per-method dicts, e.g. {{'occlusion': {{'patch': 8}}}}, "
                            f"got {type(per_method).__name__}")
    names = {m.name for m in methods}
    for key, value in per_method.items():
        if key in names:
            continue
        if not any(method_key(r) == method_key(str(key)) for r in REGISTRY):   # another method's settings are fine
            raise SaliencyError(f"params is per method, e.g. params={{{sorted(names)[0]!r}: {{{key!r}: {value!r}}}}} "
                                f"(or {key}={value!r} as a keyword): {key!r} is not a method")
        if not isinstance(value, dict):
            raise SaliencyError(f"params[{key!r}] must be a dict of that method's settings, got {value!r}")
    out = {}
    for m in methods:
        p = {k: v for k, v in params.items() if k in m.defaults}
        extra = per_method.get(m.name, {})
        bad = set(extra) - set(m.defaults)
        if bad:
            raise SaliencyError(f"unknown parameter(s) {sorted(bad)} for {m.name}; accepted: {sorted(m.defaults)}")
        p.update(extra)
        out[m.name] = {**m.defaults, **p}
    return out


def _top_answers(ctx) -> list | None:
    """Per example (label, probability) of a classifier's top answer, read from the clean logits
    the call already computed to fix the target; None for other subjects."""
    if getattr(ctx.subject, "subject_kind", None) != "classifier":
        return None
    logits = ctx.logits()
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
        return None
    p, i = logits.detach().float().softmax(-1).max(-1)
    try:
        return [(ctx.subject.label(int(k)), float(v)) for k, v in zip(i, p)]
    except (SaliencyError, IndexError, KeyError):  # a subject without class labels
        return [(f"class {int(k)}", float(v)) for k, v in zip(i, p)]


def explain(subject, x: torch.Tensor, method="gradcam", target=None, layer="auto", seed: int | None = 0,
            batch_size: int | None = None, progress: bool = False, params: dict | None = None,
            amp: bool = False, **kwargs) -> Explanation | dict[str, Explanation]:
    """Explain `subject`'s output on `x` with one method (-> Explanation) or several (-> dict).

    Args:
        subject: a `Subject` (see `load_model`), or a bare `nn.Module` (wrapped with defaults).
        x: `[B,C,H,W]` input in the model's normalised space (`subject.preprocess(photo)`).
        method: a registered name or a list of names (`methods.available()`).
        target: a `Target` (`Class`, `Contrast`, `Group`, `TopK`), a label or index, or a per-example
            list; None explains the top-1 class of each example.
        layer: layer name / "auto" for layer methods (CAMs).
        seed: seed of every random draw; same seed, same maps. None draws a fresh seed from the
            system's entropy and records it in each randomised method's Explanation.
        batch_size: rows per forward/backward chunk (memory budget), an integer >= 1; None: sized
            automatically.
        params: per-method parameters, `{"integrated_gradients": {"steps": 128}}`.
        amp: run the model's passes under `torch.autocast` (a CPU: bfloat16, CUDA: float16) for
            speed; off by default. Maps and attributions come back in float32 and differ from the
            float32 ones by the reduced precision (see docs/performance.md, "Mixed precision");
            each Explanation records it in `extras["amp"]` (the dtype's name).
        **kwargs: parameters passed to every method that accepts them.
    """
    from ..subject import Subject

    t_call = time.perf_counter()
    if isinstance(subject, torch.nn.Module) and not isinstance(subject, Subject):
        subject = Subject(subject)
    view = getattr(target, "subject_view", None)   # a target explained on a view of the model (a Concept)
    if callable(view):
        subject, target = view(subject)
    kind = getattr(subject, "subject_kind", None)  # Subject (and its task subclasses), Detector
    if not isinstance(kind, str):
        raise SaliencyError(f"explain needs a Subject, an nn.Module or a Detector, got {type(subject).__name__}")
    if not isinstance(method, str) and (not hasattr(method, "__iter__") or isinstance(method, (bytes, dict))):
        raise SaliencyError(f"method must be given by name (or a list of names), got {type(method).__name__}")
    names = [method] if isinstance(method, str) else list(method)
    if not names:
        raise SaliencyError("no method given")
    classes = [get(n, kind) for n in names]  # every name resolved (and refused) before any pass runs
    for cls in classes:
        if sum(c is cls for c in classes) > 1:
            same = [n for n, c in zip(names, classes) if c is cls]
            raise SaliencyError(f"method {cls.name} is asked for more than once ({', '.join(map(repr, same))})")
    all_params = _split_params(classes, kwargs, params)
    if batch_size is not None:
        batch_size = positive_int(batch_size, "batch_size")
    seed = resolve_seed(seed)
    if not isinstance(amp, bool):
        raise SaliencyError(f"amp must be True or False, got {amp!r}")
    model = getattr(subject, "model", None)
    exclusive = any(cls.changes_model for cls in classes)
    lock = model_lock(model)(exclusive) if isinstance(model, torch.nn.Module) else contextlib.nullcontext()
    # gradients cannot be taken under torch.inference_mode(): the call leaves it (as it leaves
    # torch.no_grad()), and an input made under it is copied into an ordinary tensor
    with torch.inference_mode(False), lock:
        if isinstance(x, torch.Tensor) and x.is_inference():
            x = x.clone()
        x = subject.check_input(x)
        if not x.is_floating_point():   # token ids or flags: explained at the subject's embedding
            from ..embedding import embedding_view

            with subject.explaining():
                subject, x = embedding_view(subject, x, [cls.name for cls in classes])
        check_layouts(subject, x, classes)
        # the subject reads the target (a detector: Box targets); e.g. Text expands the batch to one
        # row per prompt explained for one image
        x, tgt = subject.target_for(target).expand_batch(x)
        with subject.explaining(), mixed_precision(getattr(x, "device", "cpu"), amp) as amp_dtype:
            results = _run(subject, x, classes, tgt, layer, seed, batch_size, progress, all_params, t_call)
        if amp_dtype is not None:
            for e in results.values():
                e.extras["amp"] = str(amp_dtype).replace("torch.", "")
    if isinstance(method, str):
        return results[classes[0].name]
    return results


def check_layouts(subject, x: torch.Tensor, classes) -> None:
    """Refuse, naming the layout, the methods that cannot explain an input of `x`'s layout."""
    layout_for = getattr(subject, "layout_for", None)
    layout = layout_for(x) if callable(layout_for) else "BCHW"
    refused = [cls for cls in classes if layout not in cls.layouts]
    if refused:
        kind = getattr(subject, "subject_kind", "classifier")
        able = sorted(name for name, c in REGISTRY.items() if name == c.name and layout in c.layouts and kind in c.kinds)
        works_on = sorted({lay for cls in refused for lay in cls.layouts})
        why = "".join(sorted({f" ({cls.not_for[layout]})" for cls in refused if layout in cls.not_for}))
        raise SaliencyError(f"method(s) {', '.join(cls.name for cls in refused)} cannot explain a {layout} input "
                            f"(shape {tuple(x.shape)}){why}: they work on {', '.join(works_on)} inputs; for {layout} use "
                            f"{', '.join(able) or 'none yet'}")


def _auto_layer_note(ctx, layer, classes) -> dict:
    """For layer="auto": which layer was picked and why (`extras["layer_choice"]`), and a warning
    when it is not the one the model's own input size gives (a small input ends the spatial maps early)."""
    subject = ctx.subject
    if not any(cls.uses_layer for cls in classes) or layer not in (None, "auto") or not hasattr(subject, "auto_layer"):
        return {}
    if getattr(subject, "default_layer", "auto") not in (None, "auto"):
        return {"layer_choice": f"the subject's default layer {subject.default_layer!r}"}
    picked = subject.auto_layer(ctx.x)
    if ctx.layout != "BCHW":
        return {"layer_choice": f"layer='auto' picked {picked!r}: the last layer whose output has the axes of the "
                                f"{ctx.layout} input, each longer than 1"}
    size = tuple(ctx.x.shape[-2:])
    note = {"layer_choice": f"layer='auto' picked {picked!r}: the last layer whose output is a spatial map "
                            f"(height and width > 1) at input {size[0]}x{size[1]}"}
    if size != tuple(subject.input_size):
        usual = subject.auto_layer(None)
        if usual != picked:
            import warnings

            warnings.warn(f"layer='auto' picked {picked!r}, not {usual!r} (the last spatial layer at the model's input "
                          f"size {subject.input_size[0]}x{subject.input_size[1]}): at {size[0]}x{size[1]} the later "
                          f"layers' maps are 1x1; pass layer= to choose", stacklevel=4)
            note["layer_choice"] += f"; at the model's input size it would be {usual!r}"
    return note


def _run(subject, x, classes, tgt, layer, seed, batch_size, progress, all_params, t_call) -> dict:
    results: dict[str, Explanation] = {}
    ctx = Context(subject, x, seed=seed, batch_size=batch_size, progress=progress)
    one_pass = x.shape[0] <= (batch_size or DEFAULT_BATCH)  # the clean batch fits one model call
    if one_pass and any(cls.clean_pass for cls in classes):
        layered = [cls for cls in classes if cls.clean_pass and cls.uses_layer]
        layers = _prime_layers(ctx, layer) if layered else []
        # cache-sized chunks (one probe forward per model and shape sizes them); a batch of
        # fewer than 4 rows runs whole
        chunk = batch_size or (auto_batch(subject, x.shape, grad=True, rows=x.shape[0])
                               if x.shape[0] >= 4 else None)
        # only layer methods: the clean pass needs no graph before their layer
        ctx.input_graph = any(cls.clean_pass and not cls.uses_layer for cls in classes)
        ctx.prime(layers, chunk=chunk)
        ctx.primed_users = sum(1 for cls in classes if cls.clean_pass)
    elif one_pass and classes[0].prime is not None:
        classes[0].prime(ctx)  # its own clean forward also fixes the target
    resolved = ctx.resolve(tgt)
    layer_note = _auto_layer_note(ctx, layer, classes)
    # a view's outputs (a Concept's scores) are no class probabilities: no "unsure" warning there
    top = None if getattr(subject, "is_view", False) else _top_answers(ctx)
    with Progress(len(classes), "explaining", enabled=progress, leave=True, unit="method") as bar:
        for i, cls in enumerate(classes):
            if bar.bar is not None:
                bar.bar.set_postfix_str(cls.name)
            _run_one(ctx, cls, resolved, layer, seed, all_params, t_call if i == 0 else None, layer_note, top,
                     results)
            bar.step()
    return results


def _run_one(ctx, cls, resolved, layer, seed, all_params, t_call, layer_note, top, results):
    """One method of an explain call; the first (`t_call` given) is charged the shared clean pass."""
    subject = ctx.subject
    first = t_call is not None
    if True:
        # the clean forward that fixed the target is charged to the first method, passes and time
        before = (0, 0, 0) if first else (ctx.counter.forward, ctx.counter.backward, ctx.counter.batches)
        shared_before = len(ctx._captures)
        t0 = t_call if first else time.perf_counter()
        inst = cls()
        out = inst.run(ctx, resolved, layer, **all_params[cls.name])
        seconds = time.perf_counter() - t0
        if cls.clean_pass and ctx.primed_users is not None:
            ctx.primed_users -= 1
        fwd = ctx.counter.forward - before[0]
        bwd = ctx.counter.backward - before[1]
        b = ctx.batch
        passes = {"forward": fwd / b, "backward": bwd / b, "model_calls": ctx.counter.batches - before[2]}
        extras = dict(out.get("extras", {}))
        if cls.uses_layer and len(ctx._captures) == shared_before and fwd == 0 and "layer" in out:
            extras["shared_capture"] = True  # reused the pass another method of this call made
        if cls.uses_layer and layer_note:
            extras.update(layer_note)
        described = resolved.describe()
        if all_params[cls.name].get("output") is not None:  # the output the method scored (RISE: prob)
            described = [dict(d, output=all_params[cls.name]["output"]) for d in described]
        extras["warnings"] = extras.get("warnings", []) + map_warnings(
            out.get("signed", cls.signed), out["maps"], described, all_params[cls.name], extras, top=top)
        results[cls.name] = Explanation(
            maps=out["maps"], method=cls.name, signed=out.get("signed", cls.signed),
            target=described, layer=out.get("layer"),
            # the settings asked for, with the values a method chose for those left to it (None: its default
            # for the layout) in their place, so a saved explanation says what ran
            params={**all_params[cls.name], **{k: v for k, v in out.get("used", {}).items()
                                               if all_params[cls.name].get(k) is None}},
            seed=seed if cls.randomized else None, passes=passes, seconds=seconds,
            raw=out.get("raw"), attributions=out.get("attributions"), model=subject.name, extras=extras,
            layout=ctx.layout)
