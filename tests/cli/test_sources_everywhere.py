"""One notion of a source: explain, evaluate and report take a folder, a list or parts:N like
`run` does; evaluate over several photos prints the spread (bootstrap intervals, per-photo wins)
and keeps the maps with --save-maps."""
import json

import numpy as np
from PIL import Image

from saliencykit import Explanation
from saliencykit.cli import main


def _folder(root, n=3):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_explain_a_folder_skips_what_is_not_an_image(tmp_path, capsys):
    src = _folder(tmp_path / "imgs")
    out = tmp_path / "out"
    assert main(["explain", str(src), "--model", "parts_cnn", "--method", "gradcam", "--out", str(out),
                 "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [p["photo"] for p in summary["photos"]] == ["im0", "im1", "im2"]
    assert "notes.txt: not an image file" in capsys.readouterr().err


def test_evaluate_a_source_prints_the_spread_and_saves_maps(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["evaluate", "parts:6", "--model", "parts_cnn", "--method", "gradcam", "--method", "saliency",
                 "--metric", "deletion", "--param", "deletion.step=256", "--out", str(out), "--save-maps",
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "95 % bootstrap interval" in text and "per-photo wins:" in text
    assert "gradcam better than random on" in text
    e = Explanation.load(out / "maps" / "gradcam")
    assert e.maps.shape == (6, 64, 64) and e.method == "gradcam"


def test_report_on_a_list(tmp_path):
    src = _folder(tmp_path / "imgs", n=2)
    (tmp_path / "l.csv").write_text("path\nimgs/im0.png\nimgs/im1.png\n")
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "l.csv"), "--model", "parts_cnn", "--method", "gradcam", "--out",
                 str(out), "--quiet", "--no-words"]) == 0
    html = out.read_text()
    assert "imgs_im0" in html and "imgs_im1" in html
    assert src.exists()
