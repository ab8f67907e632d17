"""Ground-truth scores of aggregated attributions on the procedural volumes.

`VolumeBench(subject)` generates held-out volumes (seeded), segments them once with the model and
keeps, for each organ k, the volumes where the model predicts some voxel as k. The question asked
of every method is the aggregated one, "what makes the model call these voxels organ k":
the target is `sk.Region(predicted mask of k, label=k)`, the organ-k logit summed over the voxels
the model calls k. `bench.score(maps_fn)` asks `maps_fn(x [m,1,D,H,W], k, regions [m,D,H,W])`
for maps `[m,D,H,W]`, organ by organ, and scores them against organ k's *true* mask, grown by
`dilation` voxels (a (2d+1)^3 cube, default 2: the U-Net's receptive field is ~18 voxels wide, so
the voxels just outside an organ's boundary legitimately decide where the boundary is), with
`benchmarks.scoring.score_maps`: pointing, energy and AUC, the same numbers as `sk.evaluate`'s
`pointing_game` (tolerance=1) and `energy_pointing_game` on the same masks.

`random_maps` is the floor: pointing ≈ energy ≈ the dilated organ's share of the volume (~7 %
at dilation 2), AUC ≈ 0.5. `leaderboard(bench, methods)` explains with the library's methods
through `sk.explain` on the subject (layout BCDHW) and ranks them with the random map; `FAST`
holds small settings under which three methods run in about a minute on one thread.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import dataset as V
from .models import HELDOUT_SEED
from ..scoring import score_maps
from ...errors import SaliencyError

SCORES = ("pointing", "energy", "auc")
#: settings that keep a leaderboard of a few volumes near a minute on one thread
FAST = {"integrated_gradients": {"steps": 16}, "smoothgrad": {"samples": 8},
        "occlusion": {"patch": 8, "stride": 8, "baseline": "zero"}}


def dilate(masks: torch.Tensor, voxels: int) -> torch.Tensor:
    """Boolean `[n,D,H,W]` masks grown by `voxels` in every direction (a (2v+1)^3 cube)."""
    if voxels < 0:
        raise SaliencyError(f"dilation must be >= 0 voxels, got {voxels}")
    if voxels == 0:
        return masks.bool()
    k = 2 * int(voxels) + 1
    return torch.nn.functional.max_pool3d(masks.float()[:, None], k, stride=1, padding=int(voxels))[:, 0] > 0


class VolumeBench:
    """Held-out volumes for one segmenter: `x` [n,1,D,H,W], `labels` [n,D,H,W] (true organs),
    `pred` [n,D,H,W] (the model's), `masks[k]` (organ k's true mask dilated), `rows[k]` (the
    volumes where the model predicts organ k somewhere)."""

    def __init__(self, subject, n: int = 4, seed: int = HELDOUT_SEED, dilation: int = 2,
                 size: int = V.DEFAULT_SIZE):
        self.subject = subject
        self.model = getattr(subject, "model", subject)
        if not isinstance(self.model, torch.nn.Module):
            raise SaliencyError(f"VolumeBench needs a Subject or an nn.Module, got {type(subject).__name__}")
        self.seed, self.dilation = int(seed), int(dilation)
        data = V.generate(int(n), seed=self.seed, size=size)
        self.x = torch.from_numpy(data.volumes)
        self.labels = torch.from_numpy(data.labels)
        with torch.inference_mode():
            out = self.model(self.x)
        if out.dim() != 5 or out.shape[1] != len(V.ORGANS):
            raise SaliencyError(f"the model must segment into {len(V.ORGANS)} classes [n,{len(V.ORGANS)},D,H,W], "
                                f"got {tuple(out.shape)}; is it the volume_seg model?")
        self.pred = out.argmax(1)
        self.organs = tuple(range(1, len(V.ORGANS)))
        self.masks = {k: dilate(self.labels == k, self.dilation) for k in self.organs}
        self.rows = {k: torch.nonzero((self.pred == k).flatten(1).any(1)).flatten() for k in self.organs}
        if not any(len(r) for r in self.rows.values()):
            raise SaliencyError("the model predicts no organ in any benchmark volume; is it the volume_seg model?")

    @property
    def dice(self) -> dict:
        return V.dice(self.pred.numpy(), self.labels.numpy())

    def maps(self, maps_fn: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """All maps `[m,D,H,W]` (organs in turn) and their masks, as scored."""
        maps, masks = [], []
        for k in self.organs:
            idx = self.rows[k]
            if not len(idx):
                continue
            m = torch.as_tensor(maps_fn(self.x[idx], k, self.pred[idx] == k)).detach().cpu()
            if tuple(m.shape) != (len(idx), *self.x.shape[2:]):
                raise SaliencyError(f"maps_fn must return [m,D,H,W] = {(len(idx), *self.x.shape[2:])} maps, "
                                    f"got {tuple(m.shape)}")
            maps.append(m)
            masks.append(self.masks[k][idx])
        return torch.cat(maps), torch.cat(masks)

    def score(self, maps_fn: Callable) -> dict:
        return score_maps(*self.maps(maps_fn))


def random_maps(seed: int = 0):
    """A maps_fn giving uniform noise (seeded): the floor every method must beat."""
    def fn(x, organ, regions):
        g = torch.Generator().manual_seed(int(seed) * 10 + int(organ))
        return torch.rand(x.shape[0], *x.shape[2:], generator=g)
    return fn


def library_maps(bench: VolumeBench, method: str, seed: int = 0, params: dict | None = None):
    """A maps_fn explaining `sk.Region(predicted mask of k, label=k)` with the library's `method`
    on the bench's subject (a `[B,1,D,H,W]` Subject; a bare model is declared BCDHW)."""
    from ...methods.base import explain
    from ...subject import Subject
    from ...targets import Region

    subject = bench.subject
    if not isinstance(subject, Subject):
        subject = Subject(bench.model, labels=list(V.ORGANS), layout="BCDHW", name="volume_seg")
    settings = dict(FAST.get(method, {}), **(params or {}))

    def fn(x, organ, regions):
        target = Region([r for r in regions], label=int(organ))
        return explain(subject, x, method=method, target=target, seed=seed, params={method: settings}).maps
    return fn


def leaderboard(bench: VolumeBench, methods, seed: int = 0, params: dict | None = None) -> list[dict]:
    """Rows `{"method", "pointing", "energy", "auc", "n"}` for the random map and each method
    (at `FAST` settings unless `params[method]` says otherwise), best AUC first."""
    rows = [{"method": "random", **bench.score(random_maps(seed))}]
    for name in methods:
        rows.append({"method": name, **bench.score(library_maps(bench, name, seed, (params or {}).get(name)))})
    return sorted(rows, key=lambda r: -r["auc"])
