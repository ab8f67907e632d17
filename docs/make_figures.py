"""Regenerate the pictures of the user guide: one grid per method family on bundled photos, and
one grid of targets (one photo, one row per target).

    make docs-images                       # builds .venv with the test extras, then runs the line below
    python docs/make_figures.py            # writes docs/images/<family>.jpg and targets.jpg
    python docs/make_figures.py cam        # only the named figures (gradient, cam, perturbation,
                                           # propagation, targets, concepts, series)

    python docs/make_concept_figures.py    # the concepts page's MACO, counterfactual and prototypes pictures

    python docs/make_figures.py --demo demo-output/grid.png   # the README's picture, demo-grid.jpg
                                                              # (after `make demo`)

Budgets are modest (see PARAMS), but the forward-only methods still need thousands of passes: on
2 CPU cores shared with other work, `perturbation` took about 35 minutes, `targets` about 7 and
`propagation` about 3. The methods and settings used are merged into docs/images/figures.json
(figures not regenerated keep their entry).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import saliencykit as sk
from saliencykit.cli.explain import GRID_SMOOTH

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


def grid_row(subject, x, exps: dict, name: str | None = None) -> tuple[dict, str]:
    """A grid row (map, signed, the short form of its warnings) per method, and the row's title:
    the photo, the target in words and its probability."""
    from saliencykit.present.names import target_words

    with torch.no_grad():
        probs = subject.forward(x).float().softmax(-1)[0]
    words, prob = target_words(next(iter(exps.values())).target[0], probs)
    title = (f"{name}: " if name else "") + words + (f" ({100 * prob:.0f} %)" if prob is not None else "")
    row = {m: (e.maps[0], e.signed, "; ".join(w["short"] for w in e.warnings if w["code"] != "unsure"))
           for m, e in exps.items()}
    return row, title


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
        row, title = grid_row(subject, x, exps, name)
        rows.append(row)
        titles.append(title)
        print(family, name, {m: round(e.seconds, 2) for m, e in exps.items()}, file=sys.stderr)
    png = path.with_suffix(".png")
    sk.viz.grid(images, rows, titles, path=png, smooth=GRID_SMOOTH)
    save_small(png, path)
    return {"methods": methods, "params": params}


TARGETS_PHOTO = "chelsea"
TARGETS_METHODS = ["gradcam", "integrated_gradients", "rise"]
TARGETS = [  # (title, target)
    ('Class("Egyptian cat")', sk.Class("Egyptian cat")),
    ('Class("tabby cat")', sk.Class("tabby cat")),
    ('Contrast("Egyptian cat", vs="tabby cat")', sk.Contrast("Egyptian cat", vs="tabby cat")),
    ('Group("cat")', sk.Group("cat")),
]


def targets_grid(subject, path: Path) -> dict:
    """One photo, one row per target, one column per method."""
    available = sk.methods.available()
    methods = [m for m in TARGETS_METHODS if m in available]
    params = {m: {k: v for k, v in PARAMS.get(m, {}).items() if k in available[m]["defaults"]} for m in methods}
    image = sk.data.image(TARGETS_PHOTO)
    x = subject.preprocess(image)
    images, rows, titles = [], [], []
    for title, target in TARGETS:
        exps = sk.explain(subject, x, method=methods, target=target, params=params)
        images.append(image)
        row, what = grid_row(subject, x, exps)
        rows.append(row)
        titles.append(f"{title}\n{what}")
        print("targets", title.replace("\n", " "), {m: round(e.seconds, 2) for m, e in exps.items()},
              file=sys.stderr)
    png = path.with_suffix(".png")
    sk.viz.grid(images, rows, titles, path=png, smooth=GRID_SMOOTH)
    save_small(png, path)
    return {"photo": TARGETS_PHOTO, "methods": methods, "params": params,
            "targets": [repr(t) for _, t in TARGETS]}


def concept_figures(subject) -> dict:
    """The concepts page's pictures: a CRAFT atlas of the pretrained model on the bundled photos,
    and for one class of the parts dataset (whose parts are known) its atlas, with each concept
    named by the part it sits on, and its summaries."""
    from saliencykit.benchmarks.parts import dataset as parts
    from saliencykit.concepts import extract, removal_effect, score_bank, summarize_class
    from saliencykit.datasets.runner import load_subject
    from saliencykit.present.atlas import concept_atlas, summary_figure

    photos = sk.data.names()
    x = subject.preprocess([sk.data.image(n) for n in photos])
    bank = extract(subject, x, n_concepts=8, seed=0, crops_per_image=16, crop=0.4)
    rem = removal_effect(subject, bank, x)
    concept_atlas(subject, bank, x, importance=rem.drop.mean(0).clamp(min=0), removal=rem.drop.mean(0), n_maps=4,
                  path=OUT / "concepts-photos.png")
    pc = load_subject("parts_cnn")
    batch = parts.generate(400, seed=5)
    xp = parts.to_tensor(batch.images)
    with torch.no_grad():
        keep = (pc.forward(xp).argmax(1) == 0).nonzero().flatten()
    xc = xp[keep]
    pbank = extract(pc, xc, layer="features.6", n_concepts=8, seed=0, crops_per_image=16, crop=0.3)
    prem = removal_effect(pc, pbank, xc, target=0)
    masks = {p: m[keep.numpy()] for p, m in batch.region_masks().items()}   # parts, body, distractors, canvas
    scores = score_bank(pc, pbank, xc, masks, importance=prem.drop.clamp(min=0))
    concept_atlas(pc, pbank, xc, importance=prem.drop.mean(0).clamp(min=0), parts=scores.part,
                  removal=prem.drop.mean(0), path=OUT / "concepts-parts.png")
    summ = summarize_class(pc, xc, target=0, n_summaries=3, seed=0)
    summary_figure(summ, pc, path=OUT / "concepts-summaries.png")
    return {"photos": {"photos": photos, "bank": repr(bank), "layer": bank.layer},
            "parts": {"class": pc.labels[0], "images": int(len(keep)), "bank": repr(pbank), "parts": scores.part,
                      "scores": scores.to_dict()}}


def series_figure(path: Path) -> dict:
    """One planted-motif series of the benchmark explained by the shipped series CNN with IG: the
    map as a band under the series, with its colour bar (signed, centred at 0)."""
    from saliencykit.benchmarks.series import dataset as S
    from saliencykit.present import viz

    subject = sk.load_model("series_cnn")
    data = S.generate(1, seed=11)
    x = S.to_tensor(data.series)
    e = sk.explain(subject, x, "integrated_gradients", target=data.labels.tolist(), steps=32)
    viz.series_plot(x[0], e.maps[0], e.signed, "integrated_gradients", e.target[0]["name"], path=path)
    steps = data.masks[0].nonzero()[0]
    return {"model": "series_cnn", "method": "integrated_gradients", "params": {"steps": 32}, "series_seed": 11,
            "motif_steps": [int(steps[0]), int(steps[-1])]}


def main():
    OUT.mkdir(exist_ok=True)
    if sys.argv[1:2] == ["--demo"]:  # keep the PNG that `make demo` wrote
        from PIL import Image

        Image.open(sys.argv[2]).save(OUT / "demo.png")
        save_small(OUT / "demo.png", OUT / "demo-grid.jpg", scale=0.6)
        return
    torch.manual_seed(0)
    wanted = sys.argv[1:] or [*FAMILIES, "targets", "concepts", "series"]
    unknown = [w for w in wanted if w not in FAMILIES and w not in ("targets", "concepts", "series")]
    if unknown:
        sys.exit(f"unknown figure(s) {unknown}; known: {[*FAMILIES, 'targets', 'concepts', 'series']}")
    settings_path = OUT / "figures.json"
    settings = json.loads(settings_path.read_text()) if settings_path.exists() else {}
    if "series" in wanted:
        settings["series"] = series_figure(OUT / "series.png")
        settings_path.write_text(json.dumps(settings, indent=2))
        if wanted == ["series"]:
            return
    subject = sk.load_model("efficientnet_lite0")
    for family, methods in FAMILIES.items():
        if family not in wanted:
            continue
        settings[family] = family_grid(subject, family, methods, OUT / f"{family}.jpg")
        settings_path.write_text(json.dumps(settings, indent=2))  # merged: other figures keep their entry
    if "targets" in wanted:
        settings["targets"] = targets_grid(subject, OUT / "targets.jpg")
        settings_path.write_text(json.dumps(settings, indent=2))
    if "concepts" in wanted:
        settings["concepts"] = concept_figures(subject)
        settings_path.write_text(json.dumps(settings, indent=2))


if __name__ == "__main__":
    main()
