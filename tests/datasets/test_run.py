"""Dataset runs: one row per (image, method, target), bad inputs as error rows, resumable after
SIGKILL with exactly the rows of an uninterrupted run, refusal of a changed configuration, and
byte-identical Parquet for 0 or 2 DataLoader workers. Model: the shipped parts CNN (64x64, fast)."""
import filecmp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import saliencykit as sk
from saliencykit import SaliencyError
from saliencykit.datasets import run
from saliencykit.datasets.runner import batch_seed, make_plan

KW = dict(model="parts_cnn", method=["gradcam", "rise"], metric=["deletion", "pointing_game"], batch=4,
          shard_size=8, params={"rise": {"n_masks": 64}, "deletion": {"step": 256}}, progress=False, threads=1)


def _files(root, part):
    d = Path(root) / part
    return sorted(p.name for p in d.glob("shard-*.parquet"))


def _same_bytes(a, b, parts=("rows", "maps", "errors")):
    for part in parts:
        fa, fb = _files(a, part), _files(b, part)
        assert fa == fb, part
        for f in fa:
            assert filecmp.cmp(Path(a) / part / f, Path(b) / part / f, shallow=False), f"{part}/{f} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    return run("parts:24", out=out, workers=0, **KW)


def test_rows_follow_the_contract(reference):
    r = reference
    rows = r.rows
    assert len(rows) == 24 * 3                       # gradcam, rise and the random baseline
    assert list(rows["method"][:3]) == ["gradcam", "rise", "random"]
    for col in ("image", "method", "target", "label", "deletion", "pointing_game", "prediction", "probability",
                "passes_forward", "seed", "seconds", "versions"):
        assert col in rows.columns, col
    assert rows["image"].iloc[0] == "parts/00" and rows["label"].notna().all()
    assert r.errors.empty and list(r.errors.columns)[:5] == ["image", "index", "path", "stage", "reason"]
    # the seed of a row is its batch's: a function of the run seed and the batch number only
    assert (rows["seed"] == [batch_seed(0, b) for b in rows["batch"]]).all()
    # scores are the evaluate() numbers of the same batch (the run adds bookkeeping, not arithmetic)
    subject = sk.datasets.runner.load_subject("parts_cnn")
    src = sk.datasets.open_source("parts:24")
    items = src.items()[:4]
    x = subject.preprocess([src.decode(i).image for i in items])
    masks = __import__("torch").stack([__import__("torch").from_numpy(src.decode(i).mask) for i in items])
    exps = sk.explain(subject, x, ["gradcam", "rise"], seed=batch_seed(0, 0), params={"rise": {"n_masks": 64}})
    ev = sk.evaluate(subject, x, exps, metrics=["deletion", "pointing_game"], seed=batch_seed(0, 0), masks=masks,
                     params={"deletion": {"step": 256}})
    first = rows[rows["batch"] == 0]
    for method in ("gradcam", "rise", "random"):
        got = first[first["method"] == method]["deletion"].to_numpy()
        assert np.allclose(got, ev.score("deletion", method).numpy(), atol=1e-6), method
    # stored maps: CAM at its layer's grid, RISE pooled to at most 56 px; float16 of the map
    maps = r.maps(image="parts/00", method="gradcam")
    assert len(maps) == 1 and maps.iloc[0]["map"].shape == tuple(exps["gradcam"].raw.shape[-2:])
    assert np.allclose(maps.iloc[0]["map"], exps["gradcam"].raw[0].numpy(), rtol=1e-3, atol=1e-3)


def test_plan_batches_never_depend_on_the_shard_size():
    items = list(range(23))
    for shard in (4, 8, 9, 20):
        p = make_plan(items, 4, shard)
        assert p.shard_size % 4 == 0
        assert [list(p.batch_positions(b)) for b in range(p.batches)][-1] == [20, 21, 22]


def test_workers_do_not_change_a_byte(reference, tmp_path):
    out = tmp_path / "w2"
    run("parts:24", out=out, workers=2, **KW)
    _same_bytes(reference.root, out)


def test_rerun_resumes_and_skips_finished_shards(reference, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference.root, out)
    for part in ("rows", "maps", "errors", "timing"):
        (out / part / "shard-00001.parquet").unlink(missing_ok=True)
    before = (out / "rows" / "shard-00000.parquet").stat().st_mtime_ns
    run("parts:24", out=out, workers=0, **KW)
    assert (out / "rows" / "shard-00000.parquet").stat().st_mtime_ns == before   # not rewritten
    _same_bytes(reference.root, out)


def test_changed_configuration_is_refused_with_the_difference(reference, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference.root, out)
    with pytest.raises(SaliencyError, match=r"methods: \[\"gradcam\", \"rise\"\] -> \[\"gradcam\"\]"):
        run("parts:24", out=out, **{**KW, "method": ["gradcam"], "params": {"deletion": {"step": 256}}})
    with pytest.raises(SaliencyError, match="12 input\\(s\\) new"):
        run("parts:36", out=out, **KW)
    r = run("parts:24", out=out, force=True, workers=0, **{**KW, "method": ["gradcam"], "metric": [], "params": {}})
    assert set(r.rows["method"]) == {"gradcam"} and len(r.rows) == 24


