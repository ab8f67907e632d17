"""Scores of maps against ground-truth masks, shared by the series and volume leaderboards.

`score_maps(maps, masks)` takes maps and boolean masks of one shape `[n, ...]` (`[n,T]` series,
`[n,D,H,W]` volumes) and returns the means over the n rows of

* pointing: 1 when the map's highest position (the first in row-major order among ties) lies in
  the mask: `sk.evaluate`'s `pointing_game` with `tolerance=1` on the same masks;
* energy: the share of the map's positive mass inside the mask, Σ relu(m)·mask / Σ relu(m):
  `energy_pointing_game`; a map with no positive mass is left out of this mean;
* auc: the ROC AUC of the map's values for telling mask positions from the others (Mann-Whitney,
  ties count half; 0.5 = chance, a flat map scores 0.5).
"""
from __future__ import annotations

import torch

from ..errors import SaliencyError


def auc(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mann-Whitney AUC of `values` for the positives `mask` (both flattened; average ranks for
    ties); NaN when the mask is empty or full."""
    values, mask = values.reshape(-1), mask.reshape(-1).bool()
    pos = int(mask.sum())
    neg = mask.numel() - pos
    if pos == 0 or neg == 0:
        return float("nan")
    v = values.double()
    order = torch.argsort(v)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    # ties: every member of a group of equal values gets the group's mean rank
    uniq, inverse = torch.unique(v, return_inverse=True)
    if uniq.numel() < v.numel():
        sums = torch.zeros(uniq.numel(), dtype=v.dtype).index_add_(0, inverse, ranks)
        counts = torch.zeros(uniq.numel(), dtype=v.dtype).index_add_(0, inverse, torch.ones_like(v))
        ranks = (sums / counts)[inverse]
    return float((ranks[mask].sum() - pos * (pos + 1) / 2) / (pos * neg))


def score_maps(maps, masks) -> dict:
    """Mean pointing, energy and AUC of `maps` `[n, ...]` against boolean `masks` of the same
    shape, and `n`."""
    maps = torch.as_tensor(maps).detach().double().cpu()
    masks = torch.as_tensor(masks).bool().cpu()
    if maps.dim() < 2 or maps.shape != masks.shape:
        raise SaliencyError(f"maps must be [n, ...] of the masks' shape {tuple(masks.shape)}, got {tuple(maps.shape)}")
    if not torch.isfinite(maps).all():
        raise SaliencyError("maps contain NaN or inf; check the method's output before scoring")
    maps, masks = maps.reshape(maps.shape[0], -1), masks.reshape(masks.shape[0], -1)
    pointing = masks.gather(1, maps.argmax(1, keepdim=True))[:, 0].double()
    pos = maps.clamp(min=0)
    mass = pos.sum(1)
    ok = mass > 0
    energy = (pos * masks).sum(1)[ok] / mass[ok]
    aucs = torch.tensor([auc(m, k) for m, k in zip(maps, masks)], dtype=torch.float64)
    return {"pointing": float(pointing.mean()), "energy": float(energy.mean()) if ok.any() else float("nan"),
            "auc": float(aucs.nanmean()), "n": int(maps.shape[0])}
