"""Pictures that explain themselves: every overlay and grid carries its colour bar, names the
method and the target, groups methods that agree, and keeps every piece of text inside the
canvas; display options never touch the stored map."""
import warnings

import numpy as np
import pytest
import torch

from saliencykit import data
from saliencykit.present import viz


def _texts_inside(fig):
    """Every visible, non-empty text artist's box lies inside the figure (1 px of antialiasing)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    out = []
    for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_window_extent")):
        if not t.get_visible() or not str(t.get_text()).strip():
            continue
        e = t.get_window_extent(renderer)
        out.append((t.get_text(), e.x0 >= box.x0 - 1 and e.x1 <= box.x1 + 1 and e.y0 >= box.y0 - 1
                    and e.y1 <= box.y1 + 1))
    return out


def _overlapping(fig):
    """Pairs of visible text boxes that overlap each other (titles running into their neighbours)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in
             fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_window_extent"))
             if t.get_visible() and str(t.get_text()).strip()]
    return [(a, b) for i, (a, ea) in enumerate(boxes) for b, eb in boxes[i + 1:]
            if ea.x0 < eb.x1 - 1 and eb.x0 < ea.x1 - 1 and ea.y0 < eb.y1 - 1 and eb.y0 < ea.y1 - 1]


def _maps(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(56, 56, generator=g) for _ in range(n)]


