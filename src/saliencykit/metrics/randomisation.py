"""Model-parameter randomisation test, MPRT (Adebayo et al. 2018).

A copy of the model has its parameterised layers re-initialised from the top (logits) down:
`order="cascading"` keeps earlier randomisations (the published test), `"independent"`
randomises one stage at a time with the other layers trained. After each stage the method is
re-run (same parameters, layer, seed and class) and its map compared with the original by
Spearman correlation of |map|, Spearman of the signed map, SSIM and Pearson correlation of HOG
features (maps scaled to [0,1] for SSIM/HOG).

Score = mean Spearman(|map|) over the stages: higher means the map changes little when the model
is destroyed, i.e. it does not explain the model. A map *passes* when the score is below
`threshold` (0.5). Per-stage curves of all four similarities are kept.

Re-initialisation: each module's own `reset_parameters()` (PyTorch's default init) under a seeded
generator; normalisation layers are left alone unless `include_norm=True`. The original model is
never touched.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..engine import PassCounter
from ..errors import SaliencyError
from .base import EvalContext, Metric, per_example_passes, register, rerun_method

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def parameter_layers(model: nn.Module, include_norm: bool = False) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters, top (output) first."""
    out = []
    for name, m in model.named_modules():
        if not any(True for _ in m.parameters(recurse=False)):
            continue
        if isinstance(m, _NORMS) and not include_norm:
            continue
        out.append((name, m))
    return out[::-1]


