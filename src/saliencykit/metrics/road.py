"""ROAD: RemOve And Debias with noisy linear imputation (Rong et al. 2022).

Removed pixels are filled by solving, per channel, the sparse system that makes each removed
pixel the weighted mean of its 8 neighbours (weights 1/6 direct, 1/12 diagonal; neighbours
outside the image dropped), then adding `noise * N(0,1)`. Imputation runs on pixel values in
[0,1]; the result is normalised back into the model's input space and scored through the
shared perturbation runner.

`road_morf` at level p removes the p most relevant pixels (lower curve = better);
`road_lerf` at level p removes the p *least* relevant pixels (higher = better). Level p is the
fraction removed in both, so for a random map the two curves coincide in expectation. (The
reference code's LeRF level p keeps the top p instead; its level p is our 1 - p.)
"""
from __future__ import annotations

import numpy as np
import torch

from ..engine import PassCounter
from ..errors import SaliencyError
from ..targets import ResolvedTarget
from .base import EvalContext, Metric, per_example_passes, rank_maps, register, stack_maps

_NEIGHBOURS = [(-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
               (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12)]


def noisy_linear_impute(image: np.ndarray, removed: np.ndarray, noise: float = 0.01,
                        rng: np.random.Generator | None = None) -> np.ndarray:
    """Fill `removed` [H,W] pixels of `image` [C,H,W] by noisy linear imputation."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import splu

    image = np.asarray(image, dtype=np.float64)
    C, H, W = image.shape
    removed = np.asarray(removed, dtype=bool)
    if removed.shape != (H, W):
        raise SaliencyError(f"removal mask is {removed.shape}, image is {(H, W)}")
    out = image.copy()
    n = int(removed.sum())
    if n == 0:
        return out
    index = -np.ones((H, W), dtype=np.int64)
    rr, cc = np.nonzero(removed)
    index[rr, cc] = np.arange(n)
    diag = np.zeros(n)
    rhs = np.zeros((C, n))
    rows, cols, vals = [], [], []
    for dr, dc, w in _NEIGHBOURS:
        nr, nc = rr + dr, cc + dc
        inside = (nr >= 0) & (nr < H) & (nc >= 0) & (nc < W)
        i = np.nonzero(inside)[0]
        diag[i] += w
        nbr, nbc = nr[i], nc[i]
        unknown = removed[nbr, nbc]
        iu = i[unknown]
        rows.append(iu)
        cols.append(index[nbr[unknown], nbc[unknown]])
        vals.append(np.full(iu.shape[0], -w))
        ik = i[~unknown]
        rhs[:, ik] += w * image[:, nbr[~unknown], nbc[~unknown]]
    rows.append(np.arange(n))
    cols.append(np.arange(n))
    vals.append(diag)
    A = csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    sol = splu(A).solve(rhs.T.copy())          # one factorisation serves every channel
    if noise:
        rng = rng or np.random.default_rng(0)
        sol = sol + noise * rng.standard_normal(sol.shape)
    out[:, rr, cc] = sol.T
    return out


class _HitRecorder:
    """Scores like the wrapped target and records whether the top-1 class is still the target's."""

    def __init__(self, target: ResolvedTarget, classes: torch.Tensor):
        self.target, self.classes, self.hits = target, classes, []

    def score(self, logits, rows=None, output=None):
        cls = self.classes if rows is None else self.classes[rows]
        self.hits.append(logits.argmax(1) == cls.to(logits.device))
        return self.target.score(logits, rows=rows, output=output)


class _Road(Metric):
    family = "faithfulness"
    order = "morf"
    layouts = ("BCHW",)    # the imputation fills pixels from their image neighbours
    defaults = {"levels": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), "noise": 0.01, "output": "prob"}
    cost = "9 per map (+ one sparse solve per map and level)"

    def compute(self, ctx: EvalContext, exps, levels=None, noise=0.01, output="prob"):
        levels = [float(p) for p in (levels or self.defaults["levels"])]
        if not levels or any(not 0 <= p <= 1 for p in levels):
            raise SaliencyError(f"{self.name}: levels must be fractions in [0, 1], got {levels}")
        names, maps, image_of = stack_maps(ctx, exps)
        M, (H, W) = maps.shape[0], maps.shape[-2:]
        hw = H * W
        # ROAD breaks ties with small Gaussian noise; an exact random tie-break does the same job
        ranks = rank_maps(maps, ctx.generator(5)).cpu().numpy()
        pixels = ctx.subject.unnormalize(ctx.x).detach().cpu().double().numpy()
        rng = np.random.default_rng(ctx.seed + 5)
        L = len(levels)
        imputed = np.empty((M * L,) + pixels.shape[1:], dtype=np.float64)
        keep = np.empty((M * L, H, W), dtype=bool)
        for m in range(M):
            for li, p in enumerate(levels):
                k = int(np.floor(p * hw))
                r = ranks[m].reshape(H, W)
                removed = r < k if self.order == "morf" else r >= hw - k
                imputed[m * L + li] = noisy_linear_impute(pixels[int(image_of[m])], removed, noise, rng)
                keep[m * L + li] = ~removed
        x_imp = ctx.subject.normalize_pixels(torch.from_numpy(imputed).to(ctx.x))
        rows = image_of.cpu().repeat_interleave(L)
        from .faithfulness import _rows_target

        tgt = _rows_target(ctx.target, rows)
        classes = torch.tensor([s.indices[0] for s in tgt.pos])
        rec = _HitRecorder(tgt, classes)
        keep_t = torch.from_numpy(keep).to(ctx.x.device)
        counter = PassCounter()
        xs = ctx.x[rows.to(ctx.x.device)]
        scores = ctx.runner(x_imp, lambda a, b: (torch.arange(a, b, device=ctx.x.device),
                                                 keep_t[a:b].unsqueeze(1)),
                            M * L, counter, output=output, target=rec, x=xs, desc=self.name)
        probs = scores.view(M, L).double().cpu()
        hits = torch.cat(rec.hits).view(M, L).double().cpu()
        B = ctx.batch
        x_axis = torch.tensor(levels, dtype=torch.float64)
        return {name: self.result(name, probs[e * B:(e + 1) * B].mean(1),
                                  curves={"x": x_axis, "y": probs[e * B:(e + 1) * B],
                                          "xlabel": "fraction removed (" + ("most" if self.order == "morf"
                                                                            else "least") + " relevant first)",
                                          "ylabel": output},
                                  passes=per_example_passes(counter, B, len(names)),
                                  extras={"accuracy": hits[e * B:(e + 1) * B].tolist(), "levels": levels,
                                          "noise": noise, "output": output})
                for e, name in enumerate(names)}


@register
class RoadMoRF(_Road):
    name = "road_morf"
    order = "morf"
    direction = "lower"
    randomized = True
    description = ("ROAD, most relevant first: mean class probability after removing 10..90% of the pixels "
                   "(noisy linear imputation); lower = better.")


@register
class RoadLeRF(_Road):
    name = "road_lerf"
    order = "lerf"
    direction = "higher"
    randomized = True
    description = ("ROAD, least relevant first: mean class probability after removing the 10..90% least "
                   "relevant pixels (noisy linear imputation); higher = better.")
