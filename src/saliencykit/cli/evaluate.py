"""`saliencykit evaluate PHOTO... --method M --metric K --out DIR`: score methods with metrics.

Writes `scores.csv` (one row per photo and method), `scores.json` (scores, curves, passes,
settings) and `curves.png` (deletion/insertion/ROAD curves), and prints the methods ranked with
each metric's better direction marked (↑ higher is better, ↓ lower is better).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import SaliencyError
from .common import parse_params

DEFAULT_METHODS = ["gradcam", "integrated_gradients"]
DEFAULT_METRICS = ["deletion", "insertion", "saco"]


def run_evaluate(photos, methods, metrics, out: Path, model="efficientnet_lite0", target=None, layer="auto",
                 seed=0, batch_size=None, quiet=False, regions=None, params=None, random_baseline=True):
    from ..models import load_model
    from .. import methods as method_registry
    from .common import photo_source, unique_stems
    from ..metrics import evaluate, get
    from ..metrics.localisation import load_regions
    from ..images import load_image
    from ..targets import as_target

    for m in methods:
        method_registry.get(m)           # unknown names fail before any work
    for k in metrics:
        get(k)
    params = params or {}
    subject = load_model(model)
    sources = [photo_source(p) for p in photos]
    stems = unique_stems([stem for _, stem in sources])
    images = [load_image(src) for src, _ in sources]
    x = subject.preprocess(images)
    masks = None
    if regions is not None:
        keys = [p if Path(p).exists() else stem for p, stem in zip(photos, stems)]
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
    tgt = as_target(target) if target is not None else None
    if not quiet:
        print(f"explaining {len(images)} photo(s) with {', '.join(methods)} ...", file=sys.stderr)
    exps = method_registry.explain(subject, x, method=list(methods), target=tgt, layer=layer, seed=seed,
                                   batch_size=batch_size, progress=not quiet)
    if not quiet:
        print(f"scoring with {', '.join(metrics)} ...", file=sys.stderr)
    ev = evaluate(subject, x, exps, metrics=list(metrics), target=tgt, seed=seed, masks=masks,
                  batch_size=batch_size, params=params, progress=not quiet, image_names=stems,
                  random_baseline=random_baseline)
    # everything computed: now write
    out.mkdir(parents=True, exist_ok=True)
    ev.to_csv(out / "scores.csv")
    payload = ev.to_dict()
    payload.update(model=model, methods=list(methods),
                   explanation_passes={n: e.passes for n, e in exps.items()})
    from ..files import atomic_write

    atomic_write(out / "scores.json", lambda p: Path(p).write_text(json.dumps(payload, indent=2)))
    curves = ev.plot_curves(out / "curves.png")
    return ev, curves


def cmd_evaluate(args):
    from .common import target_from_args

    out = Path(args.out)
    ev, curves = run_evaluate(args.photos, args.method or DEFAULT_METHODS, args.metric or DEFAULT_METRICS, out,
                              model=args.model, target=target_from_args(args), layer=args.layer, seed=args.seed,
                              batch_size=args.batch_size, quiet=args.quiet, regions=args.regions,
                              params=parse_params(args.param, "METRIC"), random_baseline=not args.no_random)
    print(ev.summary())
    print("(↑ higher is better, ↓ lower is better; mean over photos, best first by the first metric)")
    written = ["scores.csv", "scores.json"] + (["curves.png"] if curves is not None else [])
    print(f"wrote {out}/ ({', '.join(written)})")


def register(subparsers):
    p = subparsers.add_parser("evaluate", help="score explanation methods with evaluation metrics")
    p.add_argument("photos", nargs="+", help="image files or bundled photo names (chelsea, coffee, ...)")
    p.add_argument("--method", action="append", help="method to evaluate (repeat); default gradcam and "
                                                     "integrated_gradients; a random-map baseline is always added")
    p.add_argument("--metric", action="append", help="metric name (repeat); default deletion, insertion, saco")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--regions", help="JSON or CSV file with object boxes/masks per photo (localisation metrics)")
    p.add_argument("--param", action="append", help="metric parameter METRIC.NAME=VALUE, e.g. deletion.step=448")
    p.add_argument("--no-random", action="store_true", help="do not add the random-map baseline")
    from .common import add_model_args

    add_model_args(p)
    p.set_defaults(func=cmd_evaluate)
