"""The FunnyBirds protocol on the procedural parts dataset.

Ground truth comes from interventions: every test image is re-rendered with each of the 32 subsets
of part types removed and with each background object removed alone, and the model's logits on
all of them are computed once per model (`PartsBench`). Scoring an explanation method then needs
only its maps: `bench.score(maps_fn)` where `maps_fn(indices, classes) -> [n,H,W]` explains the
test images `indices` for the classes `classes` (the class-contrast check TS asks for other
classes than the label).

Part importance = Σ map · dilate(mask of each instance) (instances of a type summed; FunnyBirds
dilates by 2 px (5×5 max-pool) on 256-px images, here by round(2·size/256) px: 0 at 64 px, where
a 2-px halo would swallow neighbouring parts — the two eyes are ~1 px apart); a part is important at threshold t when importance > t · Σ map, for
t in linspace(0.01, 0.5, 80). Scores, with the model's logits:

* CSDC: on correctly classified images, max over the class's minimal sufficient part sets S of
  |S ∩ important| / |S|.
* PC: 1 when removing every part that is not important keeps the top-1 prediction.
* DC: 1 when removing the important parts changes the top-1 prediction.
* D: 1 − mean fraction of irrelevant items (parts and background objects whose single removal
  lowers the target logit by less than 5 % of its magnitude, or raises it) marked important.
* SD (correctness): mean of 0.5·ρ + 0.5, ρ = Spearman between part importances and the target
  logit drops from removing each part alone.
* TS (contrastivity): classes c1, c2 sharing exactly 2 part types with the target class (disjoint
  shared sets); on images where the model agrees (removing c1's shared parts lowers logit c1
  more than removing c2's, and vice versa), +1 when c1's shared parts get more importance in the
  map for c1 than in the map for c2, +1 for the symmetric check, averaged.
* BI (model only): 1 − fraction of background objects whose removal lowers the target logit by
  ≥ 5 %.

t* = argmax_t (CSDC + PC + DC)/3 + D; completeness = ((CSDC + PC + DC)/3 + D)/2 at t*,
correctness = SD, contrastivity = TS, mean = their average.
"""
from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import torch

from . import dataset as P
from ...engine import PassCounter, forward_logits
from ...errors import SaliencyError

THRESHOLDS = np.linspace(0.01, 0.50, 80)
N_PARTS = len(P.PART_TYPES)


def minimal_sufficient_sets(table: np.ndarray, c: int) -> list[tuple[int, ...]]:
    """Sets of part types (indices) whose variants in class `c` occur together in no other class,
    minimal under inclusion."""
    others = np.delete(table, c, axis=0)
    found: list[tuple[int, ...]] = []
    for k in range(1, N_PARTS + 1):
        for s in itertools.combinations(range(N_PARTS), k):
            if any(set(f) <= set(s) for f in found):
                continue
            same = (others[:, list(s)] == table[c, list(s)]).all(1)
            if not same.any():
                found.append(s)
    return found


def contrast_pair(table: np.ndarray, c: int):
    """The first pair (c1, c2, S1, S2) of classes each sharing exactly 2 part types with `c`, with
    disjoint shared sets S1, S2 (tuples of part indices); None when the class table has none."""
    shared = {}
    for o in range(len(table)):
        if o != c:
            s = tuple(np.flatnonzero(table[o] == table[c]).tolist())
            if len(s) == 2:
                shared[o] = s
    for c1, c2 in itertools.combinations(sorted(shared), 2):
        if not set(shared[c1]) & set(shared[c2]):
            return c1, c2, shared[c1], shared[c2]
    return None


def _dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    if radius == 0:
        return masks.float()
    return torch.nn.functional.max_pool2d(masks.float(), 2 * radius + 1, stride=1, padding=radius)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b)[0])


