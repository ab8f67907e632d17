"""Regenerate the pictures of docs/concepts.md made by this room's newer tools: MACO for two
ImageNet classes on the bundled MobileNetV2 (each as the optimised image and with its
transparency map), and a counterfactual and prototypes on the shipped parts CNN.

    python docs/make_concept_figures.py              # all: maco.jpg, counterfactual.jpg, prototypes.jpg
    python docs/make_concept_figures.py parts        # only the two parts figures (a few seconds)

Entries (settings, measured probabilities and seconds) are merged into docs/images/figures.json.

Settings (SETTINGS below) are kept small for 2 CPU cores: 128 px instead of the model's 224 and
64 steps of 4 augmented crops, i.e. 256 forward+backward rows of MobileNetV2 at 128 px per class.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import saliencykit as sk

OUT = Path(__file__).parent / "images"
CLASSES = ["espresso", "goldfinch"]
SETTINGS = {"method": "maco", "steps": 64, "size": 128, "crops": 4, "contrast": 0.25, "seed": 0}


def maco_figure(subject, path: Path) -> dict:
    from PIL import Image, ImageDraw

    tiles, notes = [], []
    for name in CLASSES:
        t0 = time.perf_counter()
        res = sk.concepts.visualize(subject, sk.Class(name), **SETTINGS)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            p = float(subject.forward(res.input).softmax(-1)[0, subject.class_index(name)])
        rgba = res.image_with_alpha()
        faded = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        tiles += [(res.image, f"{name} (p = {p:.2f})"), (faded, "with transparency")]
        notes.append({"class": name, "probability": round(p, 3), "score": [round(res.score_start, 2),
                      round(res.score_end, 2)], "seconds": round(seconds, 1), "passes": res.passes})
    side, top, gap = 192, 16, 8
    sheet = Image.new("RGB", (len(tiles) * (side + gap) - gap, side + top), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for i, (img, caption) in enumerate(tiles):
        sheet.paste(img.resize((side, side), Image.BICUBIC), (i * (side + gap), top))
        d.text((i * (side + gap) + 2, 2), caption, fill=(0, 0, 0))
    sheet.save(path, quality=90)
    return {"model": subject.name, "classes": notes, "settings": SETTINGS}


def parts_figures(cf_path: Path, proto_path: Path) -> dict:
    """A counterfactual (relaxed search, 8x8 grid) between two parts images of different predicted
    classes, and the prototypes of one image among 59 others."""
    from saliencykit.benchmarks.parts import dataset as parts
    from saliencykit.datasets.runner import load_subject

    subject = load_subject("parts_cnn")
    x = parts.to_tensor(parts.generate(60, seed=5).images)
    cf = sk.counterfactual(subject, x[0:1], x[1:2], layer="features.14", method="relaxed", steps=100, seed=0)
    cf.image().save(cf_path, quality=90)
    pr = sk.concepts.prototypes(subject, x[:1], x[1:], layer="features.9", k=3, n_regions=3)
    pr.image(patch=80).save(proto_path, quality=90)
    return {"counterfactual": {"model": "parts_cnn", "images": "parts.generate(60, seed=5)[0] vs [1]",
                               "method": "relaxed", "steps": 100, "layer": "features.14", "n_edits": cf.n_edits,
                               "p_distractor_after": round(float(cf.probs_after[cf.distractor_class]), 3)},
            "prototypes": {"model": "parts_cnn", "layer": "features.9", "reference": "images 1..59",
                           "regions": pr.describe()}}


def main():
    OUT.mkdir(exist_ok=True)
    torch.manual_seed(0)
    settings_path = OUT / "figures.json"
    settings = json.loads(settings_path.read_text()) if settings_path.exists() else {}
    wanted = sys.argv[1:] or ["parts", "maco"]
    if "parts" in wanted:
        settings.update(parts_figures(OUT / "counterfactual.jpg", OUT / "prototypes.jpg"))
        settings_path.write_text(json.dumps(settings, indent=2))   # merged: other figures keep their entry
    if "maco" in wanted:
        settings["maco"] = maco_figure(sk.load_model("mobilenet_v2"), OUT / "maco.jpg")
        settings_path.write_text(json.dumps(settings, indent=2))


if __name__ == "__main__":
    main()
