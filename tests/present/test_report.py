"""The HTML report: self-contained, shows what was computed (predictions, overlays, words,
metrics, curves, reproducibility footer) and nothing fetched from the network."""
import base64
import io
import re
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from saliencykit import data, explain
from saliencykit.present import report
from saliencykit.cli import main, run_explain
from saliencykit.present.verbalize import verbalize


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.attrs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.attrs += [(tag, k, v) for k, v in attrs]


def _parse(html):
    c = _Collect()
    c.feed(html)
    return c


def _decode(uri):
    head, b64 = uri.split(",", 1)
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _assert_self_contained(html):
    c = _parse(html)
    for tag, key, value in c.attrs:
        if key == "src":
            assert value.startswith("data:image/"), (tag, value[:60])
        if key == "href":
            assert value.startswith("#"), (tag, value)
    assert not any(t in ("script", "link", "iframe") for t, _ in c.tags)
    # the only URL text allowed is the SVG namespace identifier (never fetched)
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) <= {"http://www.w3.org/2000/svg"}


def test_report_shows_what_was_computed(tiny):
    photo = data.image("chelsea")
    methods = ["gradcam", "gradxinput"]  # one unsigned, one signed map
    html = report.build(tiny, [photo], methods, metrics=["deletion"], names=["cat <b>photo</b>"],
                        metric_params={"deletion": {"step": 128}}, seed=3)
    _assert_self_contained(html)
    c = _parse(html)
    overlays = [a for t, a in c.tags if t == "figure" and "data-method" in a]
    assert [a["data-method"] for a in overlays] == methods
    imgs = [a["src"] for t, a in c.tags if t == "img" and a.get("alt", "").endswith("overlay")]
    assert len(imgs) == 2
    for uri in imgs:
        im = _decode(uri)
        assert im.size[0] == 320 and abs(im.size[1] - round(photo.size[1] * 320 / photo.size[0])) <= 1
    # names are escaped, never injected as markup
    assert "cat &lt;b&gt;photo&lt;/b&gt;" in html and "<b>photo</b>" not in html
    # top-5 predictions are the model's
    x = tiny.preprocess(photo)
    for p in tiny.predict(x, k=5)[0]:
        assert f"<td class=\"label\">{p['label']}</td>" in html and f"{100 * p['prob']:.1f}%" in html
    # the words are the verbalization of the first method (compared with the second)
    exps = explain(tiny, x, methods, seed=3)
    v = verbalize(tiny, x, exps["gradcam"], compare=[exps["gradxinput"]])
    assert str(report.rich_text(v.text)) in html
    # metric table: direction marked, values are evaluate()'s means for the same explanations
    from saliencykit.metrics import evaluate

    ev = evaluate(tiny, x, exps, metrics=["deletion"], seed=3, params={"deletion": {"step": 128}})
    assert "deletion ↓" in html
    means = {m: ev.results["deletion"][m].mean() for m in ev.methods}
    best = min(means, key=means.get)
    for m, val in means.items():
        cls = "best" if m == best else ""
        assert f"<tr><td>{m}</td><td class=\"{cls}\">{val:.3f}</td></tr>" in html
    # one curve per method plus the random baseline
    assert html.count("<polyline") == len(ev.methods) == 3
    # both colour bars (unsigned and signed maps present), and the footer
    assert "1 (map maximum)" in html and "+1 for" in html
    clip = report._overlay_clip()  # the overlays' saturation percentile is stated, whatever it is
    assert clip is None or f"the {clip}th percentile" in html
    assert "Reproducibility" in html and "torch " + torch.__version__ in html
    assert "<tr><th>seed</th><td>3</td></tr>" in html


def test_a_photo_is_decoded_once_per_section(tiny, tmp_path, monkeypatch):
    # what: photo_section on a file opens (decodes) it once and converts it once: the display copy
    # and the overlays of every method reuse the decoded image; why: a 4000x3000 JPEG decoded per
    # method and per picture was most of a report's time outside the model
    import saliencykit.images as images
    import saliencykit.maps as maps

    path = tmp_path / "cat.png"
    data.image("chelsea").save(path)
    opened, converted = [], []
    real_open, real_load = Image.open, images.load_image

    def counting_open(*a, **k):
        opened.append(a[0])
        return real_open(*a, **k)

    def counting_load(source):
        out = real_load(source)
        if out is not source:
            converted.append(source)
        return out

    monkeypatch.setattr(Image, "open", counting_open)
    monkeypatch.setattr(images, "load_image", counting_load)
    monkeypatch.setattr(maps, "load_image", counting_load)
    section = report.photo_section(tiny, path, "cat", methods=["gradcam", "gradxinput", "saliency"], verbalize=False)
    assert len(section["cells"]) == 3
    assert len(opened) == 1 and len(converted) == 1, (opened, converted)


def test_colour_bars_are_the_maps_colour_scale():
    import matplotlib

    unsigned = np.asarray(_decode(report.colour_bar(False)).convert("RGB"))
    signed = np.asarray(_decode(report.colour_bar(True)).convert("RGB"))
    inferno, rdbu = matplotlib.colormaps["inferno"], matplotlib.colormaps["RdBu_r"]
    # ends of the bars are the colormap's ends (uint8 rounding: 1 level)
    assert np.abs(unsigned[0, 0].astype(int) - (np.array(inferno(0.0)[:3]) * 255).astype(int)).max() <= 1
    assert np.abs(unsigned[0, -1].astype(int) - (np.array(inferno(1.0)[:3]) * 255).astype(int)).max() <= 1
    assert np.abs(signed[0, 0].astype(int) - (np.array(rdbu(0.0)[:3]) * 255).astype(int)).max() <= 1
    # signed: zero (the middle) is near-white, so "no evidence" reads as no colour
    assert signed[0, 128].min() >= 235


