"""Pictures: annotated overlays, comparison grids and map files, on top of `saliencykit.maps`
(normalisation, colour maps and the overlay, re-exported here).

Every picture says what it shows: the method's display name, the target and its probability
where known, and a colour bar (signed maps diverging and centred at zero, unsigned maps
sequential). Pixel-level maps are clipped at a lower percentile (and optionally smoothed) for
display only; the stored maps are never touched. Titles are wrapped to the width measured by the
renderer, and the layout is computed from the text extents, so nothing is cut.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import SaliencyError
from ..files import atomic_write  # noqa: F401  (re-exported: it lived here)
from ..images import load_image
from ..maps import (SIGNED_CMAP, UNSIGNED_CMAP, _to_numpy_map, colorize,  # noqa: F401
                    display_scale, display_smooth, normalize_maps, overlay, resize_map)

CLIP = 99.5            # display percentile of region maps (CAMs, perturbation): barely changes them
SPECKLE_CLIP = 99.0    # display percentile of pixel-level maps (gradients, paths), spread thinly
AGREE = 0.98           # rank correlation above which a grid shows two methods' maps as one column
SCALE_WORDS = {False: "each map scaled on its own: minimum → maximum",
               True: "signed: scaled by its largest |value|, white = 0 (red for, blue against)"}


def save_png(pil_image, path) -> Path:
    return atomic_write(path, lambda p: pil_image.save(p, format="PNG"))


def save_map_png(m, path, signed: bool = False, cmap: str | None = None) -> Path:
    from PIL import Image

    return save_png(Image.fromarray(colorize(m, signed, cmap)), path)


def save_map_npz(m, path, **meta) -> Path:
    """One map as `maps` `[1,H,W]` float32 (the key and shape of `Explanation.save`), plus `meta`."""
    arr = _to_numpy_map(m)[None]
    return atomic_write(path, lambda p: np.savez_compressed(p, maps=arr, **{k: np.asarray(v) for k, v in meta.items()}))


def display_options(method: str | None, smooth: float = 0.0) -> dict:
    """How a method's map is shown: `clip` percentile, and `smooth` for pixel-level maps only."""
    from .names import is_speckled

    speckled = method is not None and is_speckled(method)
    return {"clip": SPECKLE_CLIP if speckled else CLIP, "smooth": smooth if speckled else 0.0}


def rank_agreement(a, b, cells: int = 56) -> float:
    """Spearman rank correlation of two maps pooled to `cells` x `cells` (1.0 = same ordering); two
    maps of a series ([T]) are ranked step by step."""
    import torch
    from scipy.stats import spearmanr

    def ranked(m):
        if isinstance(m, torch.Tensor) and m.dim() == 1:
            return m.detach().double().cpu().numpy()
        return torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(_to_numpy_map(m))[None, None],
                                                       cells).ravel().numpy()

    pooled = [ranked(m) for m in (a, b)]
    if np.ptp(pooled[0]) == 0 or np.ptp(pooled[1]) == 0:
        return 0.0
    rho = spearmanr(pooled[0], pooled[1]).statistic
    return float(rho) if np.isfinite(rho) else 0.0


def agreeing_groups(rows: Sequence[dict], methods: Sequence[str], threshold: float = AGREE) -> list[list[str]]:
    """Methods whose maps agree on every row (rank correlation > `threshold`, same signedness),
    grouped greedily in the given order: each group's first method stands for the rest."""
    groups: list[list[str]] = []
    for name in methods:
        for g in groups:
            lead = g[0]
            if all(_cell(r, lead)[1] == _cell(r, name)[1] and
                   rank_agreement(_cell(r, lead)[0], _cell(r, name)[0]) > threshold for r in rows):
                g.append(name)
                break
        else:
            groups.append([name])
    return groups


def _cell(row: dict, name: str) -> tuple:
    """(map, signed, note) of one grid cell given as (map, signed) or {"map", "signed", "note"}."""
    v = row[name]
    if isinstance(v, dict):
        return v["map"], bool(v.get("signed", False)), v.get("note")
    return v[0], bool(v[1]), (v[2] if len(v) > 2 else None)


# ------------------------------------------------------------------------------------- text fitting
def _text_width(fig, text: str, size: float, weight: str = "normal") -> float:
    t = fig.text(0, 0, text, fontsize=size, fontweight=weight)
    w = t.get_window_extent(renderer=fig.canvas.get_renderer()).width
    t.remove()
    return w