class PartsBench:
    """Test images of the parts dataset and the model's logits on all their interventions."""

    def __init__(self, subject, n: int = 100, seed: int = 777, batch_size: int = 256, dilation: int | None = None):
        if n < 2:
            raise SaliencyError(f"the parts benchmark needs at least 2 test images, got n={n}")
        self.subject = subject
        self.n_classes = len(subject.labels) if subject.labels else P.DEFAULT_CLASSES
        size = subject.input_size[0]
        # FunnyBirds dilates part masks by 2 px on 256-px images; the same reach in this image size
        self.dilation = int(round(2 * size / 256)) if dilation is None else int(dilation)
        if self.dilation < 0:
            raise SaliencyError(f"dilation must be >= 0 pixels, got {dilation}")
        self.scenes = P.make_scenes(n, seed=seed, size=size, n_classes=self.n_classes)
        self.table = P.class_table(self.n_classes)
        batch = P.render_many(self.scenes)
        self.images = batch.images
        self.labels = batch.labels
        self.part_maps = torch.from_numpy(batch.part_maps.astype(np.int64))
        self.x = P.to_tensor(batch.images)
        self.batch_size = batch_size
        self.counter = PassCounter()
        with subject.explaining(), torch.inference_mode():
            self.logits = forward_logits(subject, self.x, batch_size, self.counter)          # [N,K]
            # every subset of part types removed: bit j of the subset index = part j removed
            subs = []
            for bits in range(1, 2 ** N_PARTS):
                removed = tuple(p for j, p in enumerate(P.PART_TYPES) if bits >> j & 1)
                imgs = P.render_many(self.scenes, removed).images
                subs.append(forward_logits(subject, P.to_tensor(imgs), batch_size, self.counter))
            self.subset_logits = torch.stack([self.logits] + subs, 1)                          # [N,32,K]
            # each background object removed alone
            self.n_bg = [int((pm.unique() >= P.BG_BASE).sum()) for pm in self.part_maps]
            self.bg_ids = [sorted(int(v) - P.BG_BASE for v in pm.unique() if v >= P.BG_BASE) for pm in self.part_maps]
            self.bg_logits = []
            for i, sc in enumerate(self.scenes):
                ids = self.bg_ids[i]
                if ids:
                    imgs = np.stack([P.render(sc, removed_bg=(b,))[0] for b in ids])
                    self.bg_logits.append(forward_logits(subject, P.to_tensor(imgs), batch_size, self.counter))
                else:
                    self.bg_logits.append(torch.zeros(0, self.logits.shape[1]))
        self.pred = self.logits.argmax(1)
        self.correct = self.pred.numpy() == self.labels
        idx = torch.arange(len(self.labels))
        tgt = torch.from_numpy(self.labels)
        self.target_logit = self.logits[idx, tgt]
        single = self.subset_logits[:, [1 << j for j in range(N_PARTS)], :]                   # [N,5,K]
        self.part_drop = (self.target_logit[:, None] - single[idx, :, tgt]).numpy()           # [N,5]
        self.bg_drop = [(self.target_logit[i] - bl[:, tgt[i]]).numpy() if len(bl) else np.zeros(0)
                        for i, bl in enumerate(self.bg_logits)]
        # per-instance masks, dilated: [N, 8, H, W] for the parts, list of [n_bg, H, W] for background
        inst = torch.stack([self.part_maps == k for k in range(1, 9)], 1)
        self._part_dil = _dilate(inst, self.dilation)
        self._bg_dil = [(_dilate(torch.stack([self.part_maps[i] == P.BG_BASE + b for b in ids])[None], self.dilation)[0]
                         if ids else torch.zeros(0, *self.part_maps.shape[1:])) for i, ids in enumerate(self.bg_ids)]
        self.pairs = [contrast_pair(self.table, int(c)) for c in self.labels]

    # ------------------------------------------------------------------ ground truth helpers
    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    def background_independence(self) -> float:
        drops = [d / max(abs(float(self.target_logit[i])), 1e-12) for i, d in enumerate(self.bg_drop)]
        allv = np.concatenate(drops) if drops else np.zeros(0)
        return float(1 - (allv >= 0.05).mean()) if len(allv) else float("nan")

    def oracle_maps(self, indices, classes) -> torch.Tensor:
        """Σ_parts (logit drop of class `classes[i]` when the part is removed) · part mask / part
        area: each part's total attribution is its true single-deletion effect."""
        indices = np.asarray(indices)
        out = torch.zeros(len(indices), *self.part_maps.shape[1:])
        for r, (i, c) in enumerate(zip(indices, classes)):
            for j, p in enumerate(P.PART_TYPES):
                drop = float(self.subset_logits[i, 0, c] - self.subset_logits[i, 1 << j, c])
                mask = torch.isin(self.part_maps[i], torch.tensor(P.PART_IDS[p])).float()
                out[r] += drop * mask / mask.sum().clamp(min=1)
        return out

    def part_importance(self, maps: torch.Tensor, indices) -> np.ndarray:
        """`[n, 5]` Σ map · dilated part mask (instances of a type summed)."""
        maps = maps.float()
        per_inst = (maps[:, None] * self._part_dil[np.asarray(indices)]).sum((-2, -1))        # [n,8]
        out = torch.zeros(len(maps), N_PARTS)
        for j, p in enumerate(P.PART_TYPES):
            out[:, j] = per_inst[:, [k - 1 for k in P.PART_IDS[p]]].sum(1)
        return out.numpy()

    # ------------------------------------------------------------------ the protocol
    def score(self, maps_fn: Callable, contrast: bool = True) -> dict:
        """All FunnyBirds scores of the method behind `maps_fn(indices, classes) -> [n,H,W]`."""
        n = len(self.labels)
        idx = np.arange(n)
        maps = torch.as_tensor(maps_fn(idx, self.labels)).float()
        if maps.shape != self.part_maps.shape:
            raise SaliencyError(f"maps_fn returned maps of shape {tuple(maps.shape)}, expected {tuple(self.part_maps.shape)}")
        imp = self.part_importance(maps, idx)                                                  # [N,5]
        total = maps.sum((-2, -1)).numpy()                                                     # [N]
        bg_imp = [(maps[i][None] * self._bg_dil[i]).sum((-2, -1)).numpy() for i in range(n)]
        important = imp[None] > THRESHOLDS[:, None, None] * total[None, :, None]               # [T,N,5]
        weights = 1 << np.arange(N_PARTS)
        imp_bits = (important * weights).sum(-1)                                               # [T,N]
        keep_removed = (2 ** N_PARTS - 1) - imp_bits                                           # remove the unimportant
        pred_sub = self.subset_logits.argmax(-1).numpy()                                       # [N,32]
        pred = self.pred.numpy()
        pc = (pred_sub[idx[None], keep_removed] == pred[None]).mean(1)                          # [T]
        dc = (pred_sub[idx[None], imp_bits] != pred[None]).mean(1)
        # CSDC on correctly classified images
        csdc = np.full(len(THRESHOLDS), np.nan)
        good = np.flatnonzero(self.correct)
        if len(good):
            sets = {c: minimal_sufficient_sets(self.table, c) for c in np.unique(self.labels)}
            vals = np.zeros((len(THRESHOLDS), len(good)))
            for r, i in enumerate(good):
                ss = sets[int(self.labels[i])]
                if ss:
                    vals[:, r] = np.max([important[:, i, list(s)].mean(-1) for s in ss], 0)
            csdc = vals.mean(1)
        # distractibility
        d_vals = np.full((len(THRESHOLDS), n), np.nan)
        for i in range(n):
            mag = abs(float(self.target_logit[i]))
            irr_p = self.part_drop[i] < 0.05 * mag
            irr_b = self.bg_drop[i] < 0.05 * mag
            n_irr = int(irr_p.sum() + irr_b.sum())
            if n_irr == 0:
                continue
            hit_p = (important[:, i] & irr_p[None]).sum(-1)
            hit_b = (bg_imp[i][None] > THRESHOLDS[:, None] * total[i]) & irr_b[None]
            d_vals[:, i] = (hit_p + hit_b.sum(-1)) / n_irr
        dist = 1 - np.nanmean(d_vals, 1) if np.isfinite(d_vals).any() else np.full(len(THRESHOLDS), np.nan)
        combined = (np.nan_to_num(csdc) + pc + dc) / 3 + np.nan_to_num(dist)
        t = int(np.argmax(combined))
        completeness = combined[t] / 2
        # single deletion (correctness)
        rhos = np.array([_spearman(imp[i], self.part_drop[i]) for i in range(n)])
        sd = float(np.nanmean(0.5 * rhos + 0.5)) if np.isfinite(rhos).any() else float("nan")
        ts, n_ts = (self._target_sensitivity(maps_fn) if contrast else (float("nan"), 0))
        com_cor_con = [completeness, sd, ts]
        return {"completeness": float(completeness), "correctness": sd, "contrastivity": ts,
                "mean": float(np.nanmean(com_cor_con)) if np.isfinite(com_cor_con).any() else float("nan"),
                "csdc": float(csdc[t]), "pc": float(pc[t]), "dc": float(dc[t]), "d": float(dist[t]),
                "threshold": float(THRESHOLDS[t]), "ts_images": n_ts, "sd_images": int(np.isfinite(rhos).sum()),
                "accuracy": self.accuracy, "bi": self.background_independence()}

    def _target_sensitivity(self, maps_fn) -> tuple[float, int]:
        rows, c1s, c2s, s1s, s2s = [], [], [], [], []
        for i, pair in enumerate(self.pairs):
            if pair is None:
                continue
            c1, c2, s1, s2 = pair
            b1, b2 = sum(1 << j for j in s1), sum(1 << j for j in s2)
            lg = self.subset_logits[i]
            # the model must agree that c1's shared parts matter more for c1, and c2's for c2
            if lg[b1, c1] < lg[b2, c1] and lg[b2, c2] < lg[b1, c2]:
                rows.append(i)
                c1s.append(c1)
                c2s.append(c2)
                s1s.append(list(s1))
                s2s.append(list(s2))
        if not rows:
            return float("nan"), 0
        rows_a = np.asarray(rows)
        m1 = torch.as_tensor(maps_fn(rows_a, np.asarray(c1s))).float()
        m2 = torch.as_tensor(maps_fn(rows_a, np.asarray(c2s))).float()
        i1 = self.part_importance(m1, rows_a)
        i2 = self.part_importance(m2, rows_a)
        score = []
        for r in range(len(rows)):
            a = float(i1[r, s1s[r]].sum() > i2[r, s1s[r]].sum())
            b = float(i2[r, s2s[r]].sum() > i1[r, s2s[r]].sum())
            score.append((a + b) / 2)
        return float(np.mean(score)), len(rows)


