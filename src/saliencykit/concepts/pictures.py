"""The concepts room's pictures, drawn with PIL (this room may not import `present`): an input
tensor as a photo, a layer cell as a box on it, numbered boxes, and pictures laid side by side."""
from __future__ import annotations

import numpy as np
import torch

# distinct colours for numbered boxes (paired boxes share one)
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]
MIN_SIDE = 224   # small inputs (a 32-px test image) are drawn enlarged, so boxes and numbers stay legible


def photo(subject, x: torch.Tensor, min_side: int = MIN_SIDE):
    """A [3,H,W] (or [1,3,H,W]) normalised input -> (PIL RGB image, scale from input pixels to it)."""
    from PIL import Image

    if x.dim() == 4:
        x = x[0]
    pixels = subject.unnormalize(x.detach().float().cpu().unsqueeze(0))[0]
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    arr = (pixels[:3].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    scale = max(1, int(np.ceil(min_side / min(img.size))))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img, scale


def cell_box(cell, grid, size) -> tuple[float, float, float, float]:
    """The input-pixel box (left, top, right, bottom) of cell (row, col) of an h x w layer grid on
    an input of `size` (H, W): the cell's share of the image (not the receptive field, which is larger)."""
    (r, c), (h, w), (H, W) = cell, grid, size
    return (c * W / w, r * H / h, (c + 1) * W / w, (r + 1) * H / h)


def draw_box(img, box, colour, label: str | None = None, scale: float = 1.0, width: int = 3):
    """Draw `box` (input pixels, scaled by `scale`) on PIL `img` in place, with `label` in its corner."""
    from PIL import ImageDraw

    d = ImageDraw.Draw(img)
    l_, t, r, b = (v * scale for v in box)
    d.rectangle([l_, t, r - 1, b - 1], outline=colour, width=width)
    if label:
        tw, th = d.textbbox((0, 0), label)[2:]
        d.rectangle([l_, t, l_ + tw + 4, t + th + 4], fill=colour)
        d.text((l_ + 2, t + 1), label, fill=(0, 0, 0))


def wrap(text: str, width: int, draw) -> list[str]:
    """`text` in lines that fit `width` pixels in PIL's default font (a word longer than that is cut
    where it no longer fits)."""
    lines: list[str] = []
    for part in str(text).split("\n"):
        line = ""
        for word in part.split(" "):
            trial = f"{line} {word}" if line else word
            if draw.textlength(trial) <= width or not line:
                line = trial
            else:
                lines.append(line)
                line = word
            while draw.textlength(line) > width and len(line) > 1:   # one long word: cut it
                cut = max(1, int(len(line) * width / draw.textlength(line)))
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def side_by_side(images, gap: int = 8, captions=None):
    """PIL images in one row on white, each with an optional caption above it (wrapped to its width)."""
    from PIL import Image, ImageDraw

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [wrap(c, im.width - 4, probe) for c, im in zip(captions, images)] if captions else None
    line_h = 12
    top = (max(len(ls) for ls in lines) * line_h + 4) if lines else 0
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    height = max(im.height for im in images) + top
    out = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(out)
    x = 0
    for i, im in enumerate(images):
        out.paste(im, (x, top))
        for n, line in enumerate(lines[i] if lines else []):
            d.text((x + 2, 2 + n * line_h), line, fill=(0, 0, 0))
        x += im.width + gap
    return out


def stacked(rows, gap: int = 8):
    """PIL images (rows) one above the other, left-aligned on white."""
    from PIL import Image

    width = max(im.width for im in rows)
    height = sum(im.height for im in rows) + gap * (len(rows) - 1)
    out = Image.new("RGB", (width, height), (255, 255, 255))
    y = 0
    for im in rows:
        out.paste(im, (0, y))
        y += im.height + gap
    return out


__all__ = ["photo", "cell_box", "draw_box", "wrap", "side_by_side", "stacked", "PALETTE"]