def fit_text(fig, text: str, width_px: float, size: float = 9, weight: str = "normal",
             min_size: float = 6) -> tuple[str, float]:
    """`text` wrapped (at spaces) to `width_px` as the renderer measures it; the font shrinks
    (down to `min_size`) while a single word is still too wide. Returns (text, font size)."""
    while True:
        lines = []
        for para in str(text).split("\n"):
            cur = ""
            for word in para.split(" "):
                trial = f"{cur} {word}".strip()
                if not cur or _text_width(fig, trial, size, weight) <= width_px:
                    cur = trial
                else:
                    lines.append(cur)
                    cur = word
            lines.append(cur)
        widest = max(_text_width(fig, ln, size, weight) for ln in lines)
        if widest <= width_px or size <= min_size:
            return "\n".join(lines), size
        size = max(min_size, size - 0.5)


def _colour_bar(fig, cax, signed: bool, width_px: float, size: float = 7):
    """A horizontal colour bar in `cax` whose end labels stay inside it and whose label names the scale."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cmap = matplotlib.colormaps[SIGNED_CMAP if signed else UNSIGNED_CMAP]
    bar = fig.colorbar(ScalarMappable(Normalize(-1 if signed else 0, 1), cmap), cax=cax, orientation="horizontal")
    if signed:
        bar.set_ticks([-1, 0, 1], labels=["−max (against)", "0", "+max (for)"], fontsize=size)
    else:
        bar.set_ticks([0, 1], labels=["min", "max"], fontsize=size)
    ticks = cax.get_xticklabels()
    ticks[0].set_horizontalalignment("left")
    ticks[-1].set_horizontalalignment("right")
    label, fs = fit_text(fig, SCALE_WORDS[signed], max(width_px, 60), size)
    bar.set_label(label, fontsize=fs)
    return bar


def _bars_and_caption(sub, kinds, caption: str, width_px: float):
    """The bottom of a picture: one colour bar per kind of map shown, side by side, and the caption."""
    if kinds:
        ratios = [1, 0.25, 1] if len(kinds) == 2 else [0.15, 1, 0.15]
        gs = sub.add_gridspec(1, 3, width_ratios=ratios)
        share = 1 / 2.25 if len(kinds) == 2 else 1 / 1.3
        for signed, col in zip(kinds, (0, 2) if len(kinds) == 2 else (1,)):
            _colour_bar(sub, sub.add_subplot(gs[0, col]), signed, width_px * share)
    if caption:
        text, fs = fit_text(sub, caption, width_px, 8)
        sub.supxlabel(text, fontsize=fs)


def _caption_lines(fig, caption: str, width_px: float) -> int:
    return fit_text(fig, caption, width_px, 8)[0].count("\n") + 1 if caption else 0


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi: int):
    plt = _plt()
    if path is None:
        return fig
    atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, format="png"))
    plt.close(fig)
    return Path(path)


# ------------------------------------------------------------------------------------- pictures
def _font(size: int, bold: bool = False):
    """DejaVu Sans (shipped with matplotlib) at `size` pixels, so pictures look the same everywhere."""
    import matplotlib
    from PIL import ImageFont

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def fit_lines(text: str, width_px: float, size: int, bold: bool = False, min_size: int = 8):
    """`text` wrapped at spaces to lines no wider than `width_px` as the font measures them; the
    font shrinks (down to `min_size`) while one word alone is too wide. Returns (lines, font)."""
    while True:
        font = _font(size, bold)
        lines = []
        for para in str(text).split("\n"):
            cur = ""
            for word in para.split(" "):
                trial = f"{cur} {word}".strip()
                if not cur or font.getlength(trial) <= width_px:
                    cur = trial
                else:
                    lines.append(cur)
                    cur = word
            lines.append(cur)
        if max(font.getlength(ln) for ln in lines) <= width_px or size <= min_size:
            return lines, font
        size -= 1


def colour_ramp(signed: bool, width: int, height: int) -> np.ndarray:
    """The colour bar's pixels, [height, width, 3] uint8, low on the left."""
    ramp = np.linspace(-1 if signed else 0, 1, width, dtype=np.float32)[None].repeat(height, 0)
    return colorize(ramp, signed=signed)  # the ramp spans the full scale, so colorize's own scaling is the identity


