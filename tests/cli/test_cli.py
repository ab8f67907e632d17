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
            with np.load(out / f"{stem}_{m}.npz") as z:  # the key and [B,H,W] shape of Explanation.save
                assert z["maps"].shape == (1, 224, 224) and "map" not in z.files
    summary = json.loads((out / "summary.json").read_text())
    # one versions block per run, none per map
    assert summary["versions"]["saliencykit"] and all("versions" not in meta for p in summary["photos"]
                                                      for meta in p["maps"].values())
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
    # one bar per method, named by its display name, counting photos
    proc = run("explain", "chelsea", "coffee", "--method", "cam", "--method", "saliency", "--out", str(tmp_path / "p"))
    assert "CAM" in proc.stderr and "Gradient saliency" in proc.stderr and "2/2" in proc.stderr


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


# ------------------------------------------------ failures: up front, one line, a non-zero code
def _one_error_line(proc):
    # the note a loaded machine gets ("this machine is busy ... --threads 1", tested below) is not an error
    lines = [ln for ln in proc.stderr.strip().splitlines() if "this machine is busy" not in ln]
    assert len(lines) == 1 and lines[0].startswith("saliencykit: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("where,msg", [
    ("file", "it is an existing file"),
    ("under_file", "is a file, not a folder"),
    ("proc", "is not writable"),  # /proc takes no new files, even for root (chmod would not stop root)
])
def test_explain_refuses_an_unwritable_out_before_computing(tmp_path, where, msg):
    # Before, --out was checked only after every map was computed: the whole run was lost and a raw
    # traceback printed. Now the run stops before loading the model; the error names the path.
    existing = tmp_path / "taken.txt"
    existing.write_text("keep me")
    out = {"file": existing, "under_file": existing / "sub", "proc": "/proc/saliencykit-test/out"}[where]
    proc = run("explain", "chelsea", "--method", "integrated_gradients", "--out", str(out), check=False)
    assert proc.returncode == 2
    assert msg in _one_error_line(proc) and str(out) in proc.stderr
    assert "explaining" not in proc.stderr  # no progress bar: no photo was explained
    assert existing.read_text() == "keep me"


def test_usage_mistakes_are_one_line():
    for args in (["explain"], ["nosuchcommand"], ["explain", "chelsea", "--out", "o", "--seed", "x"]):
        proc = run(*args, check=False)
        assert proc.returncode == 2
        _one_error_line(proc)


