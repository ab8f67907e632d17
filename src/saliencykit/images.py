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
    """Open a photo as RGB PIL image from a path, PIL image or HxW[xC] uint8/float array.

    Grayscale and RGBA photos are converted to RGB (alpha composited on white). A file is decoded
    here once; an RGB PIL image is returned as it is, so passing the result on costs nothing.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise SaliencyError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                img = im.copy()
        except (UnidentifiedImageError, OSError) as err:
            raise SaliencyError(f"cannot read image {path}: not a readable image file ({err})") from None
    elif isinstance(source, Image.Image):
        if source.mode == "RGB":
            return source  # already decoded and RGB: every later step reads it as it is, no copy
        img = source
    elif isinstance(source, np.ndarray):
        arr = source
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise SaliencyError(f"image array must be HxW or HxWxC with C in 1,3,4; got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = np.clip(arr.astype(np.float64), 0, 1 if arr.max() <= 1.0 else 255)
            arr = (arr * 255 if arr.max() <= 1.0 else arr).round().astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        img = Image.fromarray(arr)
    else:
        raise SaliencyError(f"cannot use {type(source).__name__} as an image; give a path, PIL image or array")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


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
