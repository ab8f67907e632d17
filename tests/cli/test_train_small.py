"""`saliencykit train-small`: the retrain command of the small shipped models (a short run)."""
import pytest
import torch

from saliencykit.cli import main
from saliencykit.models import small


def test_train_small_writes_loadable_seeded_weights(tmp_path, capsys):
    out = tmp_path / "s.pt"
    assert main(["train-small", "series_cnn", "--out", str(out), "--n-train", "64", "--epochs", "1", "--quiet"]) == 0
    assert "held" in capsys.readouterr().out
    model, info = small.load_module("series_cnn", out)
    assert info["seed"] == 0 and info["n_train"] == 64 and 0 <= info["heldout_accuracy"] <= 1
    # same seed, same thread count: the same weights bit for bit
    again = tmp_path / "t.pt"
    assert main(["train-small", "series_cnn", "--out", str(again), "--n-train", "64", "--epochs", "1", "--quiet"]) == 0
    other, _ = small.load_module("series_cnn", again)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_train_small_bad_input(tmp_path, capsys):

    assert main(["train-small", "series_cnn", "--out", str(tmp_path)]) == 2      # a directory
    assert "directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:                        # a usage mistake: argparse's code 2
        main(["train-small", "nosuch", "--out", str(tmp_path / "x.pt")])
    assert err.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
