"""Metric registry, the per-evaluation context that lets metrics share passes, and results.

A metric is a class with a registry `name`, a `direction` ("higher" or "lower" is better, or
None where neither is), `needs` (what it requires besides a map: "gradients" = it re-runs the
explanation method, "masks" = ground-truth object masks, "second_class" = a contrast class or
group, "model_copy" = it randomises a copy of the model), `defaults` and `compute`.

`compute(ctx, exps, **params)` receives every explanation of the same input batch at once
(name -> Explanation) so a metric can put all their perturbed inputs into one batched run and
share the unperturbed and baseline passes, which the `EvalContext` caches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine import PassCounter, forward_logits, perturbed_scores
from ..errors import SaliencyError
from ..explanation import Explanation
from ..subject import channel_axis
from ..targets import ResolvedTarget

REGISTRY: dict[str, type["Metric"]] = {}
DIRECTIONS = ("higher", "lower", None)
NEEDS = ("gradients", "masks", "second_class", "model_copy")


def register(cls):
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no registry name")
    if cls.direction not in DIRECTIONS:
        raise TypeError(f"{cls.__name__}.direction must be one of {DIRECTIONS}")
    bad = set(cls.needs) - set(NEEDS)
    if bad:
        raise TypeError(f"{cls.__name__}.needs has unknown entries {sorted(bad)}")
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class MetricResult:
    """Scores of one metric for one explanation: one number per example, plus curves if any."""

    metric: str
    method: str
    scores: torch.Tensor                      # [B] float64
    direction: str | None
    curves: dict = field(default_factory=dict)   # {"x": [T], "y": [B,T], "xlabel", "ylabel"}
    passes: dict = field(default_factory=dict)   # forward/backward rows per example
    extras: dict = field(default_factory=dict)

    def mean(self) -> float:
        s = self.scores[torch.isfinite(self.scores)]
        return float(s.mean()) if s.numel() else float("nan")


class Metric:
    name: str = ""
    family: str = ""
    direction: str | None = "higher"
    needs: tuple = ()
    randomized: bool = False
    layouts: tuple | None = None       # the input layouts it reads (`subject.LAYOUTS`); None = all of them
    defaults: dict = {}
    description: str = ""
    cost: str = ""

    def compute(self, ctx: "EvalContext", exps: dict[str, Explanation], **params) -> dict[str, MetricResult]:
        """Default: one explanation at a time through `compute_one`."""
        return {name: self.compute_one(ctx, name, exp, **params) for name, exp in exps.items()}

    def compute_one(self, ctx: "EvalContext", name: str, exp: Explanation, **params) -> MetricResult:
        raise NotImplementedError

    def result(self, method: str, scores, curves=None, passes=None, extras=None) -> MetricResult:
        scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1).cpu()
        return MetricResult(self.name, method, scores, self.direction, curves or {},
                            passes or {"forward": 0.0, "backward": 0.0}, extras or {})

    @classmethod
    def info(cls) -> dict:
        return {"name": cls.name, "family": cls.family, "direction": cls.direction, "needs": list(cls.needs),
                "randomized": cls.randomized, "defaults": dict(cls.defaults), "description": cls.description,
                "cost": cls.cost, "layouts": list(cls.layouts) if cls.layouts else "all"}


def available() -> dict[str, dict]:
    """Registered metrics: name -> {family, direction, needs, defaults, description, cost}."""
    return {name: cls.info() for name, cls in sorted(REGISTRY.items())}


def get(name: str) -> type[Metric]:
    if not isinstance(name, str):
        raise SaliencyError(f"metric must be given by name, got {type(name).__name__}")
    key = name.lower().replace("-", "_")
    if key not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(key, sorted(REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise SaliencyError(f"unknown metric {name!r}.{hint} Available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[key]


# ------------------------------------------------------------------------------------ context
class EvalContext:
    """What all metrics of one `evaluate` call on one input batch share.

    Caches the clean logits (which fix the target), the substrate images, and the scores of the
    unperturbed and fully-perturbed inputs, so explanations of the same image share those passes.
    Shared passes are counted in `shared` and reported once.
    """

    def __init__(self, subject, x: torch.Tensor, target: ResolvedTarget, logits: torch.Tensor, seed: int = 0,
                 batch_size: int | None = None, progress: bool = False, masks: torch.Tensor | None = None,
                 shared: PassCounter | None = None, layout: str | None = None):
        self.subject = subject
        self.x = x
        self.layout = layout or subject.layout_for(x)
        self.target = target
        self.logits = logits
        self.seed = 0 if seed is None else int(seed)
        self.batch_size = batch_size
        self.progress = progress
        self.masks = masks
        self.shared = shared or PassCounter()
        self._cache: dict = {}

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def clean_scores(self, output: str = "prob") -> torch.Tensor:
        return self.target.score(self.logits, output=output)

    def substrate(self, name) -> torch.Tensor:
        key = ("substrate", name if isinstance(name, str) else id(name))
        if key not in self._cache:
            self._cache[key] = make_substrate(self.subject, self.x, name, self.layout)
        return self._cache[key]

    def substrate_scores(self, name, output: str = "prob") -> torch.Tensor:
        key = ("substrate_scores", name if isinstance(name, str) else id(name))
        if key not in self._cache:
            self._cache[key] = forward_logits(self.subject, self.substrate(name), self.batch_size, self.shared)
        return self.target.score(self._cache[key], output=output)

    @property
    def map_shape(self) -> tuple:
        """The positions of a map: the input's axes without batch and channel ((H,W), (T,), (D,H,W), (F,))."""
        return map_shape(self.x, self.layout)

    @property
    def positions(self) -> str:
        """What one position of the map is, in words ("pixels", "time steps", "voxels", "features")."""
        return POSITION_WORDS[self.layout]

    def input_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """Keep-masks over the map's positions ([k, P] or [k, *map_shape]) as masks that broadcast
        over the input's channel axis: `positions_mask`."""
        return positions_mask(keep, self.layout, self.map_shape)

    def to_input(self, maps: torch.Tensor) -> torch.Tensor:
        """Maps [B, *map_shape] spread over the input's channel axis: the shape of `x`."""
        return self.input_mask(maps).expand_as(self.x)

    def check_maps(self, exp: Explanation, what: str = "") -> torch.Tensor:
        maps = exp.maps
        layout = getattr(exp, "layout", "BCHW")
        if layout != self.layout:
            raise SaliencyError(f"explanation {exp.method!r} is of a {layout} input, but the input is {self.layout}; "
                                "score explanations of the input they were made for")
        if maps.shape[0] != self.batch:
            raise SaliencyError(f"explanation {exp.method!r} has {maps.shape[0]} maps for {self.batch} images")
        if tuple(maps.shape[1:]) != self.map_shape:
            raise SaliencyError(f"explanation {exp.method!r} maps are {tuple(maps.shape[1:])}, the input is "
                                f"{self.map_shape}; maps must be at input resolution")
        return maps.to(self.x.device).float()

    def generator(self, salt: int = 0) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + salt)
        return g

    def need_masks(self, metric: str, size) -> torch.Tensor:
        if self.masks is None:
            raise SaliencyError(f"metric {metric!r} needs ground-truth object masks or boxes (masks=...)")
        m = self.masks
        size = tuple(size)
        if m.dim() != len(size) + 1 or m.shape[0] != self.batch or tuple(m.shape[1:]) != size:
            raise SaliencyError(f"metric {metric!r}: masks have shape {tuple(m.shape)}, expected "
                                f"[{', '.join(str(v) for v in (self.batch,) + size)}] (one mask per example at "
                                "the map's size)")
        return m.bool()

    def runner(self, baseline: torch.Tensor, masks, n: int, counter: PassCounter, output: str = "prob",
               target: ResolvedTarget | None = None, x: torch.Tensor | None = None, desc: str = "") -> torch.Tensor:
        """The shared perturbation runner (`engine.perturbed_scores`) with this context's settings."""
        return perturbed_scores(self.subject, self.x if x is None else x, baseline, target or self.target, masks,
                                n, batch_size=self.batch_size, counter=counter, output=output,
                                progress=self.progress, desc=desc)


