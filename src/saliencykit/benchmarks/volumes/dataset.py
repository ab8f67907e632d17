"""Procedural `[1,D,H,W]` volumes with three "organs" whose masks are known.

Each volume is noise (sigma 0.15) on a dark, slowly varying background, with three non-overlapping
ellipsoids of random centre, radii and orientation:

* organ 1 ("organ_a"): bright (0.9), smooth,
* organ 2 ("organ_b"): mid-grey (0.55) with a 3-D checker texture of period 4 voxels (+/- 0.3),
* organ 3 ("organ_c"): darker grey (0.35), smooth; told from organ 2 by texture and, less, intensity.

`labels[D,H,W]` (int64, 0 = background) is the ground truth, drawn in the same pass as the voxels.
Everything is a pure function of `(seed, i)`.

    >>> batch = generate(4, seed=0)       # volumes [4,1,32,32,32] float32, labels [4,32,32,32]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import SaliencyError

ORGANS = ("background", "organ_a", "organ_b", "organ_c")
DEFAULT_SIZE = 32
NOISE = 0.15


@dataclass
class VolumeBatch:
    volumes: np.ndarray   # [N,1,D,H,W] float32
    labels: np.ndarray    # [N,D,H,W] int64

    def __len__(self):
        return len(self.labels)

    def organ_masks(self) -> dict[str, np.ndarray]:
        """Per organ: `[N,D,H,W]` bool masks."""
        return {name: self.labels == k for k, name in enumerate(ORGANS) if k}


def _rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _one(seed: int, i: int, size: int):
    rng = np.random.default_rng([int(seed), int(i), 7717])
    grid = np.stack(np.meshgrid(*(np.arange(size) + 0.5,) * 3, indexing="ij"), -1)   # [D,H,W,3]
    labels = np.zeros((size,) * 3, np.int64)
    for organ in (1, 2, 3):
        for _ in range(200):                 # rejection: a placement that overlaps no earlier organ
            radii = rng.uniform(0.12, 0.22, 3) * size
            centre = rng.uniform(radii.max() + 1, size - radii.max() - 1, 3)
            local = (grid - centre) @ _rotation(rng)
            inside = ((local / radii) ** 2).sum(-1) <= 1
            if not (inside & (labels > 0)).any():
                labels[inside] = organ
                break
        else:
            raise SaliencyError(f"could not place organ {organ} in a {size}^3 volume")
    slow = np.cos(2 * np.pi * (grid @ rng.uniform(-1, 1, 3)) / size + rng.uniform(0, 2 * np.pi))
    vol = 0.1 + 0.05 * slow + rng.normal(0.0, NOISE, (size,) * 3)
    checker = ((np.floor(grid / 2).sum(-1) % 2) * 2 - 1) * 0.3
    vol[labels == 1] += 0.8
    vol[labels == 2] += 0.45 + checker[labels == 2]
    vol[labels == 3] += 0.25
    return vol.astype(np.float32)[None], labels


def generate(n: int, seed: int = 0, size: int = DEFAULT_SIZE) -> VolumeBatch:
    """`n` volumes with their label maps; the same arguments give the same arrays."""
    if n < 1:
        raise SaliencyError(f"n must be >= 1, got {n}")
    if size < 16 or size % 2:
        raise SaliencyError(f"size must be an even number >= 16 voxels, got {size}")
    vols, labs = zip(*(_one(seed, i, size) for i in range(n)))
    return VolumeBatch(np.stack(vols), np.stack(labs))


def dice(pred: np.ndarray, labels: np.ndarray, n_classes: int = len(ORGANS)) -> dict:
    """Dice per organ (`2|P∩G| / (|P|+|G|)` over all volumes together) and their mean."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.shape != labels.shape:
        raise SaliencyError(f"prediction {pred.shape} and labels {labels.shape} differ in shape")
    out = {}
    for k in range(1, n_classes):
        p, g = pred == k, labels == k
        denom = p.sum() + g.sum()
        out[ORGANS[k]] = float(2 * (p & g).sum() / denom) if denom else float("nan")
    out["mean"] = float(np.nanmean(list(out.values())))
    return out