# ---------------------------------------------------------------------- map makers
#: methods whose map is an expected score E[score | pixel kept]: a large constant offset E[score]
#: plus the signal. The protocol sums attributions over parts, so for these the per-image mean of
#: the map is subtracted (the map's information is relative to that constant).
CENTERED = {"rise"}


class method_maps:
    """`maps_fn` for a registered method, explaining the given classes; `.passes` counts the model
    passes (forward + backward rows) its explanations used. Maps of the methods in `CENTERED` have
    their per-image mean removed (`center=None` = decide by that list)."""

    def __init__(self, bench: PartsBench, method: str, seed: int = 0, params: dict | None = None,
                 batch_size: int | None = None, center: bool | None = None):
        self.bench, self.method, self.seed = bench, method, seed
        self.params, self.batch_size = dict(params or {}), batch_size
        self.center = (method in CENTERED) if center is None else bool(center)
        self.passes = 0

    def __call__(self, indices, classes):
        from ...methods import explain
        from ...targets import Class

        exp = explain(self.bench.subject, self.bench.x[np.asarray(indices)], method=self.method,
                      target=Class([int(c) for c in classes]), seed=self.seed, batch_size=self.batch_size,
                      params={self.method: self.params})
        self.passes += (exp.passes.get("forward", 0) + exp.passes.get("backward", 0)) * len(indices)
        maps = exp.maps.float()
        return maps - maps.mean((-2, -1), keepdim=True) if self.center else maps


def random_maps(bench: PartsBench, seed: int = 0) -> Callable:
    """Uniform-random maps made by `Explanation.random_like` (a fresh seed for every call)."""
    from ...explanation import Explanation

    calls = [0]

    def fn(indices, classes):
        shape = (len(indices), *bench.part_maps.shape[1:])
        like = Explanation(maps=torch.zeros(shape), method="none", signed=False, target=[int(c) for c in classes],
                           params={}, seed=seed)
        calls[0] += 1
        return Explanation.random_like(like, seed=seed * 1000 + calls[0]).maps
    return fn


def edge_maps(bench: PartsBench) -> Callable:
    """Sobel gradient magnitude of the image (summed over colour channels): a model-free baseline."""
    from scipy import ndimage

    img = bench.images.astype(np.float64) / 255.0
    gx = ndimage.sobel(img, axis=2, mode="nearest")
    gy = ndimage.sobel(img, axis=1, mode="nearest")
    edges = torch.from_numpy(np.sqrt(gx ** 2 + gy ** 2).sum(-1)).float()

    def fn(indices, classes):
        return edges[np.asarray(indices)]
    return fn
