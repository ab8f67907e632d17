"""`Subject`: a model wrapped with what explaining it needs.

A Subject knows how to turn photos into the model's input tensor, how to read logits out of
whatever the model returns, the class names, and how to find and capture internal layers.
Every method runs inside `Subject.explaining()`, which puts the model in eval mode, turns off
in-place activations (they overwrite captured tensors) and restores everything on exit, even
after an exception.
"""
from __future__ import annotations

import contextlib
import difflib
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .errors import SaliencyError
from .hooks import model_lock, this_thread_only

from .images import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess, load_image  # noqa: F401  (re-exported)


# The input layouts a Subject explains: name -> (axes after the batch axis, the channel axis or
# None, whether the input is a normalised image). Maps keep every axis but the channel axis.
LAYOUTS = {
    "BCHW": ("CHW", 1, True),      # images
    "BCDHW": ("CDHW", 1, False),   # volumes (CT, MRI): tensors as given
    "BCT": ("CT", 1, False),       # series: channels x time steps
    "BTCHW": ("TCHW", 2, True),    # clips: frames of normalised images
    "BF": ("F", None, False),      # flat feature vectors (tabular)
}


def check_layout(layout) -> str:
    """A layout name in canonical spelling, or a SaliencyError naming the known ones."""
    key = layout.upper() if isinstance(layout, str) else layout
    if key not in LAYOUTS:
        raise SaliencyError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    return key


def channel_axis(layout: str | None) -> int | None:
    """The channel axis of `layout` (1 for BCHW, 2 for BTCHW, None for flat inputs)."""
    return LAYOUTS[layout or "BCHW"][1]


def extract_logits(output, dense: bool = False) -> torch.Tensor:
    """Find the scores in a model's output: a tensor, a tuple/list, a dict or a ModelOutput.

    Logits `[B, classes]` as they are; one score per example `[B]` as `[B, 1]` (explained as that
    score). With `dense=True` (what `Subject.forward` asks) an output with more axes is kept as it
    is, for the dense targets to read: segmentation `[B,K,H,W]` (also under torchvision's `"out"`
    key), an image-to-image model's `[B,C,H,W]`, a mask without a class axis `[B,H,W]`.
    """
    if isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(output, dict) or hasattr(output, "keys"):
        keys = list(output.keys())
        for key in ("logits", "logits_per_image", "scores", "out", "output"):
            if key in keys and isinstance(output[key], torch.Tensor):
                logits = output[key]
                break
        else:
            raise SaliencyError(
                f"model output not understood: a mapping with keys {keys} and no 'logits' tensor; "
                "wrap the model so it returns logits [B, classes]")
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    else:
        raise SaliencyError(
            f"model output not understood: got {type(output).__name__}; expected logits [B, classes], "
            "a tuple whose first item is logits, or a dict/ModelOutput with 'logits'")
    if logits.dim() == 1:
        return logits.unsqueeze(1)
    if logits.dim() == 2 or (dense and logits.dim() > 2):
        return logits
    raise SaliencyError(
        f"model output not understood: logits should be [B, classes], got shape {tuple(logits.shape)}")


# model -> [calls inside `Subject.explaining()`, training flags, in-place flags] as the first call
# found them: the last call to leave restores them, so overlapping calls from several threads
# never restore a state another one is still running under
_EXPLAINING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_EXPLAINING_LOCK = threading.Lock()


@dataclass
class _Recording:
    outputs: list = field(default_factory=list)


