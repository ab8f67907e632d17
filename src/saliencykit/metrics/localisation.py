"""Localisation metrics against ground-truth object masks: pointing game, energy pointing game.
No model passes. Masks have the map's shape: [B,H,W] on images, [B,T] on series, [B,D,H,W] on
volumes, [B,F] on feature vectors."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import SaliencyError
from .base import EvalContext, Metric, register


def pointing_hits(maps: torch.Tensor, masks: torch.Tensor, tolerance: float = 15.0,
                  exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Hit if some ground-truth position lies strictly within `tolerance` positions (Euclidean, over
    the map's axes: pixels, time steps, voxels) of the map's maximum; `exact=True` (feature
    vectors, where neighbouring indices mean nothing) asks that the maximum itself be inside.

    The maximum is the first in row-major order among ties. Returns (hits [B] bool, points [B,n]:
    the maximum's coordinates, (row, col) on images).
    """
    from scipy.ndimage import distance_transform_edt

    B, shape = maps.shape[0], tuple(maps.shape[1:])
    flat = maps.reshape(B, -1)
    idx = flat.argmax(1)  # torch returns the first maximal index
    pts = torch.stack(torch.unravel_index(idx, shape), 1)
    hits = torch.zeros(B, dtype=torch.bool)
    for b in range(B):
        g = masks[b].cpu().numpy().astype(bool)
        if not g.any():
            hits[b] = False
            continue
        point = tuple(int(v) for v in pts[b])
        if exact:
            hits[b] = bool(g[point])
            continue
        # Euclidean distance from every position to the nearest ground-truth position
        dist = distance_transform_edt(~g)
        hits[b] = bool(dist[point] < tolerance)
    return hits, pts


@register
class PointingGame(Metric):
    name = "pointing_game"
    family = "localisation"
    direction = "higher"
    needs = ("masks",)
    defaults = {"tolerance": 15}
    cost = "0"
    description = ("Pointing game (Zhang et al. 2016): 1 if a ground-truth pixel lies within 15 px "
                   "(strictly) of the map's maximum, else 0; mean = hit rate. Series and volumes: "
                   "`tolerance` in time steps / voxels; feature vectors: the top feature must be a true one.")

    def compute_one(self, ctx: EvalContext, name, exp, tolerance=15):
        maps = ctx.check_maps(exp)
        masks = ctx.need_masks(self.name, maps.shape[1:])
        empty = ~masks.reshape(masks.shape[0], -1).any(1)
        exact = ctx.layout == "BF"
        hits, pts = pointing_hits(maps.cpu(), masks.cpu(), float(tolerance), exact=exact)
        scores = hits.double()
        scores[empty.cpu()] = float("nan")  # no object: not scored
        extras = {"tolerance": None if exact else tolerance, "points": pts.tolist()}
        if empty.any():
            rows = empty.nonzero().flatten().tolist()
            import warnings

            warnings.warn(f"pointing_game: the mask of row(s) {rows} is empty (no object), so those rows are not "
                          "scored (NaN) and the mean leaves them out", stacklevel=2)
            extras["empty_masks"] = rows
        return self.result(name, scores, extras=extras)


@register
class EnergyPointingGame(Metric):
    name = "energy_pointing_game"
    family = "localisation"
    direction = "higher"
    needs = ("masks",)
    defaults = {}
    cost = "0"
    description = ("Energy-based pointing game (Score-CAM): share of the positive map mass inside the "
                   "object mask, after ReLU; NaN for an all-zero map.")

    def compute_one(self, ctx, name, exp):
        maps = ctx.check_maps(exp)
        masks = ctx.need_masks(self.name, maps.shape[1:])
        pos = maps.clamp_min(0).double()
        inside = (pos * masks).reshape(pos.shape[0], -1).sum(1)
        total = pos.reshape(pos.shape[0], -1).sum(1)
        scores = torch.where(total > 0, inside / total.clamp_min(1e-300), torch.full_like(total, float("nan")))
        return self.result(name, scores)