POSITION_WORDS = {"BCHW": "pixels", "BCDHW": "voxels", "BCT": "time steps", "BTCHW": "pixels", "BF": "features"}


def map_shape(x: torch.Tensor, layout: str) -> tuple:
    """The shape of one map of input `x`: its axes without the batch and the layout's channel axis."""
    axis = channel_axis(layout)
    return tuple(int(v) for i, v in enumerate(x.shape) if i != 0 and i != axis)


def positions_mask(keep: torch.Tensor, layout: str, shape) -> torch.Tensor:
    """Masks over a map's positions ([k, P] or [k, *shape]) as masks over the input that broadcast
    over its channel axis ([k,1,H,W], [k,1,T], [k,1,D,H,W], [k,T,1,H,W]; [k,F] as is): removing a
    position removes it on every channel. What the deletion-type metrics and the words remove."""
    keep = keep.reshape((keep.shape[0],) + tuple(shape))
    axis = channel_axis(layout)
    return keep if axis is None else keep.unsqueeze(axis)


def make_substrate(subject, x: torch.Tensor, name, layout: str = "BCHW") -> torch.Tensor:
    """The input removed positions are taken from / inserted onto, in the model's input space.

    "zero": zeros of the normalised space (the dataset-mean colour; RISE deletion),
    "blur": RISE insertion blur (11x11 Gaussian, sigma 5, zero padding; along time for a series,
    along depth, height and width for a volume, per frame for a clip; a feature vector has none),
    "black" (zeros outside images), "mean" (per-example, per-channel mean over the map's axes),
    or a tensor broadcastable to x.
    """
    if isinstance(name, torch.Tensor):
        try:
            return name.to(x).expand_as(x).clone()
        except RuntimeError:
            raise SaliencyError(f"substrate of shape {tuple(name.shape)} does not broadcast to {tuple(x.shape)}") \
                from None
    if name == "zero":
        return torch.zeros_like(x)
    if name == "blur":
        if layout == "BF":
            raise SaliencyError("a feature vector [B,F] has no neighbouring positions to blur over: use "
                                "substrate='zero' or 'mean' (e.g. params={'insertion': {'substrate': 'zero'}})")
        return rise_blur(x) if layout in ("BCHW", "BTCHW") else blur_axes(x, layout)
    if name == "black":
        return subject.black(x)
    if name == "mean":
        if layout == "BCHW":
            return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
        axis = channel_axis(layout)
        dims = tuple(i for i in range(1, x.dim()) if i != axis)
        return x.mean(dim=dims, keepdim=True).expand_as(x).clone()
    raise SaliencyError(f"unknown substrate {name!r}; use 'zero', 'blur', 'black', 'mean' or a tensor")


