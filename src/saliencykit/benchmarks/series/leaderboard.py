"""Ground-truth scores of time-series maps against the planted motifs.

`SeriesBench(subject)` generates held-out series (seeded), runs the model once and keeps which
examples it classifies correctly; `bench.score(maps_fn)` asks `maps_fn(x [n,C,T], labels [n])`
for maps `[n,T]` and scores them against the motif masks on the correctly classified examples:

* pointing: the fraction of maps whose highest step lies inside the motif,
* energy: the fraction of a map's positive mass inside the motif (Σ relu(m)·mask / Σ relu(m)),
* auc: the ROC AUC of the map's values for telling motif steps from the others (0.5 = chance;
  ties count half).

`score_maps(maps, masks)` (from `benchmarks.scoring`, shared with the volume leaderboard) is the
same for maps already made. A random map (`random_maps`) scores
pointing ≈ motif fraction (~1/5), energy ≈ the same and AUC ≈ 0.5, which every useful method must
beat. `leaderboard(bench, methods)` explains with the library's methods through
`sk.explain(Subject(model, layout="BCT"), ...)` and ranks them with the random map.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from . import dataset as S
from ...errors import SaliencyError
from ..scoring import auc as _auc, score_maps  # noqa: F401  (the shared scorers, importable from here as before)

SCORES = ("pointing", "energy", "auc")


class SeriesBench:
    """Held-out series for one model: `x` [n,C,T], `labels`, `masks` [n,T], `correct` [n]."""

    def __init__(self, subject, n: int = 64, seed: int = 2024, channels: int = S.DEFAULT_CHANNELS,
                 length: int = S.DEFAULT_LENGTH):
        self.subject = subject
        self.seed = int(seed)
        data = S.generate(int(n), seed=self.seed, channels=channels, length=length)
        self.data = data
        self.x = S.to_tensor(data.series)
        self.labels = torch.from_numpy(data.labels)
        self.masks = torch.from_numpy(data.masks)
        self.model = getattr(subject, "model", subject)
        if not isinstance(self.model, torch.nn.Module):
            raise SaliencyError(f"SeriesBench needs a Subject or an nn.Module, got {type(subject).__name__}")
        with torch.inference_mode():
            logits = self.model(self.x)
        self.correct = (logits.argmax(1) == self.labels).numpy()
        if not self.correct.any():
            raise SaliencyError("the model classifies none of the benchmark series correctly; is it the series model?")

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    def score(self, maps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict:
        idx = np.flatnonzero(self.correct)
        maps = torch.as_tensor(maps_fn(self.x[idx], self.labels[idx]))
        if tuple(maps.shape) != (len(idx), self.x.shape[-1]):
            raise SaliencyError(f"maps_fn must return [n,T] = {(len(idx), self.x.shape[-1])} maps, got {tuple(maps.shape)}")
        return score_maps(maps, self.masks[idx])


def random_maps(seed: int = 0):
    """A maps_fn giving uniform noise (seeded): the floor every method must beat."""
    def fn(x, labels):
        g = torch.Generator().manual_seed(int(seed))
        return torch.rand(x.shape[0], x.shape[-1], generator=g)
    return fn


def library_maps(bench: SeriesBench, method: str, seed: int = 0, params: dict | None = None):
    """A maps_fn explaining with the library's `method` on the bench's subject declared as a
    `[B,C,T]` series (`Subject(model, layout="BCT")`); `Explanation.maps` is `[n,T]` there."""
    from ...methods.base import explain
    from ...subject import Subject

    subject = bench.subject
    if not isinstance(subject, Subject) or getattr(subject, "layout", None) != "BCT":
        subject = Subject(bench.model, labels=list(S.MOTIFS), layout="BCT", name="series_cnn")

    def fn(x, labels):
        exp = explain(subject, x, method=method, target=[int(c) for c in labels], seed=seed, params={method: dict(params or {})})
        return exp.maps
    return fn


def leaderboard(bench: SeriesBench, methods, seed: int = 0, params: dict | None = None) -> list[dict]:
    """Rows `{"method", "pointing", "energy", "auc", "n"}` for the random map and each method,
    best AUC first."""
    rows = [{"method": "random", **bench.score(random_maps(seed))}]
    for name in methods:
        rows.append({"method": name, **bench.score(library_maps(bench, name, seed, (params or {}).get(name)))})
    return sorted(rows, key=lambda r: -r["auc"])