def test_refuses_a_directory_that_is_not_a_run_and_an_unwritable_out(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(SaliencyError, match="not empty and holds no saliencykit run"):
        run("parts:8", out=tmp_path / "mine", **KW)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SaliencyError, match="is a file|cannot write"):
        run("parts:8", out=tmp_path / "afile" / "run", **KW)


def test_too_little_disk_is_refused_before_any_work(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(SaliencyError, match="MB free; this run needs about"):
        run("parts:8", out=tmp_path / "r", **KW)
    assert not list((tmp_path / "r").glob("rows/*"))


def test_a_write_failure_mid_run_keeps_finished_shards_and_says_how_to_resume(reference, tmp_path, monkeypatch):
    from saliencykit.datasets import store

    real = store.RunDir.write_shard
    calls = []

    def failing(self, k, tables):
        calls.append(k)
        if k == 1:
            raise SaliencyError("writing rows/shard-00001.parquet failed: No space left on device. The 1 finished "
                                "shard(s) are intact; fix the cause and rerun the same command to resume")
        return real(self, k, tables)

    monkeypatch.setattr(store.RunDir, "write_shard", failing)
    out = tmp_path / "r"
    with pytest.raises(SaliencyError, match="rerun the same command to resume"):
        run("parts:24", out=out, workers=0, **KW)
    assert _files(out, "rows") == ["shard-00000.parquet"]
    monkeypatch.setattr(store.RunDir, "write_shard", real)
    run("parts:24", out=out, workers=0, **KW)
    _same_bytes(reference.root, out)


def test_write_shard_turns_os_errors_into_a_resume_message(tmp_path, monkeypatch):
    from saliencykit.datasets import store

    rd = store.RunDir(tmp_path)

    def boom(path, fn):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "atomic_write", boom)
    with pytest.raises(SaliencyError, match="No space left on device. The 0 finished shard"):
        rd.write_shard(0, {"rows": None})