def test_report_without_metrics_package(tiny, monkeypatch):
    monkeypatch.setattr(report, "metrics_available", lambda: False)
    html = report.build(tiny, ["chelsea"], ["gradcam"], metrics=["deletion"])
    assert "evaluation package is not available" in html and "<polyline" not in html
    _assert_self_contained(html)


def test_report_command_writes_one_file(tmp_path, lite0):
    out = tmp_path / "r.html"
    assert main(["report", "chelsea", "--method", "gradcam", "--out", str(out), "--quiet"]) == 0
    html = out.read_text()
    _assert_self_contained(html)
    assert "Egyptian cat" in html and "Grad-CAM finds" in html and "efficientnet_lite0" in html
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temp file left behind
    # a contrast from the command line reaches the words
    out2 = tmp_path / "contrast.html"
    assert main(["report", "chelsea", "--method", "gradcam", "--contrast", "tabby", "--vs", "Egyptian cat",
                 "--out", str(out2), "--quiet"]) == 0
    assert "rather than <em>Egyptian cat</em>" in out2.read_text()
    # bad input: a clear error, no file
    bad = tmp_path / "bad.html"
    assert main(["report", "no_such_photo", "--out", str(bad), "--quiet"]) == 2
    assert main(["report", "chelsea", "--method", "nope", "--out", str(bad), "--quiet"]) == 2
    assert not bad.exists()


def test_demo_step_reuses_the_demo_maps(tmp_path, lite0, monkeypatch):
    from saliencykit.cli import report as report_cmd

    summary = run_explain(["chelsea"], ["gradcam", "saliency"], tmp_path, quiet=True)
    # the maps must come from the demo's files: explaining again would be a bug here
    monkeypatch.setattr("saliencykit.methods.base.Method.run",
                        lambda *a, **k: pytest.fail("demo_step recomputed a map"))
    report_cmd.demo_step(tmp_path, summary, SimpleNamespace(quiet=True))
    html = (tmp_path / "report.html").read_text()
    _assert_self_contained(html)
    assert html.count('data-method="') == 2 and "Grad-CAM finds" in html


def test_curve_ticks_are_round_and_cover_the_data():
    # the bug: ticks printed -0.899573 and 0.0502133. Ticks sit at a 1-2-5 step, reach past the
    # data at both ends, and print with the decimals the step needs (a minus sign, never "-0")
    ticks = report.nice_ticks(-0.899573, 0.0502133)
    assert [t for _, t in ticks] == ["−1.0", "−0.5", "0.0", "0.5"]
    assert [t for _, t in report.nice_ticks(-0.02, 0.013)] == ["−0.02", "−0.01", "0.00", "0.01", "0.02"]
    assert [t for _, t in report.nice_ticks(0, 150528, 3)] == ["0", "100000", "200000"]
    panel = report._svg_curves([{"method": "gradcam", "x": [0, 0.5, 1], "y": [-0.899573, -0.2, 0.0502133]}],
                               "p(a) − p(b)", "fraction removed")
    assert all(t["label"] in ("−1.0", "−0.5", "0.0", "0.5", "1.0") for t in panel["ticks_y"])
    assert panel["left"] >= 18 + 6 * 4  # room for the rotated y label and the widest tick label
    assert panel["zero"] is not None and panel["ylabel"] == "p(a) − p(b)"


def test_curve_label_says_what_is_plotted():
    assert report.curve_ylabel("prob", {"kind": "class", "name": "espresso"}) == "p(espresso)"
    contrast = {"kind": "contrast", "name": "tabby vs Egyptian cat", "vs_name": "Egyptian cat"}
    assert report.curve_ylabel("prob", contrast) == "p(tabby) − p(Egyptian cat)"
    assert report.curve_ylabel("logit", contrast) == "logit(tabby) − logit(Egyptian cat)"
    assert report.curve_ylabel("normalised accuracy", contrast) == "normalised accuracy"


def test_words_compare_with_the_method_that_differs():
    # Grad-CAM and a copy of it agree perfectly; the words compare Grad-CAM with the other one
    from saliencykit import Explanation

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 16, 16, generator=g), torch.rand(1, 16, 16, generator=g)
    exps = {"gradcam": Explanation(a, "gradcam"), "gradcam_pp": Explanation(a * 2, "gradcam_pp"),
            "saliency": Explanation(b, "saliency")}
    assert report.most_different(exps) == ["saliency"]
    assert report.most_different({"gradcam": exps["gradcam"]}) == []


def test_report_caption_and_warnings(tiny):
    # one caption that says one thing, a colour bar under every overlay, and the warnings of the
    # maps (here an IG completeness error of 30 %) in the page and in the cell
    from saliencykit.explanation import map_warnings

    photo = data.image("chelsea")
    exps = explain(tiny, tiny.preprocess(photo), method=["gradcam", "integrated_gradients"], steps=2)
    ig = exps["integrated_gradients"]
    ig.extras["warnings"] = map_warnings(True, ig.maps, ig.target, ig.params, {"relative_completeness_error": [0.3]})
    html = report.render([report.photo_section(tiny, photo, "chelsea", explanations=exps, verbalize=False)],
                         report.run_meta(tiny, list(exps), None, 0, []))
    assert "Shared colour scale" not in html and "each map is scaled on its own" in html
    assert html.count('class="cbar"') == 2
    assert "more steps" in html and "completeness error" in html