def randomise_(module: nn.Module, seed: int):
    """Re-initialise `module`'s own parameters in place, reproducibly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            for p in module.parameters(recurse=False):
                with torch.no_grad():
                    p.normal_(0, 0.02)


def _scaled(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def similarities(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example similarity of maps a, b [B,H,W]: spearman_abs, spearman, ssim, hog. SSIM and
    HOG are image measures: maps of other shapes ([B,T], [B,D,H,W], [B,F]) get NaN there."""
    from skimage.feature import hog
    from skimage.metrics import structural_similarity

    from .complexity import pearson, spearman

    fa, fb = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    out = {"spearman_abs": spearman(fa.abs(), fb.abs()).cpu(), "spearman": spearman(fa, fb).cpu()}
    ssim, hogs = [], []
    for x, y in zip(a.double().cpu().numpy(), b.double().cpu().numpy()):
        if x.ndim != 2:
            ssim.append(float("nan"))
            hogs.append(float("nan"))
            continue
        xs, ys = _scaled(x), _scaled(y)
        ssim.append(structural_similarity(xs, ys, data_range=1.0))
        hx = hog(xs, pixels_per_cell=(max(2, xs.shape[0] // 16),) * 2, cells_per_block=(2, 2))
        hy = hog(ys, pixels_per_cell=(max(2, ys.shape[0] // 16),) * 2, cells_per_block=(2, 2))
        hogs.append(float(pearson(torch.from_numpy(hx)[None], torch.from_numpy(hy)[None])[0]))
    out["ssim"] = torch.tensor(ssim, dtype=torch.float64)
    out["hog"] = torch.tensor(hogs, dtype=torch.float64)
    # a constant map shares no ranking with a non-constant one (correlation 0), and is identical to
    # another constant map (1); correlations are otherwise undefined (NaN) there
    ca = (fa.amax(1) == fa.amin(1)).cpu()
    cb = (fb.amax(1) == fb.amin(1)).cpu()
    fill = torch.where(ca & cb, 1.0, 0.0).double()
    for k in ("spearman_abs", "spearman") + (("hog",) if a.dim() == 3 else ()):
        out[k] = torch.where(ca | cb, fill, out[k])
    return out


@register
class MPRT(Metric):
    name = "mprt"
    family = "sanity"
    direction = "lower"
    needs = ("gradients", "model_copy")
    randomized = True
    defaults = {"order": "cascading", "stages": 8, "threshold": 0.5, "include_norm": False}
    cost = "stages x the method's cost"
    description = ("Model-parameter randomisation sanity check: mean Spearman(|map|) between the original map "
                   "and the maps of a progressively randomised model copy (higher = ignores the model; passes "
                   "below the threshold). Per-layer curves of Spearman, SSIM and HOG similarity kept.")

    def compute_one(self, ctx: EvalContext, name, exp, order="cascading", stages=8, threshold=0.5,
                    include_norm=False):
        from ..subject import Subject

        if order not in ("cascading", "independent"):
            raise SaliencyError(f"mprt: order must be 'cascading' or 'independent', got {order!r}")
        maps = ctx.check_maps(exp)
        subject = ctx.subject
        base = copy.deepcopy(subject.model)
        layers = parameter_layers(base, include_norm)
        if not layers:
            raise SaliencyError("mprt: the model has no parameterised layers to randomise")
        n = max(1, min(int(stages), len(layers)))
        cuts = np.unique(np.round(np.linspace(0, len(layers), n + 1)).astype(int))
        groups = [layers[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
        B = ctx.batch
        rows = torch.arange(B, device=ctx.x.device)
        counter = PassCounter()
        per_stage: dict[str, list] = {k: [] for k in ("spearman_abs", "spearman", "ssim", "hog")}
        stage_names, stage_maps = [], []
        model = base
        for s, group in enumerate(groups):
            if order == "independent":
                model = copy.deepcopy(subject.model)
                mods = dict(model.named_modules())
                group = [(nm, mods[nm]) for nm, _ in group]
            for i, (lname, module) in enumerate(group):
                randomise_(module, ctx.seed * 7919 + s * 1000 + i)
            randomised = Subject(model, labels=subject.labels, mean=subject.mean, std=subject.std,
                                 input_size=subject.input_size, layer=subject.default_layer,
                                 name=f"{subject.name} (randomised)", groups=subject.groups,
                                 layout=getattr(subject, "layout", None))
            new = rerun_method(ctx, exp, ctx.x, rows, counter, subject=randomised)
            sims = similarities(maps, new)
            for k in per_stage:
                per_stage[k].append(sims[k])
            stage_names.append(group[-1][0] or "(root)")
            stage_maps.append(new.cpu())
        curves_y = torch.stack(per_stage["spearman_abs"], 1)              # [B, stages]
        score = curves_y.mean(1)
        return self.result(name, score,
                           curves={"x": torch.arange(1, len(groups) + 1, dtype=torch.float64), "y": curves_y,
                                   "xlabel": "layers randomised (top down)", "ylabel": "Spearman |map|"},
                           passes=per_example_passes(counter, B),
                           extras={"order": order, "threshold": threshold, "passed": (score < threshold).tolist(),
                                   "stages": stage_names, "layers_per_stage": [len(g) for g in groups],
                                   "similarity": {k: torch.stack(v, 1).tolist() for k, v in per_stage.items()},
                                   "maps": torch.stack(stage_maps, 1), "original": maps.cpu()})


def plot_mprt(ev, path, image: int = 0, photo=None):
    """Figure of an `evaluate(..., metrics=["mprt"])` result: rows = randomisation stages (original
    first), columns = methods."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..explanation import normalize_maps
    from ..files import atomic_write

    res = ev["mprt"]
    methods = list(res)
    first = res[methods[0]]
    stages = first.extras["stages"]
    fig, axes = plt.subplots(len(stages) + 1, len(methods), figsize=(1.9 * len(methods), 1.7 * (len(stages) + 1)),
                             squeeze=False)
    for j, m in enumerate(methods):
        r = res[m]
        stack = [r.extras["original"][image]] if "original" in r.extras else []
        stack += [r.extras["maps"][image, s] for s in range(len(stages))]
        for i, mp in enumerate(stack):
            ax = axes[i + (0 if "original" in r.extras else 1)][j]
            ax.imshow(normalize_maps(mp.abs()[None])[0].numpy(), cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][j].set_title(f"{m}\nscore {r.mean():.2f}", fontsize=8)
    axes[0][0].set_ylabel("original", fontsize=7)
    for i, s in enumerate(stages):
        axes[i + 1][0].set_ylabel(f"→ {s}", fontsize=6)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda p: fig.savefig(p, dpi=90, format="png"))
    finally:
        plt.close(fig)
