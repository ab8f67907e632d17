"""`saliencykit run` and `summarize` from the shell: the contract's options, the exit codes (0
all fine, 3 some inputs failed, 2 refused), and the summary's table and HTML page."""
import numpy as np
from PIL import Image

from saliencykit.cli import main

BASE = ["--model", "parts_cnn", "--method", "gradcam", "--method", "saliency", "--batch", "4", "--shard-size", "8",
        "--workers", "0", "--quiet", "--threads", "1"]


def test_run_then_summarize(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "parts:16", *BASE, "--metric", "deletion", "--metric", "insertion",
                 "--param", "deletion.step=256", "--param", "insertion.step=256", "--out", str(out)])
    assert code == 0
    assert "48 rows for 16 images, 0 error(s)" in capsys.readouterr().out
    assert main(["summarize", str(out)]) == 0
    text = capsys.readouterr().out
    assert "deletion (↓ lower is better" in text and "95 % bootstrap interval" in text and "random" in text
    html = (out / "summary.html").read_text()
    assert "Wilcoxon" in html and "best and worst images by deletion" in html and "data:image/png" in html
    # the same command again: nothing to do, same answer
    assert main(["run", "parts:16", *BASE, "--metric", "deletion", "--metric", "insertion",
                 "--param", "deletion.step=256", "--param", "insertion.step=256", "--out", str(out)]) == 0


def test_exit_codes_for_failed_inputs_and_refused_runs(tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(d / "ok.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "run"
    assert main(["run", str(d), *BASE, "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "broken.png: decode:" in err
    assert main(["run", str(d), *BASE[:2], "--method", "gradcam", "--out", str(out), "--quiet"]) == 2
    assert "another configuration" in capsys.readouterr().err
    assert main(["run", str(d), *BASE, "--method", "no_such_method", "--out", str(tmp_path / "x")]) == 2
    assert "unknown method" in capsys.readouterr().err.lower()


def test_limit_and_shuffle_pick_a_seeded_subset(tmp_path):
    from saliencykit.datasets import load_run

    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert main(["run", "parts:20", *BASE, "--limit", "6", "--shuffle", "--seed", "3", "--out", str(out)]) == 0
    ra, rb = load_run(a), load_run(b)
    assert ra.rows["image"].nunique() == 6
    assert list(ra.rows["image"]) == list(rb.rows["image"])            # the same seed, the same subset
    assert set(ra.rows["image"]) != {f"parts/{i:02d}" for i in range(6)}   # shuffled before the limit


def test_amp_flag_reaches_the_run(tmp_path):
    from saliencykit.datasets import load_run

    out = tmp_path / "amp"
    assert main(["run", "parts:4", *BASE, "--amp", "--out", str(out)]) == 0
    assert load_run(out).config["amp"] is True
