"""Command line: `saliencykit explain | methods | models | demo` (+ commands from `commands/`)."""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

from .errors import SaliencyError

DEMO_METHODS = ["gradcam", "gradcam_pp", "hirescam", "layercam", "eigencam", "saliency", "integrated_gradients",
                "smoothgrad", "guided_backprop"]


def _progress(iterable, quiet: bool, desc: str, total=None):
    if quiet:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr)


def photo_source(spec: str):
    """A path, or the name of a bundled photo."""
    from . import data

    if Path(spec).exists():
        return spec, Path(spec).stem
    if spec in data.names():
        return data.image(spec), spec
    raise SaliencyError(f"no such file or bundled photo: {spec!r} (bundled: {', '.join(data.names())})")


def target_from_args(args):
    from .targets import Class, Contrast, Group

    chosen = [a for a in (args.target, args.contrast, args.group) if a is not None]
    if len(chosen) > 1:
        raise SaliencyError("give only one of --target, --contrast/--vs, --group")
    if args.contrast is not None or args.vs is not None:
        if args.contrast is None or args.vs is None:
            raise SaliencyError("--contrast A needs --vs B (and the other way round)")
        return Contrast(_label(args.contrast), vs=_label(args.vs))
    if args.group is not None:
        return Group(args.group if "," not in args.group else [_label(s) for s in args.group.split(",")])
    if args.target is not None:
        return Class(_label(args.target))
    return None


def _label(s: str):
    s = s.strip()
    return int(s) if s.isdigit() else s


def add_model_args(p):
    p.add_argument("--model", default="efficientnet_lite0", help="model name (see `saliencykit models`)")
    p.add_argument("--target", help="class label or index to explain (default: the top-1 class)")
    p.add_argument("--contrast", help="explain why this class ...")
    p.add_argument("--vs", help="... and not this one")
    p.add_argument("--group", help="a named class group (dog, cat, bird, ...) or comma-separated classes")
    p.add_argument("--layer", default="auto", help="layer for CAM methods (name, or auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_explain(photos, methods, out: Path, model="efficientnet_lite0", target=None, layer="auto", seed=0,
                batch_size=None, quiet=False, grid_path: Path | None = None) -> dict:
    """Explain each photo with each method; write overlays, raw maps and summary.json.

    All files are written only after every map has been computed, so an error leaves no
    partial output behind.
    """
    from . import load_model, methods as registry, viz
    from .methods import explain
    from .targets import as_target

    for m in methods:
        registry.get(m)  # fail on an unknown method before any work
    subject = load_model(model)
    sources = [photo_source(p) for p in photos]
    stems = _unique([stem for _, stem in sources])
    results = []
    for (src, _), stem in _progress(list(zip(sources, stems)), quiet, "explaining"):
        from .model import load_image

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


def _unique(stems):
    seen, out = {}, []
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}_{seen[s]}")
    return out


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


def cmd_methods(args):
    from .methods import available

    rows = available()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'method':24} {'family':13} {'cost/image':12} notes")
    for name, info in rows.items():
        notes = ", ".join(n for n, flag in (("signed", info["signed"]), ("seeded", info["randomized"]),
                                             ("layer", info["uses_layer"]), ("experimental", info["experimental"]))
                          if flag)
        print(f"{name:24} {info['family']:13} {info['cost']:12} {notes}")


def cmd_models(args):
    from .zoo import available_models

    for name, desc in available_models().items():
        print(f"{name:28} {desc}")


def cmd_demo(args):
    from . import data

    out = Path(args.out)
    t0 = time.perf_counter()
    summary = run_explain(list(data.PHOTOS), args.method or DEMO_METHODS, out, model=args.model, seed=args.seed,
                          quiet=args.quiet, grid_path=out / "grid.png")
    hook = _extra_demo_steps()
    for step in hook:
        step(out, summary, args)
    if not args.quiet:
        for p in summary["photos"]:
            preds = ", ".join(f"{q['label']} {q['prob']:.0%}" for q in p["predictions"])
            print(f"{p['photo']:16} {preds}")
        print(f"wrote {out}/ (grid.png, summary.json, {sum(len(p['maps']) for p in summary['photos'])} overlays) "
              f"in {time.perf_counter() - t0:.0f}s")


def _extra_demo_steps():
    """Later features (report, ...) add demo steps as `commands.*.demo_step(out, summary, args)`."""
    steps = []
    for mod in _command_modules():
        if hasattr(mod, "demo_step"):
            steps.append(mod.demo_step)
    return steps


def _command_modules():
    from . import commands

    mods = []
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        mods.append(importlib.import_module(f"{commands.__name__}.{info.name}"))
    return mods


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="saliencykit", description="Explain PyTorch vision models with saliency maps.")
    parser.add_argument("--version", action="version", version=f"saliencykit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("explain", help="explain photos with one or more methods")
    p.add_argument("photos", nargs="+", help="image files or bundled photo names (chelsea, coffee, ...)")
    p.add_argument("--method", action="append", help="method name (repeat for several); default gradcam")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--grid", action="store_true", help="also write grid.png")
    add_model_args(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("methods", help="list every method with its family and cost")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("models", help="list the model names that load_model understands")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="explain the bundled photos with the bundled model")
    p.add_argument("--out", default="demo-output")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--method", action="append")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    for mod in _command_modules():
        if hasattr(mod, "register"):
            mod.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except SaliencyError as err:
        print(f"saliencykit: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
