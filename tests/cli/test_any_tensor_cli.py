"""`saliencykit explain` beyond photos of classifiers: series from .npy/.csv with --layout BCT, and
--region MASK.png for segmentation and image-to-image models (models given as python:FILE.py:FUNC).

Run in-process through `cli.main` (the subprocess path is covered by test_cli.py): checked are the
files written, the maps' shapes and numbers against the library call, and the clear errors.
"""
import json

import numpy as np
import pytest
import torch

import saliencykit as sk
from saliencykit.cli import main

MODELS = '''
import torch
from torch import nn


def series():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 4, 5, padding=2), nn.ReLU(), nn.AdaptiveMaxPool1d(1), nn.Flatten(),
                         nn.Linear(4, 2))


class Seg(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return {"out": self.c(x)}


def seg():
    return Seg()


def denoiser():
    torch.manual_seed(1)
    return nn.Conv2d(3, 3, 3, padding=1)
'''


@pytest.fixture
def models(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return path


def test_series_from_npy_and_csv(tmp_path, models):
    wave = np.sin(np.linspace(0, 6, 40)).astype(np.float32)
    np.save(tmp_path / "wave.npy", wave)
    np.savetxt(tmp_path / "row.csv", wave[None], delimiter=",")
    out = tmp_path / "out"
    code = main(["explain", str(tmp_path / "wave.npy"), str(tmp_path / "row.csv"), "--model",
                 f"python:{models}:series", "--layout", "BCT", "--method", "saliency", "--out", str(out), "--quiet"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layout"] == "BCT" and [p["photo"] for p in summary["photos"]] == ["wave", "row"]
    assert (out / "wave_saliency.png").stat().st_size > 0
    # the map is the library's saliency of the same series [1,1,40] (the csv row reads back the same values)
    with np.load(out / "wave_saliency.npz") as z:
        got = z["maps"]
    model = sk.models._load_python(f"{models}:series", None)
    model.layout = "BCT"
    want = sk.explain(model, torch.from_numpy(wave).view(1, 1, -1), "saliency").maps.numpy()
    assert got.shape == (1, 40) and np.allclose(got, want, atol=1e-6)
    with np.load(out / "row_saliency.npz") as z:
        assert np.allclose(z["maps"], want, atol=1e-6)


def test_region_mask_for_segmentation_and_image_to_image(tmp_path, models):
    from PIL import Image

    mask = np.zeros((224, 224), np.uint8)
    mask[60:120, 80:150] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "seg"
    assert main(["explain", "chelsea", "--model", f"python:{models}:seg", "--region", str(tmp_path / "mask.png"),
                 "--target", "1", "--method", "saliency", "--out", str(out), "--quiet"]) == 0
    meta = json.loads((out / "summary.json").read_text())["photos"][0]
    assert meta["predictions"] == []                     # a dense output has no class probabilities
    target = meta["maps"]["saliency"]["target"][0]
    assert target["kind"] == "region" and target["indices"] == [1] and target["pixels"] == 60 * 70
    out = tmp_path / "den"
    assert main(["explain", "chelsea", "--model", f"python:{models}:denoiser", "--region", str(tmp_path / "mask.png"),
                 "--region-of", "change", "--method", "saliency", "--out", str(out), "--quiet"]) == 0
    with np.load(out / "chelsea_saliency.npz") as z:
        m = z["maps"][0]
    # a 3x3 convolution: the region's output depends on the input within one pixel of it, nowhere else
    assert m[59:121, 79:151].min() >= 0 and m[:58].max() == 0 and m[122:].max() == 0 and m[:, :78].max() == 0


def test_bad_requests_are_one_clear_line(tmp_path, models, capsys):
    from PIL import Image

    Image.fromarray(np.zeros((10, 10), np.uint8) + 255).save(tmp_path / "small.png")
    assert main(["explain", "chelsea", "--model", f"python:{models}:seg", "--region", str(tmp_path / "small.png"),
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "must be at the model's input size 224x224" in capsys.readouterr().err
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4, 5), np.float32))
    assert main(["explain", str(tmp_path / "cube.npy"), "--model", f"python:{models}:series", "--out",
                 str(tmp_path / "o"), "--quiet"]) == 2
    assert "a BCT example is [C,T] or [T]" in capsys.readouterr().err
    np.save(tmp_path / "short.npy", np.zeros(6, np.float32))
    assert main(["explain", str(tmp_path / "short.npy"), "--model", f"python:{models}:series", "--method",
                 "occlusion", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "shorter than the occlusion window" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()                 # nothing half-written


def test_evaluate_scores_series_from_npy_as_the_library_does(tmp_path, models, capsys):
    # `saliencykit evaluate` on two .npy series: the scores written are the library's evaluate on the
    # same batch (same seed: equal to float rounding, 1e-12), masks come from one .npy [N,T]
    g = np.random.default_rng(0)
    waves = [np.sin(np.linspace(0, 6, 40) + k).astype(np.float32) + 0.1 * g.standard_normal(40).astype(np.float32)
             for k in range(2)]
    for k, w in enumerate(waves):
        np.save(tmp_path / f"w{k}.npy", w)
    masks = np.zeros((2, 40), bool)
    masks[:, 10:20] = True
    np.save(tmp_path / "masks.npy", masks)
    out = tmp_path / "ev"
    code = main(["evaluate", str(tmp_path / "w0.npy"), str(tmp_path / "w1.npy"), "--model", f"python:{models}:series",
                 "--metric", "deletion", "--metric", "pointing_game", "--regions", str(tmp_path / "masks.npy"),
                 "--param", "pointing_game.tolerance=2", "--out", str(out), "--quiet"])
    assert code == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["layout"] == "BCT" and scores["images"] == ["w0", "w1"]
    model = sk.models._load_python(f"{models}:series", None)
    model.layout = "BCT"
    x = torch.from_numpy(np.stack(waves))[:, None]
    exps = sk.explain(model, x, ["saliency", "integrated_gradients"], seed=0)
    ev = sk.evaluate(model, x, exps, metrics=["deletion", "pointing_game"], masks=torch.from_numpy(masks),
                     params={"pointing_game": {"tolerance": 2}}, seed=0)
    for metric in ("deletion", "pointing_game"):
        for method in ("saliency", "integrated_gradients", "random"):
            assert np.allclose(scores["metrics"][metric][method]["scores"], ev[metric][method].scores.numpy(),
                               atol=1e-12)
    assert "saliency" in capsys.readouterr().out


def test_evaluate_on_series_says_what_it_needs(tmp_path, models, capsys):
    # refused before any pass with the fix: where the masks go, which metrics read series
    np.save(tmp_path / "w.npy", np.zeros(40, np.float32))
    base = ["evaluate", str(tmp_path / "w.npy"), "--model", f"python:{models}:series", "--out", str(tmp_path / "o")]
    assert main(base + ["--metric", "pointing_game", "--quiet"]) != 0
    assert "pass --regions MASKS.npy with one boolean mask per input in order, shape [1, 40]" in capsys.readouterr().err
    assert main(base + ["--metric", "road_morf", "--quiet"]) != 0
    assert "road_morf cannot score maps of a BCT input" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_report_on_series_shows_plots_words_and_metrics(tmp_path, models, capsys):
    # `saliencykit report` on .npy series: one section per series with its plots, the words and the
    # metrics table; its words are sk.verbalize's on the same series (same text, same numbers)
    import re

    wave = np.sin(np.linspace(0, 6, 40)).astype(np.float32)
    np.save(tmp_path / "wave.npy", wave)
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "wave.npy"), "--model", f"python:{models}:series", "--method", "saliency",
                 "--method", "integrated_gradients", "--metric", "deletion", "--out", str(out), "--quiet"]) == 0
    page = out.read_text()
    assert "<figcaption>series</figcaption>" in page and "own colour bar" in page
    assert page.count('alt="Gradient saliency overlay"') == 1 and "fraction of time steps removed" in page
    model = sk.models._load_python(f"{models}:series", None)
    model.layout = "BCT"
    x = torch.from_numpy(wave).view(1, 1, -1)
    exps = sk.explain(model, x, ["saliency", "integrated_gradients"], seed=0)
    words = sk.verbalize(model, x, exps["saliency"], compare=[exps["integrated_gradients"]]).text
    shown = re.sub(r"<[^>]+>", "", page.split("In words (Gradient saliency)</h3><p>")[1].split("</p>")[0])
    assert shown == words.replace("*", "")


def test_report_refuses_what_it_cannot_show(tmp_path, capsys):
    np.save(tmp_path / "v.npy", np.zeros((1, 4, 4, 4), np.float32))
    assert main(["report", str(tmp_path / "v.npy"), "--layout", "BCDHW", "--out", str(tmp_path / "r.html"),
                 "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "report shows photos and series" in err and "saliencykit evaluate FILE.npy" in err
    # a model that declares a series layout, given a photo name: said before any pass
    assert main(["report", "chelsea", "--model", "series_cnn", "--out", str(tmp_path / "r.html"), "--quiet"]) != 0
    assert "series_cnn reads BCT inputs: give them as .npy/.csv files" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_a_csv_of_numbers_is_a_series_and_a_csv_of_paths_is_a_list(tmp_path):
    # the commands read a .csv as a series only when it holds numbers; a header or paths make it a
    # list of photos (a source), as `run` reads it
    from saliencykit.cli.common import is_array_file

    np.savetxt(tmp_path / "wave.csv", np.zeros((2, 10)), delimiter=",")
    (tmp_path / "list.csv").write_text("path\nimgs/a.png\n")
    np.save(tmp_path / "x.npy", np.zeros(3))
    assert is_array_file(tmp_path / "wave.csv") and is_array_file(tmp_path / "x.npy")
    assert not is_array_file(tmp_path / "list.csv") and not is_array_file(tmp_path / "photo.png")