def test_grid_of_one_photo_keeps_every_title_inside():
    # the bug: `explain --grid` on one photo cut the first letter of the row title. Long titles
    # are wrapped to the measured column width, and no text leaves the canvas
    photo = data.image("chelsea")
    a, b, c = _maps()
    row = {"gradcam": (a, False), "integrated_gradients": (b * 2 - 1, True), "guided_backprop": (c, False)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a collapsed constrained layout warns: that is a failure too
        fig = viz.grid([photo], [row], ["chelsea: a very long class name that would run off the left edge (80 %)"])
    texts = _texts_inside(fig)
    assert texts and all(inside for _, inside in texts), [t for t, ok in texts if not ok]
    assert _overlapping(fig) == []
    shown = " ".join(t for t, _ in texts)
    # display names, both colour bars with what their scale means, the display clipping said once
    for words in ("Grad-CAM", "Integrated Gradients (signed)", "Guided Backprop", "min", "max", "−max (against)",
                  "+max (for)", "white = 0", "clipped at the 99th percentile"):
        assert words in shown, words
    assert len(fig.axes) == 4 + 2  # photo + 3 overlays + 2 colour bars


def test_grid_groups_methods_that_agree():
    # two methods with the same map (rank correlation 1 > 0.98) share one column, and the caption
    # says so; a method with another ordering keeps its own column
    photos = [data.image("chelsea"), data.image("coffee")]
    rows = []
    for seed in (1, 2):
        a, b, _ = _maps(seed)
        rows.append({"gradcam": (a, False), "hirescam": (a * 3 + 1, False), "eigencam": (b, False)})
    assert viz.agreeing_groups(rows, list(rows[0])) == [["gradcam", "hirescam"], ["eigencam"]]
    fig = viz.grid(photos, rows, ["chelsea", "coffee"])
    shown = " ".join(t for t, _ in _texts_inside(fig))
    assert "= HiResCAM" in shown and "HiResCAM agrees with Grad-CAM" in shown
    assert len(fig.axes) == 2 * 3 + 1  # 2 rows x (photo + 2 columns) + one colour bar (unsigned only)
    fig = viz.grid(photos, rows, group=False)
    assert len(fig.axes) == 2 * 4 + 1


def test_agreement_needs_every_row():
    # agreeing on one photo is not enough: the grid must not hide a column that differs elsewhere
    a, b, c = _maps(3)
    rows = [{"gradcam": (a, False), "hirescam": (a, False)}, {"gradcam": (b, False), "hirescam": (c, False)}]
    assert viz.agreeing_groups(rows, ["gradcam", "hirescam"]) == [["gradcam"], ["hirescam"]]
    # nor two maps of different signedness
    rows = [{"gradcam": (a, False), "gradxinput": (a, True)}]
    assert viz.agreeing_groups(rows, ["gradcam", "gradxinput"]) == [["gradcam"], ["gradxinput"]]


def test_single_overlay_explains_itself(tmp_path):
    # the per-map PNG: 360 px wide (the width docs/output.md gives), taller than the photo by its
    # title, target line, colour bar, scale words and warning lines
    from PIL import Image

    m = torch.linspace(-1, 0.5, 64 * 64).reshape(64, 64)
    photo = data.image("rocket")
    plain = viz.figure(photo, m, True, "integrated_gradients", "missile", 0.26)
    warned = viz.figure(photo, m, True, "integrated_gradients", "missile", 0.26,
                        notes=["the attributions miss the score difference by 22 % (completeness error above 5 %); "
                               "the map is a coarse estimate of the path integral: use more steps (now 50; try 200)"])
    assert plain.size[0] == warned.size[0] == 360
    assert warned.size[1] > plain.size[1] > round(photo.size[1] * 344 / photo.size[0]) + 80
    path = viz.figure(photo, m, True, "gradcam", path=tmp_path / "o.png")
    assert Image.open(path).size[0] == 360


def test_text_is_wrapped_to_the_measured_width():
    # every line fits the width the font measures; one word too long for the width shrinks the font
    lines, font = viz.fit_lines("the attributions miss the score difference by 22 % (completeness error)", 150, 12)
    assert len(lines) > 1 and all(font.getlength(ln) <= 150 for ln in lines)
    lines, font = viz.fit_lines("Supercalifragilisticexpialidocious", 150, 14)
    assert font.size < 14 and font.getlength(lines[0]) <= 150


def test_signed_colour_bar_is_centred_at_zero():
    # the middle of the diverging bar is the colour of 0 (near white), its ends the two hues; the
    # unsigned bar runs dark to light
    ramp = viz.colour_ramp(True, 201, 2).astype(int)
    assert ramp[0, 100].min() > 235  # RdBu_r at 0.5 is (247, 247, 247)
    assert ramp[0, 0, 2] > ramp[0, 0, 0] and ramp[0, -1, 0] > ramp[0, -1, 2]  # blue left, red right
    flat = viz.colour_ramp(False, 50, 1).astype(int).sum(-1)[0]
    assert flat[0] < flat[-1]


def test_display_options_leave_the_map_alone(chelsea):
    # clipping and smoothing change pixels on screen only: the array given is not modified
    m = torch.rand(32, 32)
    m[3, 3] = 50.0  # one speck that would wash everything else out
    before = m.clone()
    plain = np.asarray(viz.overlay(chelsea, m, clip=None))
    shown = np.asarray(viz.overlay(chelsea, m, **viz.display_options("integrated_gradients", smooth=0.02)))
    assert torch.equal(m, before)
    assert not np.array_equal(plain, shown)
    assert viz.display_options("gradcam", smooth=0.02) == {"clip": viz.CLIP, "smooth": 0.0}
    with pytest.raises(Exception, match="smooth"):
        viz.display_smooth(m, 2.0)


def test_map_npz_has_the_explanation_key_and_shape(tmp_path):
    viz.save_map_npz(torch.rand(8, 9), tmp_path / "m.npz", signed=True)
    with np.load(tmp_path / "m.npz") as z:
        assert z["maps"].shape == (1, 8, 9) and bool(z["signed"])


def test_series_plot_has_a_colour_bar_on_the_maps_scale(tmp_path):
    # the band's colours come from the colour bar's scale: a signed map is centred at 0 and symmetric
    # to its largest |value| (-2.5..2.5 here); an unsigned map spans its own min..max; the bar fits
    t = np.linspace(0, 6, 60)
    series = np.stack([np.sin(t), np.cos(t)])
    signed = np.where(t < 3, 1.0, -2.5) * (t > 1)
    fig = viz.series_plot(series, signed, signed=True, method="saliency", target="up")
    bars = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert len(bars) == 1
    band = fig.axes[0].images[0]
    assert band.get_clim() == (-2.5, 2.5)
    fig.canvas.draw()
    box, renderer = fig.bbox, fig.canvas.get_renderer()
    bar_texts = [bars[0].yaxis.label] + [t for t in bars[0].yaxis.get_ticklabels() if t.get_text()]
    assert all(box.x0 <= t.get_window_extent(renderer).x0 and t.get_window_extent(renderer).x1 <= box.x1 + 1
               for t in bar_texts)                         # the bar's label and ticks fit in the canvas
    fig2 = viz.series_plot(series[0], np.linspace(0.2, 0.9, 60), signed=False)
    assert fig2.axes[0].images[0].get_clim() == pytest.approx((0.2, 0.9))
    assert len([a for a in fig2.axes if a.get_label() == "<colorbar>"]) == 1
    out = viz.series_plot(series, signed, signed=True, path=tmp_path / "s.png")
    assert out.exists() and out.stat().st_size > 0
    alone = viz.series_plot(series, None)                    # the series without a map: no band, no bar
    assert not alone.axes[0].images and len(alone.axes) == 1
