"""Maps to pixels: per-map normalisation, the display scale, colour maps and the overlay on a photo.

Unsigned maps use a perceptual sequential colormap ("inferno") scaled min..max; signed maps a
diverging one ("RdBu_r") scaled symmetrically so zero is always white. This is the lower half of
the pictures: `Explanation.overlay` and `present.viz` (grids, PNG files) both build on it.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import SaliencyError
from .images import load_image

def normalize_maps(maps: torch.Tensor, signed: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """Per-map scaling for display: unsigned -> [0,1] by min-max; signed -> [-1,1] by max |m|.

    A constant map becomes zeros, never NaN.
    """
    flat = maps.reshape(maps.shape[0], -1).float()
    if signed:
        scale = flat.abs().amax(1, keepdim=True)
        out = torch.where(scale > eps, flat / scale.clamp_min(eps), torch.zeros_like(flat))
    else:
        lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
        rng = hi - lo
        out = torch.where(rng > eps, (flat - lo) / rng.clamp_min(eps), torch.zeros_like(flat))
    return out.reshape(maps.shape)


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


def display_smooth(m, smooth: float = 0.0) -> np.ndarray:
    """A blurred copy of a [H,W] map for display only: Gaussian of `smooth` x the longer side
    (replicate padding, so the border does not fade). 0 returns the map as it is."""
    m = _to_numpy_map(m)
    if not smooth:
        return m
    if not 0 < smooth < 1:
        raise SaliencyError(f"smooth must be in [0, 1), got {smooth}")
    from .filters import gaussian_blur

    return gaussian_blur(torch.from_numpy(np.ascontiguousarray(m))[None], smooth * max(m.shape),
                         padding="replicate")[0].numpy()


def display_scale(m, signed: bool = False, clip: float | None = None, smooth: float = 0.0) -> np.ndarray:
    """[H,W] map -> display units: [0,1] (unsigned, min..max) or [-1,1] (signed, 0 stays 0).

    `clip` (a percentile, e.g. 99.5) saturates the few extreme values so that pixel-level maps
    (gradients, IG), whose mass is spread thinly, stay visible; CAMs are barely affected.
    `smooth` blurs the display copy first (see `display_smooth`).
    """
    m = display_smooth(m, smooth)
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


def colorize(m, signed: bool = False, cmap: str | None = None, clip: float | None = None,
             smooth: float = 0.0) -> np.ndarray:
    """[H,W] map -> [H,W,3] uint8 RGB (see `display_scale` for `clip` and `smooth`)."""
    import matplotlib

    unit = display_scale(m, signed, clip, smooth)
    if signed:
        unit = (unit + 1) / 2
    cm = matplotlib.colormaps[cmap or (SIGNED_CMAP if signed else UNSIGNED_CMAP)]
    return (cm(unit)[..., :3] * 255).astype(np.uint8)


def resize_map(m, size_wh) -> np.ndarray:
    """Resize a map to (width, height) bilinearly (align_corners=False, like the methods)."""
    t = torch.from_numpy(_to_numpy_map(m))[None, None]
    out = torch.nn.functional.interpolate(t, size=(size_wh[1], size_wh[0]), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def overlay(image, m, signed: bool = False, alpha: float = 0.5, cmap: str | None = None, clip: float | None = 99.5,
            smooth: float = 0.0):
    """Blend the colourised map over the photo (the map is resized to the photo).

    Unsigned maps cover the photo with uniform opacity `alpha`; signed maps are opaque in
    proportion to |value| (zero evidence leaves the photo as it is: red for, blue against).
    `clip` and `smooth` change the display only (see `display_scale`).
    """
    from PIL import Image

    if not 0 <= alpha <= 1:
        raise SaliencyError(f"alpha must be in [0,1], got {alpha}")
    img = load_image(image)
    resized = resize_map(display_smooth(m, smooth), img.size)
    heat = colorize(resized, signed, cmap, clip).astype(np.float32)
    if signed:
        a = alpha * np.abs(display_scale(resized, True, clip))[..., None] ** 0.5 * 1.6
        a = np.clip(a, 0, 1)
    else:
        a = alpha
    blended = (1 - a) * np.asarray(img, dtype=np.float32) + a * heat
    return Image.fromarray(blended.clip(0, 255).astype(np.uint8))
