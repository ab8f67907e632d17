"""`saliencykit evaluate PHOTO... --method M --metric K --out DIR`: score methods with metrics.

Series, volumes and feature vectors come as `.npy` / `.csv` files (one example each, `--layout`
as for `explain`; default BCT), their true positions for the localisation metrics as one `.npy`
of masks (`--regions masks.npy`, `[N,T]` for N series).

Writes `scores.csv` (one row per photo and method), `scores.json` (scores, curves, passes,
settings), `curves.png` (deletion/insertion/ROAD curves) and with `--save-maps` the maps, and
prints the methods ranked with each metric's better direction marked (↑ higher is better, ↓ lower
is better), then the spread over photos: bootstrap intervals, paired tests and per-photo wins.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import SaliencyError
from .common import parse_params

DEFAULT_METHODS = ["gradcam", "integrated_gradients"]
ARRAY_METHODS = ["saliency", "integrated_gradients"]     # .npy/.csv inputs: methods every layout has
DEFAULT_METRICS = ["deletion", "insertion", "saco"]


def load_arrays(paths, subject, layout: str, metrics, regions=None):
    """`.npy` / `.csv` inputs (one example each, the same shape) as one batch in `layout`, their
    names, and the masks of `regions` (a `.npy` of one boolean mask per input, the map's shape:
    `[N,T]` for series) when given or needed."""
    import numpy as np
    import torch

    from ..metrics import get
    from ..metrics.base import map_shape
    from ..subject import check_layout
    from .common import load_array, unique_stems

    layout = check_layout(layout)
    subject.layout = layout
    xs = [load_array(spec, layout) for spec in paths]
    if len({tuple(x.shape) for x in xs}) > 1:
        raise SaliencyError(f"the inputs have different shapes {sorted({tuple(x.shape[1:]) for x in xs})}; "
                            "evaluate scores one batch: give inputs of one shape")
    x = torch.cat(xs)
    from ..metrics.evaluate import check_layouts

    check_layouts({k: get(k) for k in metrics}, layout)     # before any pass
    stems = unique_stems([Path(p).stem for p in paths])
    shape = map_shape(x, layout)
    need = [k for k in metrics if "masks" in get(k).needs]
    masks = None
    if regions is not None:
        if Path(regions).suffix.lower() != ".npy" or not Path(regions).is_file():
            raise SaliencyError(f"--regions {regions}: for .npy/.csv inputs give a .npy file of one boolean mask per "
                                f"input in order, shape [{len(paths)}, {', '.join(map(str, shape))}]")
        masks = torch.from_numpy(np.load(regions, allow_pickle=False).astype(bool))
    elif need:
        raise SaliencyError(f"metric(s) {', '.join(need)} need the true positions: pass --regions MASKS.npy with one "
                            f"boolean mask per input in order, shape [{len(paths)}, {', '.join(map(str, shape))}]")
    return x, stems, masks


def run_evaluate(photos, methods, metrics, out: Path, model="efficientnet_lite0", target=None, layer="auto",
                 seed=0, batch_size=None, quiet=False, regions=None, params=None, random_baseline=True,
                 save_maps=False, layout=None):
    from ..datasets.runner import load_subject as load_model
    from .. import methods as method_registry
    from .common import is_array_file, photo_sources, unique_stems
    from ..metrics import get
    from ..metrics.localisation import load_regions
    from ..images import load_image

    for m in methods:
        method_registry.get(m)           # unknown names fail before any work
    for k in metrics:
        get(k)
    from ..files import check_writable_dir

    check_writable_dir(out, "the output")  # an output that could not be written fails before any work
    params = params or {}
    arrays = [p for p in photos if is_array_file(p)]
    if arrays and len(arrays) != len(photos):
        raise SaliencyError("give either photos or .npy/.csv arrays, not both in one call")
    subject = load_model(model)
    if arrays or layout not in (None, "BCHW"):
        x, stems, masks = load_arrays(photos, subject, layout or "BCT", metrics, regions)
        return _score(subject, x, stems, masks, methods, metrics, out, model, target, layer, seed, batch_size, quiet,
                      params, random_baseline, save_maps, what="input")
    sources = photo_sources(photos, quiet)
    stems = unique_stems([stem for _, stem in sources])
    images = [load_image(src) for src, _ in sources]
    x = subject.preprocess(images)
    masks = None
    if regions is not None:
        keys = [src if isinstance(src, str) and Path(src).exists() else stem for (src, _), stem in zip(sources, stems)]
        masks = load_regions(regions, keys, tuple(x.shape[-2:]), [im.size for im in images])
    elif any("masks" in get(k).needs for k in metrics):
        from .. import data

        if all(stem in data.boxes() for stem in stems):   # bundled photos come with boxes
            import torch

            masks = torch.stack([data.box_mask(stem, tuple(x.shape[-2:])) for stem in stems])
        else:
            needing = [k for k in metrics if "masks" in get(k).needs]
            raise SaliencyError(f"metric(s) {', '.join(needing)} need object boxes or masks: pass --regions FILE "
                                "(see docs/evaluation.md for the JSON/CSV format)")
    return _score(subject, x, stems, masks, methods, metrics, out, model, target, layer, seed, batch_size, quiet,
                  params, random_baseline, save_maps, what="photo")


def _score(subject, x, stems, masks, methods, metrics, out, model, target, layer, seed, batch_size, quiet, params,
           random_baseline, save_maps, what="photo"):
    """Explain `x` with every method, score the maps, write the files (after everything is computed)."""
    from .. import methods as method_registry
    from ..metrics import evaluate
    from ..targets import as_target

    tgt = as_target(target) if target is not None else None
    if not quiet:
        print(f"explaining {len(x)} {what}(s) with {', '.join(methods)} ...", file=sys.stderr)
    exps = method_registry.explain(subject, x, method=list(methods), target=tgt, layer=layer, seed=seed,
                                   batch_size=batch_size, progress=not quiet)
    if not quiet:
        from ..present.names import method_title

        said = set()
        for name, e in exps.items():  # a photo's own warning (an unsure model) once, a map's with its method
            for w in e.warnings:
                photo = stems[w["example"]]
                line = (f"{photo}: {w['message']}" if w["code"] == "unsure" else
                        f"{photo}, {method_title(name)}: {w['message']}")
                if line not in said:
                    said.add(line)
                    print(f"warning: {line}", file=sys.stderr)
        print(f"scoring with {', '.join(metrics)} ...", file=sys.stderr)
    ev = evaluate(subject, x, exps, metrics=list(metrics), target=tgt, seed=seed, masks=masks,
                  batch_size=batch_size, params=params, progress=not quiet, image_names=stems,
                  random_baseline=random_baseline)
    # everything computed: now write
    out.mkdir(parents=True, exist_ok=True)
    ev.to_csv(out / "scores.csv")
    payload = ev.to_dict()
    payload.update(model=model, methods=list(methods), layout=subject.layout_for(x),
                   explanation_passes={n: e.passes for n, e in exps.items()})
    from ..files import atomic_write

    atomic_write(out / "scores.json", lambda p: Path(p).write_text(json.dumps(payload, indent=2)))
    curves = ev.plot_curves(out / "curves.png")
    if save_maps:
        for name, e in exps.items():
            e.save(out / "maps" / name)     # maps.npz ([B,H,W] "maps") + explanation.json, photos in order
    return ev, curves


def spread(ev, seed: int = 0) -> str:
    """The spread over photos: per metric each method's mean with a bootstrap 95 % interval, and
    the share of photos on which it beats every other method and the random map."""
    import pandas as pd

    from ..datasets.summary import summarize

    rows = pd.DataFrame(list(ev.table()))
    if rows["image"].nunique() < 2:
        return ""
    s = summarize(rows, metrics=[m for m in ev.metrics if ev.directions[m] is not None], seed=seed)
    lines = [s.text()]
    wins = []
    for _, r in s.pairs.iterrows():
        d = s.directions[r["metric"]]
        a_share, b_share = (r["a_wins"], r["b_wins"]) if d == "higher" else (r["b_wins"], r["a_wins"])
        wins.append(f"  {r['metric']}: {r['a']} better than {r['b']} on {a_share:.0%} of the photos, "
                    f"worse on {b_share:.0%} (Holm p = {r['p_holm']:.2g})")
    if wins:
        lines += ["per-photo wins:"] + wins
    return "\n".join(lines)


def cmd_evaluate(args):
    from .common import target_from_args

    out = Path(args.out)
    from .common import is_array_file

    arrays = any(is_array_file(p) for p in args.photos) or args.layout not in (None, "BCHW")
    methods = args.method or (ARRAY_METHODS if arrays else DEFAULT_METHODS)
    ev, curves = run_evaluate(args.photos, methods, args.metric or DEFAULT_METRICS, out,
                              model=args.model, target=target_from_args(args), layer=args.layer, seed=args.seed,
                              batch_size=args.batch_size, quiet=args.quiet, regions=args.regions,
                              params=parse_params(args.param, "METRIC"), random_baseline=not args.no_random,
                              save_maps=args.save_maps, layout=args.layout)
    print(ev.summary())
    print("(↑ higher is better, ↓ lower is better; mean over photos, best first by the first metric)")
    text = spread(ev, seed=args.seed)
    if text:
        print()
        print(text)
    written = ["scores.csv", "scores.json"] + (["curves.png"] if curves is not None else [])
    written += ["maps/"] if args.save_maps else []
    print(f"wrote {out}/ ({', '.join(written)})")


def register(subparsers):
    p = subparsers.add_parser("evaluate", help="score explanation methods with evaluation metrics")
    p.add_argument("photos", nargs="+", help="image files, bundled photo names (chelsea, coffee, ...), or "
                                              "sources: a folder, a .csv/.jsonl list, parts:N, hf:DIR, bundled; "
                                              "or .npy/.csv arrays (one series [C,T] / [T] each, or --layout)")
    p.add_argument("--method", action="append", help="method to evaluate (repeat); default gradcam and "
                                                     "integrated_gradients; a random-map baseline is always added")
    p.add_argument("--metric", action="append", help="metric name (repeat); default deletion, insertion, saco")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--regions", help="JSON or CSV file with object boxes/masks per photo (localisation metrics); "
                                     "for .npy/.csv inputs a .npy of one boolean mask per input, e.g. [N,T]")
    p.add_argument("--param", action="append", help="metric parameter METRIC.NAME=VALUE, e.g. deletion.step=448")
    p.add_argument("--layout", choices=("BCHW", "BCT", "BCDHW", "BF"), default=None,
                   help="the input's axes; .npy/.csv inputs are series (BCT) unless told otherwise")
    p.add_argument("--no-random", action="store_true", help="do not add the random-map baseline")
    p.add_argument("--save-maps", action="store_true", help="keep the maps: OUT/maps/METHOD/ (maps.npz + "
                                                            "explanation.json, one map per photo in order)")
    from .common import add_model_args

    add_model_args(p, method_params=False)
    p.set_defaults(func=cmd_evaluate)