def figure(image, m, signed: bool = False, method: str | None = None, target: str | None = None,
           prob: float | None = None, notes: Sequence[str] = (), path=None, alpha: float = 0.5,
           smooth: float = 0.0, width: int = 360):
    """One overlay that explains itself: the method's display name, the photo with the map, the
    target and its probability, a colour bar naming the scale, and any warnings below it.

    Drawn with PIL (a tenth of the time matplotlib takes, and the CLI writes one per map); every
    line of text is wrapped to the width its font measures. Returns the path written, or the
    picture (a PIL image) when `path` is None.
    """
    from PIL import Image, ImageDraw

    from .names import method_title

    pil = load_image(image)
    pad = 8
    inner = width - 2 * pad
    shown = pil.resize((inner, max(1, round(pil.size[1] * inner / pil.size[0]))), Image.BILINEAR)
    opts = display_options(method, smooth)
    over = overlay(shown, m, signed=signed, alpha=alpha, **opts)
    what = target or ""
    if prob is not None:
        what = f"{what} ({_pct(prob)})" if what else _pct(prob)
    blocks = []  # (lines, font, colour, gap above)
    blocks.append((*fit_lines(method_title(method) if method else "saliency map", inner, 15, bold=True),
                   "#111", pad))
    blocks.append(("image", None, None, 6))
    if what:
        blocks.append((*fit_lines(f"explaining {what}", inner, 12), "#222", 4))
    blocks.append(("bar", None, None, 8))
    ticks = ["−max (against)", "0", "+max (for)"] if signed else ["min", "max"]
    tick_font = _font(11)
    blocks.append((*fit_lines(SCALE_WORDS[signed], inner, 11), "#444", 16))
    extra = [f"⚠ {n}" for n in notes if n]
    if opts["clip"] == SPECKLE_CLIP:
        extra.append(f"display: clipped at the {SPECKLE_CLIP:g}th percentile" + (", smoothed" if opts["smooth"] else ""))
    for n in extra:
        blocks.append((*fit_lines(n, inner, 11), "#8a4b00" if n.startswith("⚠") else "#444", 4))
    bar_h = 12

    def line_h(font):
        return font.getbbox("Ag")[3] + 3

    height = pad
    for lines, font, _, gap in blocks:
        height += gap + (over.size[1] if lines == "image" else bar_h if lines == "bar" else len(lines) * line_h(font))
    height += pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for lines, font, colour, gap in blocks:
        y += gap
        if lines == "image":
            canvas.paste(over, (pad, y))
            draw.rectangle([pad - 1, y - 1, pad + over.size[0], y + over.size[1]], outline="#999")
            y += over.size[1]
        elif lines == "bar":
            canvas.paste(Image.fromarray(colour_ramp(signed, inner, bar_h)), (pad, y))
            draw.rectangle([pad - 1, y - 1, pad + inner, y + bar_h], outline="#999")
            y += bar_h
            for k, t in enumerate(ticks):  # ends inside the bar's width: left-, centre-, right-aligned
                w = tick_font.getlength(t)
                x = pad if k == 0 else (width - pad - w if k == len(ticks) - 1 else (width - w) / 2)
                draw.text((x, y + 2), t, font=tick_font, fill="#333")
        else:
            for ln in lines:
                draw.text(((width - font.getlength(ln)) / 2, y), ln, font=font, fill=colour)
                y += line_h(font)
    if path is None:
        return canvas
    return save_png(canvas, path)


def _at_most(pil, width: int):
    """The photo, or a copy resized to `width` pixels wide when it is wider (the overlays of a grid
    are drawn at the size they are shown, not at the photo's)."""
    from PIL import Image

    if pil.size[0] <= width:
        return pil
    return pil.resize((width, max(1, round(pil.size[1] * width / pil.size[0]))), Image.BILINEAR)


def _pct(p: float) -> str:
    p = 100 * float(p)
    return f"{p:.0f} %" if p >= 1 else f"{p:.1f} %"