class LayerCapture:
    """Forward hooks that keep the outputs of named layers (every call, in order).

    Gradients are taken afterwards with `torch.autograd.grad(score, captured)`, never with
    module backward hooks (those break under in-place ops that follow the module).
    A module called several times in one forward (a shared activation) keeps every call;
    `call=-1` (default) selects the last one.

    With `graph_from=k` (and `call=-1`), the forward is expected to run without autograd (under
    `torch.no_grad()`): from the module's k-th call (0-based) on, each call switches autograd on
    for the rest of this thread's forward and hands on (and keeps) a copy of a fresh leaf. The graph then starts at the layer instead of the input; gradients w.r.t. the
    kept output are the same numbers, and the part of the forward before it records nothing.
    """

    def __init__(self, modules: dict[str, nn.Module], call: int = -1, keep_graph: bool = True,
                 graph_from: int | None = None):
        self.modules = modules
        self.call = call
        self.graph_from = graph_from
        self.records = {name: _Recording() for name in modules}
        self._handles = []

    def __enter__(self):
        for name, module in self.modules.items():
            rec = self.records[name]

            def hook(_mod, _inp, out, rec=rec):
                first = out[0] if isinstance(out, (tuple, list)) and out else out
                if (self.graph_from is None or len(rec.outputs) < self.graph_from
                        or not isinstance(first, torch.Tensor) or not first.is_floating_point()):
                    rec.outputs.append(out)
                    return None
                torch.set_grad_enabled(True)   # this thread only; the caller's no_grad restores it
                # a copy of the graph's new leaf goes on and is kept: an in-place op after the layer
                # (DenseNet's relu_ on `features`) then changes the kept tensor just as it does in a
                # pass with the graph from the input, and an in-place op on a leaf would raise
                ahead = first.detach().requires_grad_(True).clone()
                rec.outputs.append(ahead)
                if not isinstance(out, (tuple, list)):
                    return ahead
                items = [ahead, *out[1:]]
                return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)

            self._handles.append(module.register_forward_hook(this_thread_only(hook)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def clear(self):
        for rec in self.records.values():
            rec.outputs.clear()

    def get(self, name: str) -> torch.Tensor:
        outs = self.records[name].outputs
        if not outs:
            raise SaliencyError(f"layer {name!r} was not called during the forward pass")
        out = outs[self.call]
        if isinstance(out, (tuple, list)):
            out = out[0]
        if hasattr(out, "keys") and not isinstance(out, torch.Tensor):
            out = next(v for v in out.values() if isinstance(v, torch.Tensor))
        if not isinstance(out, torch.Tensor):
            raise SaliencyError(f"layer {name!r} does not output a tensor (got {type(out).__name__})")
        return out


ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                  nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


class Subject:
    """An `nn.Module` plus what explaining it needs.

    Args:
        model: the classifier; must map `[B,C,H,W]` to logits (or a tuple/dict holding them).
        preprocess: callable from a photo (path / PIL / array) to a `[C,H,W]` tensor. Default:
            resize to `input_size` and normalise with `mean`/`std` (ImageNet statistics).
        labels: class names, index = class id.
        mean, std: the per-channel normalisation, used for baselines ("black" image) and display.
        layer: the default layer for layer methods (name), or "auto".
        name: a short name shown in reports.
        layout: the input's axes: "BCHW" (images, the default for 4-D inputs), "BCDHW" (volumes),
            "BCT" (series), "BTCHW" (clips of frames) or "BF" (flat feature vectors; an `[F]`
            input is a batch of one). None infers it from each input's number of axes and refuses
            an input it cannot tell (a 5-D tensor could be a volume or a clip). Only images and
            clips are normalised with `mean`/`std`; the other layouts are explained as given.
        fast: how forward-only runs of many perturbed inputs (occlusion, RISE, Score-CAM,
            deletion, ...) may run the model on a CPU (see `saliencykit.inference`): None or True
            (default) times the eager model, channels-last input and a frozen trace once per
            model and shape and keeps the fastest that is safe; False keeps the model eager;
            "channels_last" or "frozen" picks that form without timing.
        embedding: for a model whose input is integers or bools (token ids `[B,T]`, flags), the name
            of its `nn.Embedding` (or of the module whose output is the first float tensor): such
            inputs are explained at that module's output, one value per position (`embedding.py`).
        baseline_token: with `embedding`, the id whose embedding is the "black" baseline (IG's);
            None: zeros in embedding space.
        feature_names: for flat feature vectors (layout "BF"), one name per feature, read by
            `sk.verbalize` and shown in reports; checked against the input's number of features
            when it is explained.
    """

    subject_kind = "classifier"  # which methods run on it (`Method.kinds`); a detector is another kind

    def __init__(self, model: nn.Module, preprocess: Callable | None = None,
                 labels: Sequence[str] | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 input_size=(224, 224), layer: str = "auto", name: str | None = None,
                 device: str | torch.device | None = None, groups: dict | None = None,
                 fast: bool | str | None = None, layout: str | None = None, embedding: str | None = None,
                 baseline_token: int | None = None, feature_names: Sequence[str] | None = None):
        if not isinstance(model, nn.Module):
            raise SaliencyError(f"Subject needs a torch.nn.Module, got {type(model).__name__}")
        check_embedding(model, embedding, baseline_token)
        self.embedding, self.baseline_token = embedding, baseline_token
        self.model = model
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.input_size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        self._preprocess = preprocess or ImagePreprocess(self.input_size, self.mean, self.std)
        self.labels = list(labels) if labels is not None else None
        self.default_layer = layer
        self.name = name or type(model).__name__
        self.groups = dict(groups or {})
        self.label_aliases: dict[str, int] = {}
        if device is not None:
            self.model.to(device)
        self._auto_layer_cache: dict[tuple, str] = {}
        self.grid_fn: Callable | None = None
        self.fast = fast
        self.layout = None if layout is None else check_layout(layout)
        if feature_names is not None and (isinstance(feature_names, str) or self.layout not in (None, "BF")):
            raise SaliencyError(f"feature_names must be a list of names for a layout='BF' subject (flat feature "
                                f"vectors), got {type(feature_names).__name__} on layout {self.layout!r}")
        self.feature_names = None if feature_names is None else [str(v) for v in feature_names]

    # ----------------------------------------------------------------------------- basics
    def __repr__(self):
        n = len(self.labels) if self.labels else "?"
        return f"Subject({self.name}, classes={n}, layer={self.default_layer!r})"

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        for b in self.model.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating dtype (of its first floating parameter): what probe inputs use."""
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    @property
    def in_channels(self) -> int:
        return len(self.mean)

    def layout_for(self, x: torch.Tensor) -> str:
        """The layout of input `x`: the declared one (checked against `x`'s axes) or the one its
        number of axes tells; a SaliencyError when it does not match or cannot be told."""
        dims = x.dim()
        declared = getattr(self, "layout", None)
        if declared is not None:
            want = len(LAYOUTS[declared][0]) + 1
            if dims != want and not (declared == "BF" and dims == 1):
                hint = (" (add a batch dimension: x.unsqueeze(0))" if dims == want - 1 else "")
                raise SaliencyError(f"the subject's layout is {declared} ({want} axes) but the input has "
                                    f"{dims}: shape {tuple(x.shape)}{hint}; give a {declared} tensor or "
                                    "declare the input's layout with Subject(model, layout=...)")
            return declared
        if dims == 4:
            return "BCHW"
        if dims == 2:
            return "BF"
        if dims == 3:
            if x.shape[0] == self.in_channels and tuple(x.shape[-2:]) == tuple(self.input_size):
                return "BCHW"  # an image without its batch axis: check_input says what to do
            return "BCT"
        if dims == 5:
            c = self.in_channels
            if x.shape[1] == c and x.shape[2] != c:
                return "BCDHW"
            if x.shape[2] == c and x.shape[1] != c:
                return "BTCHW"
            raise SaliencyError(f"a 5-D input {tuple(x.shape)} may be a volume [B,C,D,H,W] or a clip "
                                "[B,T,C,H,W]: declare which with Subject(model, layout='BCDHW') or layout='BTCHW'")
        raise SaliencyError(f"input must have 4 dimensions [B,C,H,W] (or declare another layout with "
                            f"Subject(model, layout=...): {', '.join(LAYOUTS)}); got shape {tuple(x.shape)}")

    def _channel_view(self, x: torch.Tensor, values) -> torch.Tensor:
        """Per-channel `values` shaped to broadcast over `x` along its layout's channel axis."""
        axis = channel_axis(self.layout_for(x))
        shape = [1] * x.dim()
        shape[axis] = -1
        return torch.tensor(values, device=x.device, dtype=x.dtype).view(shape)

    def _is_image(self, x: torch.Tensor) -> bool:
        return LAYOUTS[self.layout_for(x)][2]

    def preprocess(self, images) -> torch.Tensor:
        """Photo(s) -> `[B,C,H,W]` float tensor on the model's device."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise SaliencyError("no images given")
        tensors = [self._preprocess(im) for im in images]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise SaliencyError(f"preprocessed images differ in shape {sorted(shapes)}; use a fixed input size")
        return torch.stack(tensors).to(self.device)

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input -> pixel values in [0,1] (a series, volume or feature vector as it is)."""
        if not self._is_image(x):
            return x
        return (x * self._channel_view(x, self.std) + self._channel_view(x, self.mean)).clamp(0, 1)

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel values in [0,1] -> the model's normalised input space (other layouts: as they are,
        so the "black" baseline of a series or a volume is zeros)."""
        if not self._is_image(pixels):
            return pixels
        return (pixels - self._channel_view(pixels, self.mean)) / self._channel_view(pixels, self.std)

    def black(self, x: torch.Tensor) -> torch.Tensor:
        """The black image in the model's input space (not zeros: zeros are the mean colour)."""
        return self.normalize_pixels(torch.zeros_like(x))

    def target_for(self, target):
        """The `Target` that `target` (a Target, a label or index, a per-example list, None for
        the top-1 class) means for this subject."""
        from .targets import as_target

        return as_target(target)

    def check_input(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise SaliencyError(f"input must be a torch.Tensor [B,C,H,W]; got {type(x).__name__} "
                                "(use subject.preprocess(image) for photos)")
        if not x.is_floating_point() and not x.is_complex():   # token ids, flags: through the embedding
            return check_ids(self, x)
        if getattr(self, "embedding", None) is not None:
            raise SaliencyError(f"input is {x.dtype}, but this subject reads token ids or flags through its "
                                f"embedding {self.embedding!r}: give the integer (or bool) input the model takes, "
                                "or make the Subject without embedding= for a float input")
        layout = self.layout_for(x)
        if layout == "BCHW" and x.dim() != 4:
            hint = " (add a batch dimension: x.unsqueeze(0))" if x.dim() == 3 else ""
            raise SaliencyError(f"input must have 4 dimensions [B,C,H,W]; got shape {tuple(x.shape)}{hint}")
        if layout == "BF" and x.dim() == 1:
            x = x.unsqueeze(0)  # one feature vector: a batch of one
        names = getattr(self, "feature_names", None)
        if names is not None and (layout != "BF" or x.shape[-1] != len(names)):
            raise SaliencyError(f"the subject has {len(names)} feature_names but the input is {tuple(x.shape)} "
                                f"(layout {layout}): give [B,{len(names)}] feature vectors, or one name per feature")
        axis = channel_axis(layout)
        if LAYOUTS[layout][2] and x.shape[axis] != self.in_channels:
            raise SaliencyError(f"input has {x.shape[axis]} channels; the model expects {self.in_channels}")
        if not x.is_floating_point():
            raise SaliencyError(f"input must be a floating-point tensor, got {x.dtype}")
        if x.shape[0] == 0:
            raise SaliencyError("input batch is empty")
        if x.is_meta:
            raise SaliencyError("input is on the meta device: it has a shape but no values; make it on a real "
                                "device (subject.preprocess(photo) or torch.tensor(...))")
        device = self.device
        if device.type == "meta":
            raise SaliencyError(f"{self.name}'s weights are on the meta device (not loaded): load them "
                                "(model.to_empty(...) then load_state_dict, or load with weights) before explaining")
        if not torch.isfinite(x).all():
            raise SaliencyError("input contains NaN or infinite values")
        dtype = None if x.dtype == self.dtype else self.param_dtype()  # the common case costs one parameter
        if dtype is not None and x.dtype != dtype:
            # the model computes in its own dtype: a float16 / bfloat16 / float64 input would fail inside
            # torch ("expected scalar type"); the input is cast, with a note when the cast loses precision
            if torch.finfo(x.dtype).bits > torch.finfo(dtype).bits:
                import warnings

                warnings.warn(f"input of dtype {x.dtype} cast to the model's {dtype}", stacklevel=3)
            x = x.to(dtype)
        return x.to(device)

    def param_dtype(self) -> torch.dtype | None:
        """The dtype of the model's floating parameters, or None when it has none (or several)."""
        found = {p.dtype for p in self.model.parameters() if p.is_floating_point()}
        return found.pop() if len(found) == 1 else None

    # --------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the model and return logits `[B, classes]`."""
        return extract_logits(self.model(x), dense=True)

    __call__ = forward

    @torch.no_grad()
    def predict(self, x: torch.Tensor, k: int = 5) -> list[list[dict]]:
        """Top-k classes per example: `[{"index", "label", "prob"}, ...]`."""
        x = self.check_input(x)
        with self.explaining(), torch.no_grad():
            logits = self.forward(x)
        return self.top_classes(logits, k)

    def top_classes(self, logits: torch.Tensor, k: int = 5) -> list[list[dict]]:
        """`predict` of logits already computed (no second forward): top-k classes per example."""
        if logits.dim() != 2:
            raise SaliencyError(f"predict reads class scores [B, classes]; the model's output is dense, shape "
                                f"{tuple(logits.shape)}")
        probs = logits.detach().float().softmax(-1)
        top = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[{"index": int(i), "label": self.label(int(i)), "prob": float(p)}
                 for p, i in zip(ps, idx)] for ps, idx in zip(top.values, top.indices)]

    # ---------------------------------------------------------------------------- labels
    def label(self, index: int) -> str:
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return f"class {index}"

    def class_index(self, label, num_classes: int | None = None) -> int:
        """Resolve a class given as index or name (case-insensitive; aliases allowed)."""
        n = num_classes if num_classes is not None else (len(self.labels) if self.labels else None)
        if isinstance(label, (bool, np.bool_)) or (isinstance(label, torch.Tensor) and label.dtype == torch.bool):
            raise SaliencyError(f"a class must be an index or a label, got the boolean {bool(label)!r} "
                                "(it would be read as class 0 or 1)")
        if isinstance(label, (int, np.integer)) or (isinstance(label, torch.Tensor) and label.numel() == 1):
            idx = int(label)
            if n is not None and not 0 <= idx < n:
                raise SaliencyError(f"class index {idx} is out of range: the model has {n} classes (0..{n - 1})")
            if idx < 0:
                raise SaliencyError(f"class index {idx} is negative")
            return idx
        if isinstance(label, str):
            if label.strip().lstrip("-").isdigit():
                return self.class_index(int(label), n)
            key = _norm_label(label)
            if self.labels:
                for i, name in enumerate(self.labels):
                    if _norm_label(name) == key:
                        return i
            if key in self.label_aliases:
                return self.label_aliases[key]
            candidates = ([*self.labels] if self.labels else []) + list(self.label_aliases)
            if not candidates:
                raise SaliencyError(f"class {label!r} given by name but the model has no class names; use an index")
            # labels and their synonyms overlap: each candidate once, in first-seen order
            close = difflib.get_close_matches(key, list(dict.fromkeys(_norm_label(c) for c in candidates)),
                                              n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise SaliencyError(f"unknown class label {label!r}{hint}")
        raise SaliencyError(f"a class must be an index or a label, got {type(label).__name__}")

    # ---------------------------------------------------------------------------- layers
    def named_layers(self) -> dict[str, nn.Module]:
        return dict(self.model.named_modules())

    def find_layer(self, layer, x: torch.Tensor | None = None) -> tuple[str, nn.Module]:
        """Resolve a layer given by name, module, or "auto" to `(name, module)`."""
        if layer is None or layer == "auto":
            if self.default_layer not in (None, "auto"):
                return self.find_layer(self.default_layer)
            return self.find_layer(self.auto_layer(x))
        if isinstance(layer, str) and layer:
            try:    # a name: one walk down its path, not a dict of every module (1.5 ms a call on Lite0)
                return layer, self.model.get_submodule(layer)
            except AttributeError:
                pass
        modules = self.named_layers()
        if isinstance(layer, nn.Module):
            for name, mod in modules.items():
                if mod is layer:
                    return name, mod
            raise SaliencyError("the given layer module is not part of the model")
        if not isinstance(layer, str):
            raise SaliencyError(f"layer must be a name, a module or 'auto'; got {type(layer).__name__}")
        if layer in modules:
            return layer, modules[layer]
        # DataParallel / DistributedDataParallel keep the real model under `module.`
        for alt in (f"module.{layer}", layer[len("module."):] if layer.startswith("module.") else None):
            if alt and alt in modules:
                return alt, modules[alt]
        close = difflib.get_close_matches(layer, [n for n in modules if n], n=5, cutoff=0.4)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise SaliencyError(f"layer {layer!r} not found in {self.name}{hint}")

    def auto_layer(self, x: torch.Tensor | None = None) -> str:
        """The last module, in execution order, whose output is a spatial map (4-D, h,w > 1),
        adaptive pooling layers excepted.

        That is the last convolutional feature map before global pooling: the standard
        Grad-CAM layer. Found with one dry forward pass on a probe input. For a series or a
        volume: the last module whose output has the input's axes (each longer than 1).
        """
        if x is not None and self.layout_for(x) not in ("BCHW",):
            return self._auto_layer_along_axes(x)
        size = tuple(x.shape[-2:]) if x is not None else self.input_size
        if size in self._auto_layer_cache:
            return self._auto_layer_cache[size]
        from .tokens import token_auto_layer  # Vision Transformers: the last block's first LayerNorm

        token_layer = token_auto_layer(self)
        if token_layer is not None:
            self._auto_layer_cache[size] = token_layer
            return token_layer
        probe = torch.zeros(1, self.in_channels, *size, device=self.device, dtype=self.dtype)
        finished = self._map_layers(probe)
        if not finished:
            raise SaliencyError(f"no layer with a spatial output found in {self.name}; pass layer=NAME")
        # Prefer the deepest-named module among those that finished last with the same tensor:
        # the container `layer4` and its last child end together; either gives the same map.
        name = finished[-1]
        self._auto_layer_cache[size] = name
        return name

    def _map_layers(self, probe: torch.Tensor, frames: int | None = None) -> list[str]:
        """The modules, in the order they finish in one dry forward of `probe`, whose output has
        the probe's axes, each longer than 1 (a spatial map of an image, a series, a volume), or,
        given the `frames` of a one-clip probe, is a frame-by-frame map [frames,C,h,w].
        Adaptive pooling is never one: it resamples to a fixed grid (VGG's 7x7 `avgpool` copies a
        2x2 map at 64 px), so its output has the axes but adds no location evidence."""
        finished: list[str] = []
        dims = probe.dim()

        def make_hook(name):
            def hook(_m, _i, out):
                if isinstance(out, torch.Tensor) and out.dim() == dims and all(n > 1 for n in out.shape[2:]):
                    finished.append(name)
                elif (frames is not None and isinstance(out, torch.Tensor) and out.dim() == 4
                      and out.shape[0] == frames and all(n > 1 for n in out.shape[2:])):
                    finished.append(name)
            return hook

        handles = [mod.register_forward_hook(this_thread_only(make_hook(name)))
                   for name, mod in self.model.named_modules() if name and not isinstance(mod, ADAPTIVE_POOLS)]
        try:
            with self.explaining(), torch.no_grad():
                self.forward(probe)
        finally:
            for h in handles:
                h.remove()
        return finished

    def _auto_layer_along_axes(self, x: torch.Tensor) -> str:
        key = (self.layout_for(x), tuple(x.shape[1:]))
        if key in self._auto_layer_cache:
            return self._auto_layer_cache[key]
        finished = self._map_layers(torch.zeros_like(x[:1]), frames=x.shape[1] if key[0] == "BTCHW" else None)
        if not finished:
            raise SaliencyError(f"no layer of {self.name} outputs a map with the axes of the {key[0]} input; "
                                "pass layer=NAME")
        self._auto_layer_cache[key] = finished[-1]
        return finished[-1]

    def capture(self, layers: Sequence[str], call: int = -1, graph_from: int | None = None) -> LayerCapture:
        modules = {}
        for layer in layers:
            name, mod = self.find_layer(layer)
            modules[name] = mod
        return LayerCapture(modules, call=call, graph_from=graph_from)

    def tokens_to_grid(self, tokens: torch.Tensor, input_hw, layer: str | None = None) -> torch.Tensor:
        """Token output [B, P+N, D] of a ViT-like layer -> [B, D, h, w], dropping P prefix tokens.

        Uses `self.grid_fn` when set (the `tokens_to_grid=` override); otherwise reads the patch size
        from the model's patch-embedding conv (or `self.patch_size`), so P = N - (H//p)(W//p); with no
        such conv, searches N = (H/p)(W/p) for an integer patch p, P in 0..8 (see `saliencykit.vit`).
        """
        if getattr(self, "grid_fn", None) is not None:
            grid = self.grid_fn(tokens)
            if not isinstance(grid, torch.Tensor) or grid.dim() != 4 or grid.shape[0] != tokens.shape[0]:
                got = tuple(grid.shape) if isinstance(grid, torch.Tensor) else type(grid).__name__
                raise SaliencyError(f"subject.grid_fn returned {got} for tokens {tuple(tokens.shape)} of layer "
                                    f"{layer!r}; it must return [B, D, h, w]")
            return grid
        from .tokens import grid_of  # patch size read from the patch-embedding conv, else a search

        b, n, d = tokens.shape
        prefix, h, w = grid_of(self, n, tuple(input_hw), layer)
        return tokens[:, prefix:].reshape(b, h, w, d).permute(0, 3, 1, 2)

    # ------------------------------------------------------------------- state handling
    @contextlib.contextmanager
    def explaining(self) -> Iterator["Subject"]:
        """Eval mode and no in-place activations for the duration; everything restored after.

        Calls may overlap (several threads explaining with one model): the first to enter records
        the flags, the last to leave restores them.
        """
        model = self.model
        lock = model_lock(model)
        lock.acquire(exclusive=False)  # a method changing the weights waits until this call is done
        with _EXPLAINING_LOCK:
            state = _EXPLAINING.get(model)
            if state is None:
                modules = list(model.modules())
                training = {m: m.training for m in modules}
                inplace = [m for m in modules if _inplace_on(m)]
                for m in inplace:
                    m.inplace = False
                if any(training.values()):  # through train(False), which a model may override
                    model.eval()
                state = _EXPLAINING[model] = [0, training, inplace]
            state[0] += 1
        try:
            yield self
        finally:
            with _EXPLAINING_LOCK:
                state[0] -= 1
                if state[0] == 0:
                    del _EXPLAINING[model]
                    for m, was in state[1].items():
                        if m.training is not was:  # setting a module attribute is slow: only the changed
                            m.training = was
                    for m in state[2]:
                        m.inplace = True
            lock.release()

    def state_fingerprint(self) -> dict:
        """What must be identical before and after an explanation (used by tests)."""
        m = self.model
        return {
            "training": [mod.training for mod in m.modules()],
            "requires_grad": [p.requires_grad for p in m.parameters()],
            "grads": [None if p.grad is None else p.grad.clone() for p in m.parameters()],
            "params": [p.detach().clone() for p in m.parameters()],
            "buffers": [b.detach().clone() for b in m.buffers()],
            "hooks": count_hooks(m),
            "inplace": [getattr(mod, "inplace", None) for mod in m.modules()],
        }


def check_embedding(model: nn.Module, name, baseline_token) -> None:
    """Refuse, with the fix, an embedding name the model does not have or a bad baseline token."""
    if name is None:
        if baseline_token is not None:
            raise SaliencyError("baseline_token needs an embedding: "
                                "Subject(model, embedding='<its name>', baseline_token=...)")
        return
    modules = dict(model.named_modules())
    if not isinstance(name, str) or name not in modules or name == "":
        close = difflib.get_close_matches(str(name), [n for n in modules if n], n=3, cutoff=0.4)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise SaliencyError(f"embedding {name!r} is not a module of the model: give the name of its nn.Embedding "
                            f"(or of the module whose output is the first float tensor){hint}")
    if baseline_token is not None and (isinstance(baseline_token, bool) or not isinstance(baseline_token, int)
                                       or baseline_token < 0):
        raise SaliencyError(f"baseline_token must be a token id (an int >= 0), got {baseline_token!r}")


def check_ids(subject, ids: torch.Tensor) -> torch.Tensor:
    """An integer or bool input kept as given (on the model's device), or a SaliencyError with the fix."""
    name = getattr(subject, "embedding", None)
    if name is None:
        raise SaliencyError(f"input is {ids.dtype}: integer and bool inputs (token ids, flags) are explained at the "
                            "output of the model's embedding layer; name it: Subject(model, embedding='<name of the "
                            "nn.Embedding>'); or give a floating-point tensor")
    if ids.dim() < 2:
        raise SaliencyError(f"token ids must have a batch axis, [B,T]; got shape {tuple(ids.shape)} "
                            "(add one: ids.unsqueeze(0))")
    if ids.shape[0] == 0:
        raise SaliencyError("input batch is empty")
    if ids.is_complex():
        raise SaliencyError(f"input must be real: token ids, flags or floats, got {ids.dtype}")
    return ids.to(subject.device)


def _inplace_on(m: nn.Module) -> bool:
    """Whether `m` has a boolean `inplace` flag that is on. The attribute is looked up only where the
    module's instance or class has it: a failed `getattr` goes through `nn.Module.__getattr__` and
    an exception, which on every module of a large model cost a millisecond per explain call."""
    if "inplace" not in m.__dict__ and not hasattr(type(m), "inplace"):
        return False
    v = getattr(m, "inplace", None)
    return isinstance(v, bool) and v


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs")


def count_hooks(model: nn.Module) -> int:
    """Hooks on the model's modules. Read from each module's own `__dict__` (where `nn.Module`
    keeps them): the perturbation runner asks before every chunk, and `getattr` on every module
    of EfficientNet-Lite0 cost 1.3 ms per ask (3 % of a deletion curve)."""
    total = 0
    for m in model.modules():
        d = m.__dict__
        for attr in _HOOK_DICTS:
            hooks = d.get(attr)
            if hooks:
                total += len(hooks)
    return total


def _norm_label(s: str) -> str:
    return " ".join(s.lower().replace("_", " ").replace("-", " ").split())