def _bad_folder(root):
    root.mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "a_good.png")
    Image.fromarray(rgb).save(root / "b_duplicate.png")
    (root / "c_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    (root / "d_empty.png").write_bytes(b"")
    Image.fromarray(rgb[..., 0]).save(root / "e_gray.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(root / "f_16bit.png")
    (root / "g_readme.txt").write_text("not an image")
    return root


def test_bad_inputs_at_dataset_scale_are_error_rows_and_the_run_finishes(tmp_path):
    src = _bad_folder(tmp_path / "imgs")
    r = run(str(src), out=tmp_path / "r", workers=0, **{**KW, "method": ["gradcam"], "metric": ["deletion"],
                                                                      "params": {}})
    errors = dict(zip(r.errors["image"], r.errors["stage"] + ": " + r.errors["reason"]))
    assert "duplicate of a_good.png" in errors["b_duplicate.png"]
    assert errors["c_corrupt.jpg"].startswith("decode:")
    assert "empty file" in errors["d_empty.png"]
    assert "not an image file" in errors["g_readme.txt"]
    explained = set(r.rows["image"])
    assert {"a_good.png", "e_gray.png"} <= explained      # grayscale converts to RGB
    modes = dict(zip(r.rows["image"], r.rows["mode"]))
    assert modes["e_gray.png"] == "L"
    assert "f_16bit.png" in explained or "f_16bit.png" in errors   # converted or refused by name, never lost
    assert set(explained) | set(errors) == {p.name for p in src.iterdir()}


def test_missing_label_is_an_error_row_and_target_label_skips_it(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (60 * i, 90, 30)).save(d / f"{i}.png")
    from saliencykit.benchmarks.parts import dataset as parts

    names = parts.labels()
    (tmp_path / "l.csv").write_text(f'path,label\nimgs/0.png,"{names[1]}"\nimgs/1.png,\nimgs/2.png,not a class\n')
    kw = {**KW, "method": ["gradcam"], "metric": [], "params": {}}
    r = run(str(tmp_path / "l.csv"), out=tmp_path / "top1", workers=0, **kw)
    assert set(r.rows["image"]) == {"imgs/0.png", "imgs/1.png", "imgs/2.png"}
    assert list(r.errors["image"]) == ["imgs/1.png"] and "no label" in r.errors["reason"][0]
    r = run(str(tmp_path / "l.csv"), out=tmp_path / "lab", workers=0, target="label", **kw)
    assert list(r.rows["image"]) == ["imgs/0.png"] and r.rows["target_index"][0] == 1
    why = dict(zip(r.errors["image"], r.errors["reason"]))
    assert "not a class of the model" in why["imgs/2.png"]


def test_seed_none_draws_one_and_records_it(tmp_path):
    r = run("parts:4", out=tmp_path / "r", workers=0, **{**KW, "metric": [], "method": ["rise"], "params": {"rise": {"n_masks": 64}}}, seed=None)
    seed = r.config["seed"]
    assert isinstance(seed, int)
    again = run("parts:4", out=tmp_path / "r2", workers=0, **{**KW, "metric": [], "method": ["rise"], "params": {"rise": {"n_masks": 64}}}, seed=seed)
    _same_bytes(r.root, again.root, parts=("rows", "maps"))


@pytest.mark.slow
def test_sigkill_at_any_point_then_resume_gives_the_uninterrupted_rows(reference, tmp_path):
    """Kill the CLI with SIGKILL once shards 1 and 2 are on disk, twice, and resume in-process."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "saliencykit", "run", "parts:24", "--model", "parts_cnn", "--method", "gradcam",
           "--method", "rise", "--metric", "deletion", "--metric", "pointing_game", "--batch", "4",
           "--shard-size", "8", "--param", "rise.n_masks=64", "--param", "deletion.step=256", "--out", str(out),
           "--workers", "0", "--threads", "1", "--quiet"]
    for wait_for in (1, 2):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while len(_files(out, "rows")) < wait_for and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert len(_files(out, "rows")) < 3, "the run finished before it could be killed"
    r = run("parts:24", out=out, workers=0, **KW)
    assert not list(out.glob("*/.tmp-*"))              # what the kill left half-written is gone
    _same_bytes(reference.root, out)
    assert r.complete and len(r.rows) == len(reference.rows)


@pytest.mark.slow
def test_ray_local_cluster_gives_the_same_bytes(reference, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)   # loopback only, two 1-thread actors
    try:
        out = tmp_path / "ray"
        r = run("parts:24", out=out, ray=True, **KW)
    finally:
        ray.shutdown()
    _same_bytes(reference.root, out)
    assert r.complete


def test_target_label_needs_a_labelled_source(tmp_path):
    with pytest.raises(SaliencyError, match="source has no labels"):
        run("bundled:chelsea", out=tmp_path / "r", target="label", **{**KW, "method": ["gradcam"], "params": {}})
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_imagenet_folder_named_by_wordnet_ids_gives_labels_the_model_knows(tmp_path):
    """An ImageNet-style ImageFolder (folders named n01440764, ...) explains the labelled class."""
    d = tmp_path / "val"
    (d / "n02123045").mkdir(parents=True)     # tabby cat, class 281
    (d / "n07920052").mkdir()                 # espresso, class 967
    sk.data.image("chelsea").save(d / "n02123045" / "chelsea.jpg")
    sk.data.image("coffee").save(d / "n07920052" / "coffee.jpg")
    r = run(str(d), model="efficientnet_lite0", method="gradcam", out=tmp_path / "r", target="label",
            progress=False, workers=0, threads=1)
    assert r.errors.empty
    assert dict(zip(r.rows["image"], r.rows["target_index"])) == {"n02123045/chelsea.jpg": 281,
                                                                  "n07920052/coffee.jpg": 967}
    assert dict(zip(r.rows["image"], r.rows["prediction_index"]))["n07920052/coffee.jpg"] == 967


def test_a_local_run_never_imports_ray(tmp_path):
    code = ("import sys, saliencykit as sk; sk.run('parts:4', model='parts_cnn', method='gradcam', out=sys.argv[1], "
            "progress=False, workers=0); print('ray' in sys.modules, 'datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]     # neither Ray nor Hugging Face datasets was loaded


def test_amp_is_recorded_refused_on_resume_and_noted_in_the_summary(reference, tmp_path):
    # a float32 run's manifest has no "amp" key (so runs made before the option still resume);
    # asking the same directory for amp is another configuration; an amp run records it, its maps
    # are the autocast ones (bfloat16 on a CPU: close to float32, not equal), its metrics float32
    import shutil

    assert "amp" not in reference.config
    out = tmp_path / "copy"
    shutil.copytree(reference.root, out)
    with pytest.raises(SaliencyError, match=r'amp: "<absent>" -> true'):
        run("parts:24", out=out, amp=True, **KW)
    kw = dict(model="parts_cnn", method="gradcam", metric=["deletion"], batch=4, shard_size=8, progress=False,
              threads=1, workers=0, params={"deletion": {"step": 256}})
    amp = run("parts:8", out=tmp_path / "amp", amp=True, **kw)
    full = run("parts:8", out=tmp_path / "f32", **kw)
    assert amp.config["amp"] is True and "amp" not in full.config
    a = np.stack(amp.maps(method="gradcam")["map"].to_list()).astype(np.float32)
    f = np.stack(full.maps(method="gradcam")["map"].to_list()).astype(np.float32)
    assert a.shape == f.shape and not np.array_equal(a, f)
    assert np.abs(a - f).max() <= 0.1 * np.abs(f).max()
    assert any(n.startswith("amp:") for n in sk.datasets.summarize(amp).notes)
    assert not any(n.startswith("amp:") for n in sk.datasets.summarize(full).notes)