def grid(images: Sequence, rows: Sequence[dict], row_titles: Sequence[str] | None = None,
         path=None, alpha: float = 0.5, cell: float = 2.2, group: bool = True, smooth: float = 0.0,
         caption: str | None = None, dpi: int = 100):
    """A comparison figure: one row per photo, first column the photo, then one overlay per method,
    a colour bar per kind of map shown, and a caption that says how to read it.

    Args:
        images: photos (anything `load_image` accepts), one per row.
        rows: per row, an ordered dict `{method name: (map [H,W], signed)}` (or `(map, signed,
            note)`, or `{"map", "signed", "note"}`: a note, such as a warning, under that cell).
        row_titles: a title per row (e.g. the photo, the class explained and its probability),
            shown under the photo.
        group: methods whose maps agree on every row (rank correlation > `AGREE`) share one
            column, and the caption says so; False shows every method.
        smooth: display-only smoothing of pixel-level maps (see `maps.display_smooth`).
        caption: a sentence added to the caption.
    """
    from .names import method_title

    plt = _plt()
    if len(images) != len(rows):
        raise SaliencyError(f"{len(images)} images but {len(rows)} rows of maps")
    if row_titles is not None and len(row_titles) != len(rows):
        raise SaliencyError(f"{len(row_titles)} row titles for {len(rows)} rows")
    methods = list(rows[0]) if rows else []
    for r in rows:
        if list(r) != methods:
            raise SaliencyError("every row of a grid needs the same methods in the same order")
    groups = agreeing_groups(rows, methods) if group and len(rows) and len(methods) > 1 else [[m] for m in methods]
    ncol = 1 + len(groups)
    kinds = sorted({_cell(rows[0], g[0])[1] for g in groups}) if rows else []
    pils = [_at_most(load_image(img), round(cell * dpi * 1.5)) for img in images]  # a cell shows no more
    width_px = cell * dpi * 0.92
    total_px = cell * ncol * dpi * 0.96
    words = []
    for g in (g for g in groups if len(g) > 1):
        others = [method_title(n) for n in g[1:]]
        who = others[0] if len(others) == 1 else ", ".join(others[:-1]) + " and " + others[-1]
        one = len(others) == 1
        words.append(f"{who} {'agrees' if one else 'agree'} with {method_title(g[0])} (rank correlation > "
                     f"{AGREE:g} on every photo) and {'shares' if one else 'share'} its column.")
    speckled = [g[0] for g in groups if display_options(g[0], smooth)["clip"] == SPECKLE_CLIP]
    if speckled:
        words.append(f"{', '.join(method_title(n) for n in speckled)}: pixel-level maps, shown clipped at the "
                     f"{SPECKLE_CLIP:g}th percentile{' and smoothed' if smooth else ''} (display only).")
    if caption:
        words.append(caption)
    caption_text = " ".join(words)
    probe = plt.figure(figsize=(cell * ncol, 1), dpi=dpi)
    lines = _caption_lines(probe, caption_text, total_px)
    plt.close(probe)
    heights = [cell * p.size[1] / p.size[0] + 0.4 for p in pils]   # each row as tall as its photo, + its label
    top_h = sum(heights) + 0.45
    bottom_h = (0.8 if kinds else 0.1) + 0.15 * lines
    fig = plt.figure(figsize=(cell * ncol, top_h + bottom_h), dpi=dpi, layout="constrained")
    top, sub = fig.subfigures(2, 1, height_ratios=[top_h, bottom_h])
    gs = top.add_gridspec(len(rows), ncol, height_ratios=heights)
    for r, (pil, row) in enumerate(zip(pils, rows)):
        ax = top.add_subplot(gs[r, 0])
        ax.imshow(pil)
        if row_titles:
            t, fs = fit_text(fig, row_titles[r], width_px, 8)
            ax.set_xlabel(t, fontsize=fs)
        for c, g in enumerate(groups, start=1):
            m, signed, note = _cell(row, g[0])
            ax = top.add_subplot(gs[r, c])
            ax.imshow(overlay(pil, m, signed=signed, alpha=alpha, **display_options(g[0], smooth)))
            if r == 0:
                head = method_title(g[0]) + (" (signed)" if signed else "")
                if len(g) > 1:
                    head += "\n= " + ", ".join(method_title(n) for n in g[1:])
                t, fs = fit_text(fig, head, width_px, 9)
                ax.set_title(t, fontsize=fs)
            notes = [n for n in (note, *(_cell(row, n)[2] for n in g[1:])) if n]
            if notes:
                t, fs = fit_text(fig, "⚠ " + "; ".join(dict.fromkeys(notes)), width_px, 6.5, min_size=5)
                ax.set_xlabel(t, fontsize=fs, color="#8a4b00")
    for ax in top.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    _bars_and_caption(sub, kinds, caption_text, total_px)
    return _save(fig, path, dpi)



