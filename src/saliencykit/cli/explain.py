"""`saliencykit explain` and `saliencykit demo`: overlays, raw maps, summary.json and a grid."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .common import add_model_args, demo_steps, photo_sources, progress, target_from_args, unique_stems

DEMO_METHODS = ["gradcam", "gradcam_pp", "hirescam", "layercam", "eigencam", "saliency", "integrated_gradients",
                "smoothgrad", "guided_backprop"]


def run_explain(photos, methods, out: Path, model="efficientnet_lite0", target=None, layer="auto", seed=0,
                batch_size=None, quiet=False, grid_path: Path | None = None) -> dict:
    """Explain each photo with each method; write overlays, raw maps and summary.json.

    All files are written only after every map has been computed, so an error leaves no
    partial output behind.
    """
    from .. import methods as registry
    from ..datasets.runner import load_subject as load_model
    from ..present import viz
    from ..methods import explain
    from ..images import load_image
    from ..targets import as_target

    from ..files import check_writable_dir

    for m in methods:
        registry.get(m)  # fail on an unknown method before any work
    check_writable_dir(out, "the output")  # and on an output that could not be written
    subject = load_model(model)
    sources = photo_sources(photos, quiet)
    stems = unique_stems([stem for _, stem in sources])
    results = []
    for (src, _), stem in progress(list(zip(sources, stems)), quiet, "explaining"):
        image = load_image(src)
        x = subject.preprocess(image)
        preds = subject.predict(x, k=5)[0]
        exps = explain(subject, x, method=list(methods), target=as_target(target), layer=layer, seed=seed,
                       batch_size=batch_size)
        results.append((stem, image, preds, exps))
    # all computed: now write
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model": model, "seed": seed, "methods": list(methods), "photos": []}
    for stem, image, preds, exps in results:
        entry = {"photo": stem, "predictions": preds, "maps": {}}
        for name, exp in exps.items():
            png = out / f"{stem}_{name}.png"
            npz = out / f"{stem}_{name}.npz"
            viz.save_png(exp.overlay(image), png)
            viz.save_map_npz(exp.maps[0], npz, signed=exp.signed)
            entry["maps"][name] = {"overlay": png.name, "map": npz.name, **exp[0].metadata()}
        summary["photos"].append(entry)
    if grid_path is not None and results:
        titles = []
        rows = []
        for stem, image, preds, exps in results:
            first = next(iter(exps.values()))
            titles.append(f"{stem}: {first.target[0]['name']}")
            rows.append({name: (e.maps[0], e.signed) for name, e in exps.items()})
        viz.grid([r[1] for r in results], rows, titles, path=grid_path)
        summary["grid"] = grid_path.name
    viz.atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
    return summary


def cmd_explain(args):
    target = target_from_args(args)
    summary = run_explain(args.photos, args.method or ["gradcam"], Path(args.out), model=args.model, target=target,
                          layer=args.layer, seed=args.seed, batch_size=args.batch_size, quiet=args.quiet,
                          grid_path=Path(args.out) / "grid.png" if args.grid else None)
    if not args.quiet:
        for p in summary["photos"]:
            top = p["predictions"][0]
            print(f"{p['photo']}: {top['label']} ({top['prob']:.1%}) -> {len(p['maps'])} maps")
        print(f"wrote {args.out}/summary.json")


def cmd_demo(args):
    from .. import data

    out = Path(args.out)
    t0 = time.perf_counter()
    summary = run_explain(list(data.PHOTOS), args.method or DEMO_METHODS, out, model=args.model, seed=args.seed,
                          quiet=args.quiet, grid_path=out / "grid.png")
    for step in demo_steps():
        step(out, summary, args)
    if not args.quiet:
        for p in summary["photos"]:
            preds = ", ".join(f"{q['label']} {q['prob']:.0%}" for q in p["predictions"])
            print(f"{p['photo']:16} {preds}")
        print(f"wrote {out}/ (grid.png, summary.json, {sum(len(p['maps']) for p in summary['photos'])} overlays) "
              f"in {time.perf_counter() - t0:.0f}s")


def register(sub):
    p = sub.add_parser("explain", help="explain photos with one or more methods")
    p.add_argument("photos", nargs="+", help="image files, bundled photo names (chelsea, coffee, ...), or "
                                              "sources: a folder, a .csv/.jsonl list, parts:N, hf:DIR, bundled")
    p.add_argument("--method", action="append", help="method name (repeat for several); default gradcam")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--grid", action="store_true", help="also write grid.png")
    add_model_args(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("demo", help="explain the bundled photos with the bundled model")
    p.add_argument("--out", default="demo-output")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--method", action="append")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
