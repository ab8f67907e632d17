"""End to end: the CLI in a subprocess writes what it promises, and nothing on failure."""
import json
import subprocess
import sys

import numpy as np
import pytest

CLI = [sys.executable, "-m", "saliencykit"]


def run(*args, check=True):
    proc = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_explain_writes_overlays_maps_and_summary(tmp_path, chelsea):
    photo = tmp_path / "my cat.jpg"
    chelsea.save(photo)
    out = tmp_path / "out"
    proc = run("explain", str(photo), "coffee", "--method", "gradcam", "--method", "saliency",
               "--out", str(out), "--quiet")
    assert proc.stderr == ""  # --quiet silences the progress bar
    for stem in ("my cat", "coffee"):
        for m in ("gradcam", "saliency"):
            assert (out / f"{stem}_{m}.png").exists()
            with np.load(out / f"{stem}_{m}.npz") as z:
                assert z["map"].shape == (224, 224)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["photos"][0]["predictions"][0]["label"] == "Egyptian cat"
    meta = summary["photos"][1]["maps"]["gradcam"]
    assert meta["method"] == "gradcam" and meta["layer"] == "_swish" and meta["passes"]["backward"] == 1


def test_explain_contrast_and_group(tmp_path):
    out = tmp_path / "o"
    run("explain", "chelsea", "--method", "gradcam", "--contrast", "tabby cat", "--vs", "Egyptian cat",
        "--out", str(out), "--quiet")
    meta = json.loads((out / "summary.json").read_text())["photos"][0]["maps"]["gradcam"]
    assert meta["target"][0]["indices"] == [281] and meta["target"][0]["vs_indices"] == [285]
    run("explain", "chelsea", "--method", "saliency", "--group", "cat", "--out", str(out / "g"), "--quiet")


def test_progress_bar_shown_without_quiet(tmp_path):
    proc = run("explain", "chelsea", "--method", "cam", "--out", str(tmp_path / "p"))
    assert "explaining" in proc.stderr


@pytest.mark.parametrize("args,msg", [
    (["--method", "nosuch"], "unknown method"),
    (["--target", "not a class"], "unknown class label"),
    (["--layer", "nolayer"], "layer 'nolayer' not found"),
    (["--contrast", "cat"], "needs --vs"),
])
def test_errors_leave_no_files(tmp_path, args, msg):
    out = tmp_path / "fail"
    proc = run("explain", "chelsea", "--out", str(out), "--quiet", *args, check=False)
    assert proc.returncode == 2 and msg in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_unreadable_photo(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    proc = run("explain", str(bad), "--out", str(tmp_path / "o"), "--quiet", check=False)
    assert proc.returncode == 2 and "cannot read image" in proc.stderr


def test_methods_and_models_listings():
    methods = run("methods").stdout
    for name in ("gradcam", "integrated_gradients", "scorecam"):
        assert name in methods
    listed = json.loads(run("methods", "--json").stdout)
    assert listed["gradcam"]["family"] == "cam" and listed["saliency"]["cost"] == "1F+1B"
    models = run("models").stdout
    assert "efficientnet_lite0" in models and "mobilenet_v2" in models


def test_demo_writes_everything(tmp_path):
    out = tmp_path / "demo"
    run("demo", "--out", str(out), "--quiet", "--method", "gradcam", "--method", "saliency")
    summary = json.loads((out / "summary.json").read_text())
    assert [p["photo"] for p in summary["photos"]] == ["chelsea", "coffee", "astronaut", "rocket", "motorcycle_left"]
    assert all(len(p["predictions"]) == 5 for p in summary["photos"])
    assert (out / "grid.png").exists()
    assert len(list(out.glob("*_gradcam.png"))) == 5
