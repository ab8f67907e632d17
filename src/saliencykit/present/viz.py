"""Pictures: comparison grids and map PNGs, on top of `saliencykit.maps` (normalisation, colour
maps and the overlay, re-exported here)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import SaliencyError
from ..files import atomic_write  # noqa: F401  (re-exported: it lived here)
from ..images import load_image
from ..maps import (SIGNED_CMAP, UNSIGNED_CMAP, _to_numpy_map, colorize,  # noqa: F401
                    display_scale, normalize_maps, overlay, resize_map)


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
