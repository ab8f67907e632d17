"""Concepts for people: the atlas picks each concept's patches where its coefficient peaks (on the
colour model: a red concept's patches hold red), the sentences quote the measured removal drops,
and `saliencykit concepts` writes its page and files whole."""
import json
import os
import sys

import pytest
import torch

import saliencykit as sk
from saliencykit import SaliencyError
from saliencykit.cli import main
from saliencykit.concepts import extract, removal_effect
from saliencykit.concepts.bank import concept_maps
from saliencykit.present.atlas import concept_atlas, summary_figure, top_patches, verbalize_concepts
from saliencykit.present.verbalize import fmt_pct

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "concepts"))
from test_bank import ColourNet, colour_scenes  # noqa: E402


@pytest.fixture(scope="module")
def colour():
    net = ColourNet()
    with torch.no_grad():
        net.fc.weight.copy_(torch.tensor([[2.0, 0.0, 0.5], [0.0, 1.0, 0.0]]))
    subject = sk.Subject(net, labels=["red", "green"], mean=(0, 0, 0), std=(1, 1, 1), input_size=(32, 32), layer="act")
    x, masks = colour_scenes(12)
    bank = extract(subject, x, layer="act", n_concepts=3, seed=0)
    return subject, x, masks, bank


def test_top_patches_sit_on_the_concept(colour):
    subject, x, masks, bank = colour
    cm = concept_maps(subject, bank, x)
    red = int((bank.basis / bank.basis.norm(dim=1, keepdim=True))[:, 0].argmax())
    patches = top_patches(cm.layer_maps, (32, 32), red, n=4, patch=0.25)
    assert len(patches) == 4 and len({i for i, _ in patches}) == 4        # one patch per image
    for i, (t, l_, b, r) in patches:
        assert b - t == 8 and r - l_ == 8 and 0 <= t and b <= 32 and 0 <= l_ and r <= 32
        assert masks["r"][i, t:b, l_:r].any()                            # the patch holds red


def test_atlas_and_words(colour):
    subject, x, _, bank = colour
    rem = removal_effect(subject, bank, x[:4], target=sk.Class(0))
    imp = rem.drop.mean(0).clamp(min=0)
    pic = concept_atlas(subject, bank, x, importance=imp, removal=rem.drop.mean(0), n_patches=3, n_maps=2)
    assert pic.size[1] == 22 + 3 * 80                                    # a header and one row per concept
    with pytest.raises(SaliencyError, match="one value per concept"):
        concept_atlas(subject, bank, x, importance=torch.ones(2))
    v = verbalize_concepts(subject, bank, x[:4], 1, removal=rem, top=2, class_name="red")
    red = int((bank.basis / bank.basis.norm(dim=1, keepdim=True))[:, 0].argmax())
    first = v.facts["concepts"][0]
    assert first["concept"] == red                                       # the red concept carries class 0
    assert abs(first["removed_drop"] - float(rem.drop[1, red])) < 1e-6
    assert f"concept {red}" in v.sentences[0]["text"] and fmt_pct(first["removed_drop"]) in v.sentences[0]["text"]
    assert "drops the score of red" in v.text


def test_summary_figure(colour):
    subject, x, _, _ = colour
    summ = sk.concepts.summarize_class(subject, x, target=0, n_summaries=2)
    pic = summary_figure(summ, subject, n=3)
    assert pic.size == (190 + 3 * 74, 22 + 2 * 80)


def test_concepts_command(tmp_path, capsys):
    out = tmp_path / "c"
    args = ["concepts", "parts:40", "--model", "parts_cnn", "--n-concepts", "3", "--summaries", "2",
            "--importance-images", "3", "--threads", "1", "--quiet", "--out", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["atlas.png", "bank", "concepts.json", "index.html", "summaries.png"]
    rec = json.loads((out / "concepts.json").read_text())
    assert rec["meta"]["n_concepts"] == 3 and len(rec["concepts"]) == 3 and rec["words"]
    # parts:N knows its regions: the concepts are scored against them and named by them
    gt = rec["ground_truth"]
    assert gt["parts"][:5] == ["beak", "eye", "wing", "tail", "foot"] and len(gt["concepts"]) == 3
    assert [c["part"] for c in rec["concepts"]] == [gt["concepts"][c["concept"]]["part"] for c in rec["concepts"]]
    html = (out / "index.html").read_text()
    assert "Concept atlas" in html and "data:image/png" in html and rec["words"][0]["text"] in html
    assert sk.concepts.ConceptBank.load(out / "bank").n_concepts == 3
    # the bank in the photo report: each photo gets its concepts in words and a strip of their maps
    rep = tmp_path / "r.html"
    assert main(["report", "parts:2", "--model", "parts_cnn", "--concepts", str(out / "bank"), "--no-words",
                 "--quiet", "--out", str(rep)]) == 0
    page = rep.read_text()
    assert page.count("where the concepts sit") == 2 and "removing it" in page
    assert main(["report", "parts:1", "--model", "parts_vit", "--concepts", str(out / "bank"), "--quiet",
                 "--out", str(tmp_path / "r2.html")]) == 2
    assert "give the --model the bank was made on" in capsys.readouterr().err
    assert main(args) == 0                                               # its own folder is replaced
    (out / "mine.txt").write_text("keep me")
    assert main(args) == 2
    assert "holds other files" in capsys.readouterr().err
    assert (out / "mine.txt").exists()
    # parts:8 shows 8 of the 10 classes once each: class 9 is not among the predictions
    assert main(["concepts", "parts:8", "--model", "parts_cnn", "--class", "9", "--quiet", "--threads", "1",
                 "--out", str(tmp_path / "d")]) == 2
    assert "none of the 8 images is predicted as bird09" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