# ---------------------------------------------------------------------------- file format
def load_regions(path, photos: list[str], size: tuple[int, int], photo_sizes: list[tuple[int, int]]) -> torch.Tensor:
    """Read object boxes / masks for `photos` from a JSON or CSV file -> bool masks [B,H,W].

    JSON: {"PHOTO": [{"box": [x0, y0, x1, y1], "label": "..."}, ...] | {"mask": "FILE.png"}, ...}
    CSV:  header `photo,x0,y0,x1,y1[,label]`, one box per line.
    PHOTO is the file name, its stem, or a bundled photo name. Coordinates are pixels of the
    original photo (x = column, y = row; x1, y1 exclusive) and are scaled to the model input.
    """
    import csv
    import json
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise SaliencyError(f"regions file not found: {path}")
    entries: dict[str, list] = {}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SaliencyError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise SaliencyError(f"{path}: expected an object mapping photo names to boxes or a mask")
        for k, v in data.items():
            entries[k] = v if isinstance(v, list) else [v]
    elif path.suffix.lower() == ".csv":
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            need = {"photo", "x0", "y0", "x1", "y1"}
            if reader.fieldnames is None or not need <= set(reader.fieldnames):
                raise SaliencyError(f"{path}: CSV needs the columns {sorted(need)}, got {reader.fieldnames}")
            for i, row in enumerate(reader, start=2):
                try:
                    box = [float(row[c]) for c in ("x0", "y0", "x1", "y1")]
                except ValueError:
                    raise SaliencyError(f"{path}:{i}: box coordinates must be numbers") from None
                entries.setdefault(row["photo"], []).append({"box": box, "label": row.get("label")})
    else:
        raise SaliencyError(f"{path}: regions file must end in .json or .csv")
    H, W = size
    out = torch.zeros(len(photos), H, W, dtype=torch.bool)
    for b, (photo, (pw, ph)) in enumerate(zip(photos, photo_sizes)):
        key = _match(photo, entries)
        if key is None:
            raise SaliencyError(f"{path}: no boxes or mask for photo {photo!r} (keys: {', '.join(entries) or 'none'})")
        for item in entries[key]:
            if not isinstance(item, dict) or ("box" not in item and "mask" not in item):
                raise SaliencyError(f"{path}: entry for {key!r} needs a 'box' [x0, y0, x1, y1] or a 'mask' file")
            if "mask" in item:
                from PIL import Image

                mpath = (path.parent / item["mask"])
                if not mpath.exists():
                    raise SaliencyError(f"{path}: mask file {mpath} not found")
                m = np.asarray(Image.open(mpath).convert("L")) > 0
                if m.shape != (ph, pw):
                    raise SaliencyError(f"{path}: mask {mpath.name} is {m.shape[1]}x{m.shape[0]}, photo {photo!r} "
                                        f"is {pw}x{ph}")
                mt = torch.from_numpy(m.astype(np.float32))[None, None]
                out[b] |= torch.nn.functional.interpolate(mt, size=(H, W), mode="nearest")[0, 0] > 0.5
                continue
            box = item["box"]
            if not isinstance(box, (list, tuple)) or len(box) != 4:
                raise SaliencyError(f"{path}: box for {key!r} must be [x0, y0, x1, y1], got {box!r}")
            x0, y0, x1, y1 = (float(v) for v in box)
            if not (0 <= x0 < x1 <= pw and 0 <= y0 < y1 <= ph):
                raise SaliencyError(f"{path}: box {box} for {key!r} is empty or outside the {pw}x{ph} photo")
            sx, sy = W / pw, H / ph
            out[b, int(round(y0 * sy)):max(int(round(y1 * sy)), int(round(y0 * sy)) + 1),
                int(round(x0 * sx)):max(int(round(x1 * sx)), int(round(x0 * sx)) + 1)] = True
    return out


def _match(photo: str, entries: dict):
    from pathlib import Path

    for cand in (photo, Path(photo).name, Path(photo).stem):
        if cand in entries:
            return cand
    return None
