"""`saliencykit explain` and `saliencykit demo`: overlays, raw maps, summary.json and a grid.

The output folder is described in docs/output.md: per photo and method an annotated overlay
(`STEM_METHOD.png`) and the map (`STEM_METHOD.npz`, key `maps` `[1,H,W]`, as `Explanation.save`
writes), `summary.json` (the run's settings and versions once, then per photo its predictions,
warnings and per map its metadata) and, on request, `grid.png`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import SaliencyError
from .common import (add_dense_args, add_model_args, demo_steps, is_array_file, load_array, load_region_mask,
                     parse_params, photo_sources, progress, region_target, target_from_args, unique_stems)

DEMO_METHODS = ["gradcam", "gradcam_pp", "hirescam", "layercam", "eigencam", "saliency", "integrated_gradients",
                "smoothgrad", "guided_backprop"]
# The demo's own budget for its two slow methods (their defaults: 50 steps, 25 samples), so that
# every method runs on every photo in well under a minute on 2 cores; the demo says so when it
# starts, and `saliencykit explain` always uses the defaults unless --param says otherwise.
DEMO_PARAMS = {"integrated_gradients": {"steps": 25}, "smoothgrad": {"samples": 10}}
GRID_SMOOTH = 0.006  # display-only smoothing of pixel-level maps in the grid (0.6 % of the side)


def run_explain(photos, methods, out: Path, model="efficientnet_lite0", target=None, layer="auto", seed=0,
                batch_size=None, quiet=False, grid_path: Path | None = None, params: dict | None = None,
                grid_smooth: float = 0.0, region: tuple | None = None, amp: bool = False) -> dict:
    """Explain each photo with each method; write overlays, raw maps and summary.json.

    One progress bar per method (over the photos). All files are written only after every map
    has been computed, so an error leaves no partial output behind. `region`: (PNG path, "class" |
    "output" | "change", class label or None) explains that region of a dense output instead.
    """
    import torch

    from .. import methods as registry
    from ..explanation import package_versions
    from ..images import load_image, transparency_note
    from ..methods import explain
    from ..datasets.runner import load_subject as load_model
    from ..present import viz
    from ..present.names import method_title, target_words
    from ..targets import as_target

    from ..files import check_writable_dir

    for m in methods:
        registry.get(m)  # fail on an unknown method before any work
    check_writable_dir(out, "the output")  # and on an output that could not be written
    params = params or {}
    subject = load_model(model)
    sources = photo_sources(photos, quiet)
    stems = unique_stems([stem for _, stem in sources])
    inputs, targets = [], []
    for src, _ in sources:
        image = load_image(src)
        x = subject.preprocess(image)
        with subject.explaining(), torch.no_grad():
            scores = subject.forward(subject.check_input(x)).float()
        if scores.dim() == 2:   # the top-5 list from this one forward
            inputs.append((image, x, subject.top_classes(scores, k=5)[0], scores.softmax(-1)[0],
                           transparency_note(src)))
        else:   # a dense output (segmentation, image-to-image): no class probabilities to list
            inputs.append((image, x, [], None, transparency_note(src)))
        targets.append(as_target(target) if region is None else
                       region_target(region[1], region[2], load_region_mask(region[0], tuple(x.shape[-2:]), image.size)))
    exps: list[dict] = [{} for _ in inputs]
    width = max(len(method_title(m)) for m in methods)
    for m in methods:
        for i in progress(range(len(inputs)), quiet, method_title(m).ljust(width), unit="photo"):
            e = explain(subject, inputs[i][1], method=m, target=targets[i], layer=layer, seed=seed,
                        batch_size=batch_size, params=params, amp=amp)
            if inputs[i][4]:
                e.extras["warnings"] = e.warnings + [{"code": "alpha", "example": 0, "message": inputs[i][4],
                                                      "short": "transparent pixels shown as white"}]
            exps[i][m] = e
    # all computed: now write
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model": model, "seed": seed, "methods": list(methods), "params": params,
               "versions": package_versions(), "photos": []}
    for stem, (image, x, preds, probs, _), row in zip(stems, inputs, exps):
        entry = {"photo": stem, "predictions": preds, "warnings": [], "maps": {}}
        for name, exp in row.items():
            png, npz = out / f"{stem}_{name}.png", out / f"{stem}_{name}.npz"
            words, prob = target_words(exp.target[0], probs)
            notes = [w["message"] for w in exp.warnings if w["code"] not in ("unsure", "alpha")]
            photo_notes = [w for w in exp.warnings if w["code"] in ("unsure", "alpha")]
            for w in photo_notes:
                if w["message"] not in [v["message"] for v in entry["warnings"]]:
                    entry["warnings"].append({"code": w["code"], "message": w["message"]})
            viz.figure(image, exp.maps[0], exp.signed, name, words, prob,
                       notes=notes + [w["message"] for w in photo_notes], path=png)
            viz.save_map_npz(exp.maps[0], npz, signed=exp.signed)
            meta = exp[0].metadata()
            meta.pop("versions", None)  # once per run, at the top of summary.json
            entry["maps"][name] = {"overlay": png.name, "map": npz.name, **meta}
        summary["photos"].append(entry)
    if grid_path is not None and inputs:
        titles, rows = [], []
        for stem, (image, x, preds, probs, _), row in zip(stems, inputs, exps):
            words, prob = target_words(next(iter(row.values())).target[0], probs)
            titles.append(f"{stem}: {words}" + (f" ({100 * prob:.0f} %)" if prob is not None else ""))
            rows.append({name: (e.maps[0], e.signed, "; ".join(w["short"] for w in e.warnings
                                                            if w["code"] not in ("unsure", "alpha")))
                         for name, e in row.items()})
        viz.grid([i[0] for i in inputs], rows, titles, path=grid_path, smooth=grid_smooth)
        summary["grid"] = grid_path.name
    viz.atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
    return summary


def print_warnings(summary) -> None:
    """Every warning of the run once, on stderr: the photo's own, then each map's."""
    from ..present.names import method_title

    for p in summary["photos"]:
        for w in p["warnings"]:
            print(f"warning: {p['photo']}: {w['message']}", file=sys.stderr)
        for name, meta in p["maps"].items():
            for w in meta.get("extras", {}).get("warnings", []):
                if w["code"] not in ("unsure", "alpha"):
                    print(f"warning: {p['photo']}, {method_title(name)}: {w['message']}", file=sys.stderr)


def run_explain_arrays(paths, methods, out: Path, model: str, layout: str = "BCT", target=None, layer="auto",
                       seed=0, batch_size=None, quiet=False, params: dict | None = None, amp: bool = False) -> dict:
    """Explain `.npy` / `.csv` inputs (a series [C,T] or [T], or any `layout`) with each method:
    per input and method the map (`STEM_METHOD.npz`, key `maps` `[1, ...]`), for a series a line
    plot with the map as a coloured band (`STEM_METHOD.png`), and summary.json; written only after
    every map is computed."""
    import numpy as np

    from .. import methods as registry
    from ..datasets.runner import load_subject as load_model
    from ..explanation import package_versions
    from ..files import atomic_write, check_writable_dir
    from ..methods import explain
    from ..present import viz
    from ..present.names import method_title
    from ..subject import check_layout

    for m in methods:
        registry.get(m)
    layout = check_layout(layout)
    check_writable_dir(out, "the output")
    params = params or {}
    subject = load_model(model)
    subject.layout = layout
    inputs = [(Path(spec).stem, load_array(spec, layout)) for spec in paths]
    stems = unique_stems([stem for stem, _ in inputs])
    width = max(len(method_title(m)) for m in methods)
    exps: list[dict] = [{} for _ in inputs]
    for m in methods:
        for i in progress(range(len(inputs)), quiet, method_title(m).ljust(width), unit="input"):
            exps[i][m] = explain(subject, inputs[i][1], method=m, target=target, layer=layer, seed=seed,
                                 batch_size=batch_size, params=params, amp=amp)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model": model, "seed": seed, "methods": list(methods), "params": params, "layout": layout,
               "versions": package_versions(), "photos": []}
    for stem, (_, x), row in zip(stems, inputs, exps):
        entry = {"photo": stem, "predictions": [], "warnings": [], "maps": {}}
        for name, exp in row.items():
            npz = out / f"{stem}_{name}.npz"
            arr = exp.maps[:1].numpy()
            atomic_write(npz, lambda p, arr=arr: np.savez_compressed(p, maps=arr))
            meta = exp[0].metadata()
            meta.pop("versions", None)
            entry["maps"][name] = {"map": npz.name, **meta}
            if layout == "BCT":
                png = out / f"{stem}_{name}.png"
                viz.series_plot(x[0], exp.maps[0], exp.signed, name, exp.target[0].get("name"), path=png)
                entry["maps"][name]["overlay"] = png.name
        summary["photos"].append(entry)
    atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
    return summary


def cmd_explain(args):
    arrays = [p for p in args.photos if is_array_file(p)]     # a .csv of photo paths is a source
    if arrays or args.layout not in (None, "BCHW"):
        if len(arrays) != len(args.photos):
            raise SaliencyError("give either photos or .npy/.csv arrays, not both in one call")
        if args.region is not None:
            raise SaliencyError("--region reads a PNG mask for image models; it does not apply to .npy/.csv inputs")
        summary = run_explain_arrays(args.photos, args.method or ["saliency"], Path(args.out), model=args.model,
                                     layout=args.layout or "BCT", target=target_from_args(args), layer=args.layer,
                                     seed=args.seed, batch_size=args.batch_size, quiet=args.quiet,
                                     params=parse_params(args.param), amp=args.amp)
    else:
        region = None
        if args.region is not None:
            if args.contrast is not None or args.vs is not None or args.group is not None:
                raise SaliencyError("--region explains a region of a dense output: give its class with --target, "
                                    "not --contrast/--vs or --group")
            region = (args.region, args.region_of, args.target)
        summary = run_explain(args.photos, args.method or ["gradcam"], Path(args.out), model=args.model,
                              target=None if region else target_from_args(args), layer=args.layer, seed=args.seed,
                              batch_size=args.batch_size, quiet=args.quiet,
                              grid_path=Path(args.out) / "grid.png" if args.grid else None,
                              params=parse_params(args.param), grid_smooth=GRID_SMOOTH, region=region, amp=args.amp)
    if not args.quiet:
        print_warnings(summary)
        for p in summary["photos"]:
            top = p["predictions"][0] if p["predictions"] else None
            said = f"{top['label']} ({top['prob']:.1%})" if top else next(iter(p["maps"].values()))["target"][0]["name"]
            print(f"{p['photo']}: {said} -> {len(p['maps'])} maps")
        print(f"wrote {args.out}/summary.json")


def demo_plan(photos, methods, params, threads) -> str:
    from ..present.names import method_title

    cut = [f"{method_title(m)} at {', '.join(f'{v} {k}' for k, v in p.items())}" for m, p in params.items()]
    lines = [f"saliencykit demo: {len(photos)} photos x {len(methods)} methods = {len(photos) * len(methods)} maps "
             f"with {threads} thread(s), then report.html"]
    if cut:
        lines.append(f"  to stay short the demo runs {' and '.join(cut)} (defaults: "
                     "integrated_gradients 50 steps, smoothgrad 25 samples)")
    return "\n".join(lines)


def cmd_demo(args):
    import torch

    from .. import data

    out = Path(args.out)
    methods = args.method or DEMO_METHODS
    params = {m: dict(p) for m, p in DEMO_PARAMS.items() if m in methods}
    for m, p in parse_params(args.param).items():
        params.setdefault(m, {}).update(p)
    t0 = time.perf_counter()
    if not args.quiet:
        print(demo_plan(data.PHOTOS, methods, params, torch.get_num_threads()), file=sys.stderr)
    summary = run_explain(list(data.PHOTOS), methods, out, model=args.model, seed=args.seed,
                          quiet=args.quiet, grid_path=out / "grid.png", params=params, grid_smooth=GRID_SMOOTH)
    for step in demo_steps():
        step(out, summary, args)
    if not args.quiet:
        print_warnings(summary)
        for p in summary["photos"]:
            preds = ", ".join(f"{q['label']} {q['prob']:.0%}" for q in p["predictions"])
            print(f"{p['photo']:16} {preds}")
        n = sum(len(p["maps"]) for p in summary["photos"])
        print(f"wrote {out}/ in {time.perf_counter() - t0:.0f}s: report.html, grid.png, summary.json, "
              f"{n} overlays and maps")
        print(f"where to look: open {out / 'report.html'} in a browser (maps, words, settings); {out / 'grid.png'} "
              "shows every map at once; docs/output.md describes every file")


def register(sub):
    p = sub.add_parser("explain", help="explain photos with one or more methods")
    p.add_argument("photos", nargs="+", help="image files, bundled photo names (chelsea, coffee, ...), or "
                                              "sources: a folder, a .csv/.jsonl list, parts:N, hf:DIR, bundled")
    p.add_argument("--method", action="append", help="method name (repeat for several); default gradcam")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--grid", action="store_true", help="also write grid.png")
    p.add_argument("--amp", action="store_true", help="run the model in mixed precision (CPU: bfloat16, CUDA: "
                                                       "float16); faster, maps differ slightly (docs/performance.md)")
    add_model_args(p)
    add_dense_args(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("demo", help="explain the bundled photos with the bundled model")
    p.add_argument("--out", default="demo-output")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--method", action="append")
    p.add_argument("--param", action="append", help="method parameter METHOD.NAME=VALUE (overrides the demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
