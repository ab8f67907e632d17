"""Bundled photos (from scikit-image's wheel) and hand-drawn object boxes for them."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import SaliencyError

_HERE = Path(__file__).parent

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle_left")
_EXTRA = ("horse", "camera", "page", "retina", "hubble_deep_field")


def names() -> list[str]:
    return list(PHOTOS + _EXTRA)


def image(name: str):
    """A bundled photo as an RGB PIL image: chelsea, coffee, astronaut, rocket, motorcycle_left, ..."""
    from PIL import Image
    from skimage import data as skd

    if name == "motorcycle_left":
        arr = skd.stereo_motorcycle()[0]
    elif name in PHOTOS + _EXTRA:
        arr = getattr(skd, name)()
    else:
        import difflib

        close = difflib.get_close_matches(name, names(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise SaliencyError(f"unknown bundled photo {name!r}.{hint} Available: {', '.join(names())}")
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = (255 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-12)).astype(np.uint8)
    img = Image.fromarray(arr)
    return img.convert("RGB")


@lru_cache(maxsize=1)
def _boxes() -> dict:
    return json.loads((_HERE / "boxes.json").read_text())


def boxes(name: str | None = None) -> dict | list[dict]:
    """Hand-drawn object boxes `{"label", "box": [x0, y0, x1, y1]}` in the photo's pixel coordinates."""
    data = {k: v for k, v in _boxes().items() if not k.startswith("_")}
    if name is None:
        return data
    if name not in data:
        raise SaliencyError(f"no boxes for {name!r}; boxes exist for {', '.join(data)}")
    return data[name]


def box_mask(name: str, size: tuple[int, int], label: str | None = None):
    """Boolean [H,W] mask of the photo's box(es) scaled to `size` = (H, W)."""
    import torch

    img = image(name)
    sx, sy = size[1] / img.width, size[0] / img.height
    mask = torch.zeros(size, dtype=torch.bool)
    for item in boxes(name):
        if label is not None and item["label"] != label:
            continue
        x0, y0, x1, y1 = item["box"]
        mask[int(round(y0 * sy)):int(round(y1 * sy)), int(round(x0 * sx)):int(round(x1 * sx))] = True
    return mask
