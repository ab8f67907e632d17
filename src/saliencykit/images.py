"""Photos in: decoding an image file, PIL image or array into RGB once, and the default
resize-and-normalise preprocessing (`ImagePreprocess`)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import SaliencyError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(source) -> "Image.Image":
    """Open a photo as RGB PIL image from a path, PIL image or HxW[xC] array.

    Every mode PIL opens either converts with its values kept in range or is refused by name:
    grayscale, palette, CMYK and YCbCr convert to RGB; alpha (RGBA, LA, PA, a palette with
    transparency) is composited on white; 16-bit images (I;16, and I / integer arrays whose values
    fit 16 bits) are scaled to 8 bits (/257); 32-bit float images (F) and float arrays are read as
    0..1 or 0..255 and refused outside 0..255; LAB, HSV and premultiplied modes are refused. A
    photo's EXIF orientation is applied, so the map lines up with the photo as it is shown. A file
    is decoded here once; an RGB PIL image with no orientation to apply is returned as it is, so
    passing the result on costs nothing.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise SaliencyError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                img = im.copy()
                orientation = im.getexif().get(_ORIENTATION, 1)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as err:
            raise SaliencyError(f"cannot read image {path}: not a readable image file ({err})") from None
        what = f"image {path}"
    elif isinstance(source, Image.Image):
        orientation = source.getexif().get(_ORIENTATION, 1)
        if source.mode == "RGB" and orientation in (1, None):
            return source  # already decoded and RGB: every later step reads it as it is, no copy
        img, what = source, "PIL image"
    elif isinstance(source, np.ndarray):
        img, orientation, what = Image.fromarray(_uint8_array(source)), 1, "image array"
    else:
        raise SaliencyError(f"cannot use {type(source).__name__} as an image; give a path, PIL image or array")
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
    return _to_rgb(img, what)


_ORIENTATION = 0x0112  # the EXIF tag of how the camera was held


def _uint8_array(source: np.ndarray) -> np.ndarray:
    """An HxW[xC] array as uint8 pixel values, its range read from its type (see `load_image`)."""
    arr = source
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise SaliencyError(f"image array must be HxW or HxWxC with C in 1,3,4; got shape {arr.shape}")
    if arr.size == 0:
        raise SaliencyError(f"image array is empty (shape {arr.shape})")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        return _integer_pixels(arr, f"an image array of {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise SaliencyError(f"image array must hold numbers, got dtype {arr.dtype}")
    return _float_pixels(arr, "a float image array")


def _integer_pixels(arr: np.ndarray, what: str) -> np.ndarray:
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 65535:
        raise SaliencyError(f"{what} has values {lo}..{hi}: neither 8-bit (0..255) nor 16-bit (0..65535) pixels; "
                            "scale it to 0..255 (uint8) first")
    if arr.dtype.itemsize == 1 or (hi <= 255 and arr.dtype.itemsize > 2):
        return arr.astype(np.uint8)  # 8-bit ints, and 32/64-bit ints holding 8-bit values
    return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)  # 16-bit: 65535 -> 255


def _float_pixels(arr: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise SaliencyError(f"{what} contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 255:
        raise SaliencyError(f"{what} has values {lo:.4g}..{hi:.4g}, outside 0..1 and 0..255: pass pixel values "
                            "(a normalised tensor goes to explain directly, not through the photo loader)")
    scale = 255.0 if hi <= 1.0 else 1.0
    return np.round(arr.astype(np.float64) * scale).astype(np.uint8)


def _to_rgb(img, what: str):
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        img = Image.fromarray(_integer_pixels(np.asarray(img), f"the {mode} {what}"))
    elif mode == "F":
        img = Image.fromarray(_float_pixels(np.asarray(img), f"the 32-bit float {what}"))
    elif mode not in _CONVERTIBLE:
        raise SaliencyError(f"the {what} is in mode {mode}, which is not read as a photo here; "
                            "convert it to RGB first (PIL: image.convert('RGB') where that is what you mean)")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


# modes whose conversion to RGB keeps what the photo shows (16-bit and float modes are scaled first)
_CONVERTIBLE = {"1", "L", "P", "RGB", "RGBA", "RGBX", "LA", "PA", "CMYK", "YCbCr"}


class ImagePreprocess:
    """Resize the whole photo (no crop, so maps line up with it) and normalise per channel."""

    def __init__(self, size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        img = load_image(image).resize((self.size[1], self.size[0]), Image.BILINEAR)
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (arr - mean) / std

    def __repr__(self):
        return f"ImagePreprocess(size={self.size}, mean={self.mean}, std={self.std})"


def transparency_note(source) -> str | None:
    """A sentence when `source` (a path, PIL image or array) has transparent pixels, which
    `load_image` composites on white: the alpha channel is a real change of the input the model
    sees, so a person should be told. None for an opaque photo or anything unreadable."""
    from PIL import Image

    try:
        if isinstance(source, (str, os.PathLike)):
            with Image.open(source) as im:
                if "A" not in im.getbands() and "transparency" not in im.info:
                    return None
                alpha = im.convert("RGBA").getchannel("A")
        elif isinstance(source, Image.Image):
            if "A" not in source.getbands() and "transparency" not in source.info:
                return None
            alpha = source.convert("RGBA").getchannel("A")
        elif isinstance(source, np.ndarray) and source.ndim == 3 and source.shape[2] == 4:
            a = source[..., 3]
            return None if a.min() >= (255 if a.dtype == np.uint8 else 1.0) else _ALPHA_NOTE
        else:
            return None
    except (OSError, ValueError):
        return None
    return _ALPHA_NOTE if alpha.getextrema()[0] < 255 else None


_ALPHA_NOTE = ("the photo has transparent pixels: they were composited on white before the model saw them, "
               "so the white areas are part of what was explained")