def test_ctrl_c_is_one_line_and_leaves_no_files(tmp_path):
    # SIGINT while the maps are computed: exit 130, one line, no KeyboardInterrupt traceback, nothing written
    import signal
    import time

    out = tmp_path / "interrupted"
    # 2,000 steps: long enough that the signal always lands while the maps are computed (at the
    # default 50 a fast runner finished the two photos between the first bar and the signal)
    proc = subprocess.Popen(CLI + ["explain", "chelsea", "coffee", "--method", "integrated_gradients",
                                   "--param", "integrated_gradients.steps=2000", "--out", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            # a job started in the background of a shell inherits SIGINT ignored, and
                            # Python then never turns it into KeyboardInterrupt: give the child the default
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    deadline = time.time() + 300
    while "%|" not in seen and time.time() < deadline:  # a progress bar: the run is computing
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=300)
    proc.stderr = seen + rest
    assert proc.returncode == 130
    # one error line (it may follow the progress bar's unfinished line on the same terminal line)
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if "saliencykit: error:" in ln]
    assert len(lines) == 1
    assert lines[0].endswith("saliencykit: error: interrupted (Ctrl-C); nothing was written for the unfinished work")
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_unexpected_failures_are_one_line(monkeypatch, capsys):
    # anything that is not a SaliencyError still ends as one line (its type and first line), code 1
    from saliencykit.cli import explain as explain_cmd
    from saliencykit.cli import main

    def broken(*_a, **_k):
        raise RuntimeError("the disk caught fire\nsecond line")

    monkeypatch.setattr(explain_cmd, "run_explain", broken)
    assert main(["explain", "chelsea", "--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert err == "saliencykit: error: RuntimeError: the disk caught fire (SALIENCYKIT_TRACEBACK=1 shows where)\n"
def test_every_command_takes_threads():
    # --threads is accepted everywhere (parsed, not run), and a bad count is a clear error
    from saliencykit.cli import build_parser, main

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert any("--threads" in a.option_strings for a in p._actions), name
    assert main(["methods", "--threads", "0"]) == 2


def test_busy_machine_notice(monkeypatch, capsys, tmp_path):
    # a load average above the core count gets one line suggesting --threads 1 from a command that
    # computes (here one that then fails fast on a missing photo); a given --threads or --quiet means
    # the person has chosen, and a server or a listing says nothing
    import os

    from saliencykit.cli import main

    args = ["explain", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")]
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0 * (os.cpu_count() or 1) + 1, 0.0, 0.0))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("machine is busy") == 1 and "--threads 1" in err
    for extra in (["--threads", "1"], ["--quiet"]):
        assert main(args + extra) == 2
        assert "machine is busy" not in capsys.readouterr().err
    assert main(["methods"]) == 0
    assert "machine is busy" not in capsys.readouterr().err
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert main(args) == 2
    assert "machine is busy" not in capsys.readouterr().err


def test_demo_says_what_it_does(tmp_path):
    # the plan (photos x methods, the demo's own IG budget) comes first, a bar per method, and
    # where to look at the end
    out = tmp_path / "demo"
    proc = run("demo", "--out", str(out), "--method", "gradcam", "--method", "integrated_gradients",
               "--param", "integrated_gradients.steps=4", "--threads", "1")
    err, stdout = proc.stderr, proc.stdout
    assert "5 photos x 2 methods = 10 maps with 1 thread(s)" in err
    assert "Integrated Gradients at 4 steps" in err  # --param overrides the demo's budget, and it says so
    assert "Grad-CAM" in err and "Integrated Gradients" in err and "5/5" in err
    assert "report.html" in stdout and "where to look" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"] == {"integrated_gradients": {"steps": 4}}
    assert summary["photos"][0]["maps"]["integrated_gradients"]["params"]["steps"] == 4
    # 4 steps miss the completeness check: each such map warns, with the remedy, in the summary and on stderr
    ig = [p["maps"]["integrated_gradients"]["extras"]["warnings"] for p in summary["photos"]]
    assert any(w["code"] == "completeness" and "more steps" in w["message"] for ws in ig for w in ws)
    assert "warning:" in err and "more steps" in err
    # astronaut's top answer has 14 %: one photo-level warning, not one per map
    astro = next(p for p in summary["photos"] if p["photo"] == "astronaut")
    assert [w["code"] for w in astro["warnings"]] == ["unsure"] and "14 %" in astro["warnings"][0]["message"]
    assert err.count("astronaut: the model is unsure") == 1


def test_transparent_photo_is_noted(tmp_path, chelsea):
    # alpha composited on white changes the input: the map carries a warning that says so
    from PIL import Image

    rgba = chelsea.convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (0, 0, 100, 100))
    rgba.putalpha(alpha)
    photo = tmp_path / "cut.png"
    rgba.save(photo)
    opaque = tmp_path / "opaque.png"
    chelsea.convert("RGBA").save(opaque)
    out = tmp_path / "o"
    proc = run("explain", str(photo), str(opaque), "--out", str(out))
    summary = json.loads((out / "summary.json").read_text())
    assert [w["code"] for w in summary["photos"][0]["warnings"]] == ["alpha"]
    assert summary["photos"][1]["warnings"] == []  # an alpha channel that is opaque everywhere changes nothing
    assert "transparent pixels" in proc.stderr


def test_report_and_evaluate_pass_params_and_say_the_warnings(tmp_path):
    # IG at 2 steps on chelsea misses completeness by far more than 5 %: the report (given the
    # steps through --param) shows it. On astronaut IG at its default 50 steps misses by 22 % and
    # the top answer has 14 %: evaluate prints each once on stderr
    html = tmp_path / "r.html"
    run("report", "chelsea", "--method", "integrated_gradients", "--param", "integrated_gradients.steps=2",
        "--no-words", "--out", str(html), "--quiet")
    page = html.read_text()
    assert '"steps": 2' in page and "more steps" in page
    proc = run("evaluate", "astronaut", "--method", "gradcam", "--method", "integrated_gradients", "--metric",
               "sparseness", "--no-random", "--out", str(tmp_path / "ev"))
    assert proc.stderr.count("astronaut, Integrated Gradients: the attributions miss") == 1
    assert proc.stderr.count("astronaut: the model is unsure") == 1
    assert "explaining" in proc.stderr and "scoring" in proc.stderr  # a bar per phase