def series_plot(series, m, signed: bool = False, method: str | None = None, target: str | None = None,
                path=None, width: float = 7.0, height: float = 2.4):
    """A series `[C,T]` (or `[T]`) as lines, with its map `[T]` as a coloured band under them
    (the map's colour scale: diverging for a signed map, centred at 0 (white) and symmetric to its
    largest |value|; sequential from its minimum to its maximum otherwise) and a colour bar of that
    scale in the map's own units; `m=None` draws the series alone. Returns the path written, or the
    matplotlib figure when `path` is None."""
    s = np.asarray(series.detach().cpu() if hasattr(series, "detach") else series, dtype=np.float64)
    if s.ndim == 1:
        s = s[None]
    mm = None if m is None else np.asarray(m.detach().cpu() if hasattr(m, "detach") else m, dtype=np.float32)
    if s.ndim != 2 or (mm is not None and (mm.ndim != 1 or mm.shape[0] != s.shape[1])):
        raise SaliencyError(f"series_plot needs a series [C,T] and a map [T] of the same length; got {s.shape} "
                            f"and {None if mm is None else mm.shape}")
    from .names import method_title

    plt = _plt()
    fig, ax = plt.subplots(figsize=(width, height))
    t = np.arange(s.shape[1])
    lo, hi = float(s.min()), float(s.max())
    pad = 0.05 * (hi - lo or 1.0)
    if mm is not None:
        # the map's own scale, as `colorize` draws it: signed maps symmetric around 0, others min..max
        if signed:
            top = float(np.abs(mm).max()) or 1.0
            vmin, vmax, cmap = -top, top, SIGNED_CMAP
        else:
            vmin, vmax, cmap = float(mm.min()), float(mm.max()), UNSIGNED_CMAP
            if vmax <= vmin:
                vmax = vmin + 1.0
        band = ax.imshow(mm[None], cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                         extent=(-0.5, s.shape[1] - 0.5, lo - pad, hi + pad), alpha=0.85, interpolation="nearest",
                         zorder=0)
        bar = fig.colorbar(band, ax=ax, fraction=0.04, pad=0.015)
        bar.set_label("map (red for, blue against)" if signed else "map", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    for c in range(s.shape[0]):
        ax.plot(t, s[c], lw=1.0, color="black" if s.shape[0] == 1 else None, zorder=2, label=f"channel {c}")
    if s.shape[0] > 1:
        ax.legend(loc="upper right", fontsize=7, frameon=False)
    ax.set_xlim(-0.5, s.shape[1] - 0.5)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("time step")
    title = method_title(method) if method else ("series" if mm is None else "saliency")
    ax.set_title(f"{title}: {target}" if target else title, fontsize=10)
    fig.tight_layout()
    if path is None:
        return fig
    return _save(fig, path, dpi=110)


def spectrum_plot(explanation, index: int = 0, path=None, width: float = 7.0, height: float = 2.4):
    """The frequency view of a cross-domain IG explanation (`method="cross_domain_ig"`,
    `domain="frequency"`): each frequency bin's attribution (channels summed) as a bar, red for,
    blue against, on the frequencies in `extras["frequencies"]` (cycles per step). A time-frequency
    explanation is drawn as an image (bins x frames). Returns the path written, or the figure."""
    raw = getattr(explanation, "raw", None)
    freqs = (explanation.extras or {}).get("frequencies")
    if raw is None or freqs is None:
        raise SaliencyError("spectrum_plot draws a cross-domain IG explanation (method 'cross_domain_ig' with "
                            "domain 'frequency' or 'time_frequency'); this one has no frequency attributions")
    r = np.asarray(raw[index].detach().cpu().double().sum(0))     # [F] or [F, frames]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(width, height))
    f = np.asarray(freqs, dtype=np.float64)
    if r.ndim == 1:
        colours = np.where(r >= 0, "#c0392b", "#2c6fbb")
        ax.bar(f, r, width=(f[1] - f[0]) * 0.8 if len(f) > 1 else 0.4, color=colours)
        ax.axhline(0, color="#444", lw=0.6)
        ax.set_ylabel("attribution")
    else:
        lim = float(np.abs(r).max()) or 1.0
        im = ax.imshow(r, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim,
                       extent=(-0.5, r.shape[1] - 0.5, f[0], f[-1]))
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
        ax.set_xlabel("frame")
    ax.set_xlabel("frequency (cycles per step)" if r.ndim == 1 else "frame")
    if r.ndim == 2:
        ax.set_ylabel("frequency (cycles per step)")
    ax.set_title(f"cross-domain IG, {explanation.extras.get('domain', 'frequency')} domain", fontsize=10)
    fig.tight_layout()
    if path is None:
        return fig
    return _save(fig, path, dpi=110)
