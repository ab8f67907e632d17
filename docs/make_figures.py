"""Regenerate the pictures of the user guide: one grid per method family on bundled photos.

    python docs/make_figures.py            # writes docs/images/<family>.jpg
    python docs/make_figures.py cam        # only the named families

    python docs/make_figures.py --demo demo-output/grid.png   # the README's picture, demo-grid.jpg

Budgets are modest so that this runs in a few minutes on a laptop CPU; the settings used are
printed into docs/images/figures.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import saliencykit as sk

OUT = Path(__file__).parent / "images"
PHOTOS = ["chelsea", "coffee", "astronaut"]
FAMILIES = {
    "gradient": ["saliency", "gradxinput", "smoothgrad", "integrated_gradients", "guided_backprop", "deconvnet",
                 "blur_ig", "guided_ig"],
    "cam": ["cam", "gradcam", "gradcam_pp", "hirescam", "xgradcam", "layercam", "scorecam", "eigencam", "cf_cam"],
    "perturbation": ["occlusion", "rise", "lime", "kernelshap", "extremal_perturbation"],
    "propagation": ["fullgrad", "normgrad", "lrp", "xrai", "iia"],
}
PARAMS = {
    "integrated_gradients": {"steps": 32},
    "blur_ig": {"steps": 32},
    "guided_ig": {"steps": 32},
    "xrai": {"steps": 16},
    "rise": {"n_masks": 1000},
    "lime": {"n_samples": 300},
    "kernelshap": {"n_samples": 300},
    "extremal_perturbation": {"steps": 100},
    "scorecam": {},
}


def save_small(png: Path, out: Path, scale: float = 0.75) -> None:
    """A PNG grid as a JPEG at `scale` (an overlay grid is ~10x smaller so), the PNG removed."""
    from PIL import Image

    im = Image.open(png).convert("RGB")
    im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS).save(out, quality=85)
    if png != out:
        png.unlink()


def family_grid(subject, family: str, methods: list[str], path: Path) -> dict:
    images, rows, titles = [], [], []
    available = sk.methods.available()
    methods = [m for m in methods if m in available]
    params = {m: {k: v for k, v in PARAMS.get(m, {}).items() if k in available[m]["defaults"]} for m in methods}
    for name in PHOTOS:
        image = sk.data.image(name)
        x = subject.preprocess(image)
        exps = sk.explain(subject, x, method=methods, params=params)
        images.append(image)
        rows.append({m: (e.maps[0], e.signed) for m, e in exps.items()})
        titles.append(f"{name}: {next(iter(exps.values())).target[0]['name']}")
        print(family, name, {m: round(e.seconds, 2) for m, e in exps.items()}, file=sys.stderr)
    png = path.with_suffix(".png")
    sk.viz.grid(images, rows, titles, path=png)
    save_small(png, path)
    return {"methods": methods, "params": params}


def main():
    OUT.mkdir(exist_ok=True)
    if sys.argv[1:2] == ["--demo"]:  # keep the PNG that `make demo` wrote
        from PIL import Image

        Image.open(sys.argv[2]).save(OUT / "demo.png")
        save_small(OUT / "demo.png", OUT / "demo-grid.jpg", scale=0.6)
        return
    torch.manual_seed(0)
    subject = sk.load_model("efficientnet_lite0")
    settings = {}
    for family, methods in FAMILIES.items():
        if len(sys.argv) > 1 and family not in sys.argv[1:]:
            continue
        settings[family] = family_grid(subject, family, methods, OUT / f"{family}.jpg")
    (OUT / "figures.json").write_text(json.dumps(settings, indent=2))


if __name__ == "__main__":
    main()
