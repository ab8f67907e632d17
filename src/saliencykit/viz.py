"""Pictures: overlays, comparison grids, map PNGs.

Unsigned maps use a perceptual sequential colormap ("inferno") scaled min..max; signed maps a
diverging one ("RdBu_r") scaled symmetrically so zero is always white.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import SaliencyError
from .explanation import normalize_maps

UNSIGNED_CMAP = "inferno"
SIGNED_CMAP = "RdBu_r"


def _to_numpy_map(m) -> np.ndarray:
    if isinstance(m, torch.Tensor):
        m = m.detach().float().cpu().numpy()
    m = np.asarray(m, dtype=np.float32)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise SaliencyError(f"a map must be 2-D [H,W], got shape {m.shape}")
    return m


def display_scale(m, signed: bool = False, clip: float | None = None) -> np.ndarray:
    """[H,W] map -> display units: [0,1] (unsigned, min..max) or [-1,1] (signed, 0 stays 0).

    `clip` (a percentile, e.g. 99.5) saturates the few extreme values so that pixel-level maps
    (gradients, IG), whose mass is spread thinly, stay visible; CAMs are barely affected.
    """
    m = _to_numpy_map(m)
    if clip is not None and m.size:
        if signed:
            top = float(np.percentile(np.abs(m), clip))
            if top > 0:
                m = np.clip(m, -top, top)
        else:
            top = float(np.percentile(m, clip))
            if top > float(m.min()):
                m = np.minimum(m, top)
    return normalize_maps(torch.from_numpy(np.ascontiguousarray(m))[None], signed)[0].numpy()


def colorize(m, signed: bool = False, cmap: str | None = None, clip: float | None = None) -> np.ndarray:
    """[H,W] map -> [H,W,3] uint8 RGB (see `display_scale` for `clip`)."""
    import matplotlib

    unit = display_scale(m, signed, clip)
    if signed:
        unit = (unit + 1) / 2
    cm = matplotlib.colormaps[cmap or (SIGNED_CMAP if signed else UNSIGNED_CMAP)]
    return (cm(unit)[..., :3] * 255).astype(np.uint8)


def resize_map(m, size_wh) -> np.ndarray:
    """Resize a map to (width, height) bilinearly (align_corners=False, like the methods)."""
    t = torch.from_numpy(_to_numpy_map(m))[None, None]
    out = torch.nn.functional.interpolate(t, size=(size_wh[1], size_wh[0]), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def overlay(image, m, signed: bool = False, alpha: float = 0.5, cmap: str | None = None, clip: float | None = 99.5):
    """Blend the colourised map over the photo (the map is resized to the photo).

    Unsigned maps cover the photo with uniform opacity `alpha`; signed maps are opaque in
    proportion to |value| (zero evidence leaves the photo as it is: red for, blue against).
    """
    from PIL import Image

    from .model import load_image

    if not 0 <= alpha <= 1:
        raise SaliencyError(f"alpha must be in [0,1], got {alpha}")
    img = load_image(image)
    resized = resize_map(m, img.size)
    heat = colorize(resized, signed, cmap, clip).astype(np.float32)
    if signed:
        a = alpha * np.abs(display_scale(resized, True, clip))[..., None] ** 0.5 * 1.6
        a = np.clip(a, 0, 1)
    else:
        a = alpha
    blended = (1 - a) * np.asarray(img, dtype=np.float32) + a * heat
    return Image.fromarray(blended.clip(0, 255).astype(np.uint8))


def atomic_write(path, write_fn) -> Path:
    """Write through a temporary file in the same folder, then rename: no partial files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_png(pil_image, path) -> Path:
    return atomic_write(path, lambda p: pil_image.save(p, format="PNG"))


def save_map_png(m, path, signed: bool = False, cmap: str | None = None) -> Path:
    from PIL import Image

    return save_png(Image.fromarray(colorize(m, signed, cmap)), path)


def save_map_npz(m, path, **meta) -> Path:
    arr = _to_numpy_map(m)
    return atomic_write(path, lambda p: np.savez_compressed(p, map=arr, **{k: np.asarray(v) for k, v in meta.items()}))


def grid(images: Sequence, rows: Sequence[dict], row_titles: Sequence[str] | None = None,
         path=None, alpha: float = 0.5, cell: float = 2.2):
    """A comparison figure: one row per photo, first column the photo, then one overlay per method.

    Args:
        images: photos (anything `load_image` accepts), one per row.
        rows: per row, an ordered dict `{method name: (map [H,W], signed)}`.
        row_titles: a title per row (e.g. the class explained), shown on the photo.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .model import load_image

    if len(images) != len(rows):
        raise SaliencyError(f"{len(images)} images but {len(rows)} rows of maps")
    methods = list(rows[0]) if rows else []
    ncol = 1 + len(methods)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(cell * ncol, cell * len(rows)), squeeze=False)
    for r, (img, row) in enumerate(zip(images, rows)):
        pil = load_image(img)
        axes[r, 0].imshow(pil)
        axes[r, 0].set_title(row_titles[r] if row_titles else "", fontsize=8)
        for c, name in enumerate(methods, start=1):
            m, signed = row[name]
            axes[r, c].imshow(overlay(pil, m, signed=signed, alpha=alpha))
            if r == 0:
                axes[r, c].set_title(name, fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    if path is not None:
        atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
        plt.close(fig)
        return Path(path)
    return fig