def rise_blur(x: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's insertion substrate: a Gaussian blur with an odd `size` kernel and zero padding."""
    from ..filters import gaussian_blur

    return gaussian_blur(x, sigma, radius=size // 2)


def blur_axes(x: torch.Tensor, layout: str, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's blur along every map axis of a series (time) or a volume (depth, height, width):
    the same `size` kernel and zero padding as `rise_blur`, one band matrix of `filters` per axis."""
    from ..filters import band, gaussian_kernels

    k, _ = gaussian_kernels(sigma, size // 2, x.dtype, x.device)
    out = x
    for axis in range(2, x.dim()):          # BCT and BCDHW: the map axes are all axes after C
        out = torch.movedim(torch.movedim(out, axis, -1) @ band(k, x.shape[axis]).T, -1, axis)
    return out.contiguous()


# ------------------------------------------------------------------------------------ helpers
def rank_maps(maps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[M,*map] -> [M,P] long: the rank of each position (0 = most salient), ties broken at random.

    Exact tie-breaking: a seeded random permutation, then a stable descending sort, so equal
    values end up in random (not raster) order whatever their magnitude.
    """
    flat = maps.reshape(maps.shape[0], -1).float()
    m, n = flat.shape
    perm = torch.stack([torch.randperm(n, generator=generator) for _ in range(m)]).to(flat.device)
    shuffled = torch.gather(flat, 1, perm)
    order_in_shuffled = torch.sort(shuffled, dim=1, descending=True, stable=True).indices
    order = torch.gather(perm, 1, order_in_shuffled)          # order[k] = pixel with rank k
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=flat.device).expand(m, n))
    return ranks


def normalized_auc(y: torch.Tensor) -> torch.Tensor:
    """Trapezoid area of curves [..., n+1] on an x-axis rescaled to [0,1]."""
    n = y.shape[-1] - 1
    if n < 1:
        raise SaliencyError("a curve needs at least two points")
    return (y.sum(-1) - y[..., 0] / 2 - y[..., -1] / 2) / n


def stack_maps(ctx: EvalContext, exps: dict[str, Explanation]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """All explanations' maps as one [E*B,*map] batch and the example index of each map."""
    names = list(exps)
    maps = torch.cat([ctx.check_maps(exps[n]) for n in names])
    image_of = torch.arange(ctx.batch, device=maps.device).repeat(len(names))
    return names, maps, image_of


def per_example_passes(counter: PassCounter, n_images: int, n_exps: int = 1) -> dict:
    n = max(n_images * n_exps, 1)
    return {"forward": counter.forward / n, "backward": counter.backward / n}


def target_for_rows(resolved: ResolvedTarget, rows) -> Any:
    """A `Target` that re-creates `resolved` for the example rows `rows` (to re-run a method)."""
    from ..targets import Class, Contrast, Group

    rows = [int(r) for r in rows]

    def side(s):
        if s.kind == "group":
            return Group(list(s.indices))
        if len(s.indices) != 1:
            raise SaliencyError(f"cannot re-create a {s.kind} target with {len(s.indices)} classes per row")
        return s.indices[0]

    pos = [resolved.pos[r] for r in rows]
    neg = [resolved.neg[r] for r in rows]
    out = resolved.output
    if any(s.kind == "group" for s in pos) or any(s is not None and s.kind == "group" for s in neg):
        if len({tuple(s.indices) for s in pos}) != 1 or len({None if s is None else tuple(s.indices) for s in neg}) != 1:
            raise SaliencyError("group targets must be the same for every example to be re-created")
        a = Group(list(pos[0].indices), output=out) if pos[0].kind == "group" else Class(side(pos[0]), output=out)
        if neg[0] is None:
            return a
        return Contrast(Group(list(pos[0].indices)) if pos[0].kind == "group" else side(pos[0]),
                        vs=Group(list(neg[0].indices)) if neg[0].kind == "group" else side(neg[0]), output=out)
    if all(n is None for n in neg):
        return Class([side(s) for s in pos], output=out)
    return Contrast([side(s) for s in pos], vs=[side(s) for s in neg], output=out)


def rerun_method(ctx: EvalContext, exp: Explanation, x: torch.Tensor, rows, counter: PassCounter,
                 target=None, subject=None) -> torch.Tensor:
    """Re-run the explanation's method (same parameters, layer and seed) on inputs `x` whose row i
    belongs to example `rows[i]` (on `subject`, default the context's); returns maps [N,H,W].
    Counts its passes into `counter`."""
    from ..methods import explain, get

    try:
        get(exp.method)
    except SaliencyError:
        raise SaliencyError(f"metric needs to re-run the method, but {exp.method!r} is not a registered method "
                            "(an explanation made outside the method registry cannot be re-computed)") from None
    tgt = target if target is not None else target_for_rows(ctx.target, rows)
    seed = exp.seed if exp.seed is not None else ctx.seed
    layer = exp.layer or "auto"
    params = dict(exp.params)
    new = explain(subject or ctx.subject, x, method=exp.method, target=tgt, layer=layer, seed=seed,
                  batch_size=ctx.batch_size, params={exp.method: params})
    counter.forward += int(round(new.passes.get("forward", 0) * x.shape[0]))
    counter.backward += int(round(new.passes.get("backward", 0) * x.shape[0]))
    counter.batches += int(new.passes.get("model_calls", 0))
    return new.maps.to(x.device)


def finite_or_nan(v: float) -> float:
    return v if math.isfinite(v) else float("nan")
