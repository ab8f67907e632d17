"""`saliencykit report PHOTO... --method M [--metric X] --out report.html` (photos, or `.npy`/`.csv`
series), and the demo's report.html."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import SaliencyError


NOT_SERIES = ("the HTML report shows photos and series; for volumes and feature vectors use "
              "`saliencykit explain FILE.npy --layout ...` (maps), `saliencykit evaluate FILE.npy --layout ...` "
              "(scores) and sk.verbalize (words)")


def series_report(args, out: Path, methods, metrics, target, arrays):
    """`report` on `.npy` / `.csv` series: one section per file (`present.report.series`)."""
    from ..datasets.runner import load_subject as load_model
    from ..present.report import write
    from ..present.report.series import build_series
    from .common import load_array, parse_params, progress, unique_stems

    layout = args.layout or "BCT"
    if layout != "BCT":
        raise SaliencyError(f"a {layout} input: " + NOT_SERIES)
    if len(arrays) != len(args.photos):
        raise SaliencyError("give either photos or .npy/.csv series, not both in one report")
    if args.concepts:
        raise SaliencyError("--concepts reads concepts of photos; a series report has none")
    if args.steps is not None and args.steps < 2:
        raise SaliencyError(f"--steps must be at least 2, got {args.steps}")
    series = []
    for spec in arrays:
        if not Path(spec).is_file():
            raise SaliencyError(f"no such file: {spec!r}")
        series.append(load_array(spec, layout))
    subject = load_model(args.model)
    subject.layout = layout
    html = build_series(subject, series, unique_stems([Path(p).stem for p in arrays]), methods, target=target,
                        metrics=metrics, seed=args.seed, batch_size=args.batch_size, layer=args.layer,
                        params=parse_params(args.param), verbalize=not args.no_words,
                        progress=None if args.quiet else (lambda it: progress(it, False, "report")),
                        metric_params={m: {"step": max(1, -(-series[0].shape[-1] // args.steps))}
                                       for m in metrics if m in ("deletion", "insertion")} if args.steps else None)
    write(out, html)
    if not args.quiet:
        print(f"wrote {out}")


def register(subparsers):
    from .common import add_model_args

    p = subparsers.add_parser("report", help="write a self-contained HTML report (maps, words, metrics)")
    p.add_argument("photos", nargs="+", help="image files, bundled photo names (chelsea, coffee, ...), or "
                                              "sources: a folder, a .csv/.jsonl list, parts:N, hf:DIR, bundled; "
                                              "or .npy/.csv series (one [C,T] / [T] each)")
    p.add_argument("--method", action="append", help="method name (repeat for several); default gradcam")
    p.add_argument("--metric", action="append", help="metric name (repeat for several); default none")
    p.add_argument("--steps", type=int, default=None,
                   help="points on deletion/insertion-type curves (default: the metric's own, one per image row)")
    p.add_argument("--no-words", action="store_true", help="leave out the plain-language verbalization")
    p.add_argument("--concepts", metavar="BANK", help="a saved concept bank (the bank/ folder `saliencykit concepts` "
                                                    "writes): each photo also gets its concepts in words and maps")
    p.add_argument("--out", default="report.html", help="output HTML file")
    p.add_argument("--layout", choices=("BCHW", "BCT", "BCDHW", "BF"), default=None,
                   help="the input's axes; .npy/.csv inputs are series (BCT), the only other layout the report shows")
    add_model_args(p)
    p.set_defaults(func=cmd_report)


def cmd_report(args):
    from ..datasets.runner import load_subject as load_model
    from ..present import report
    from .common import parse_params, photo_sources, progress, target_from_args

    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise SaliencyError(f"--out {out} is a directory; give a file name such as {out / 'report.html'}")
    from ..files import check_writable_file

    check_writable_file(out, "the report")
    methods = args.method or ["gradcam"]
    metrics = args.metric or []
    target = target_from_args(args)
    from .common import is_array_file

    arrays = [p for p in args.photos if is_array_file(p)]
    if arrays or args.layout not in (None, "BCHW"):
        return series_report(args, out, methods, metrics, target, arrays)
    sources = photo_sources(args.photos, args.quiet)  # unknown photos fail before the model loads
    bank = None
    if args.concepts:
        from ..concepts import ConceptBank

        bank = ConceptBank.load(args.concepts)   # a bank of another model is refused at its layer (name, channels)
    subject = load_model(args.model)
    if getattr(subject, "layout", None) not in (None, "BCHW"):
        raise SaliencyError(f"{args.model} reads {subject.layout} inputs: give them as .npy/.csv files "
                            f"(`saliencykit report FILE.npy --model {args.model}`)")
    if bank is not None and bank.layer not in dict(subject.model.named_modules()):
        raise SaliencyError(f"--concepts {args.concepts} was made at layer {bank.layer!r} of {bank.model or 'another model'}"
                            f"; {args.model} has no such layer: give the --model the bank was made on")
    metric_params = None
    if args.steps is not None:
        if args.steps < 2:
            raise SaliencyError(f"--steps must be at least 2, got {args.steps}")
        h, w = subject.input_size if getattr(subject, "input_size", None) else (224, 224)
        step = max(1, -(-h * w // args.steps))
        metric_params = {m: {"step": step} for m in metrics if m in ("deletion", "insertion")}
    html = report.build(subject, [src for src, _ in sources], methods, target=target, metrics=metrics,
                        seed=args.seed, batch_size=args.batch_size, layer=args.layer, params=parse_params(args.param),
                        names=[stem for _, stem in sources], verbalize=not args.no_words,
                        progress=None if args.quiet else (lambda it: progress(it, False, "report")),
                        metric_params=metric_params, bank=bank)
    report.write(out, html)
    if not args.quiet:
        print(f"wrote {out}")


def demo_step(out_dir, summary, args):
    """Write `report.html` next to the demo's maps, from the maps the demo already computed.

    Only the verbalization needs new forward passes (a handful per photo); metrics are left out
    of the demo report to keep the demo fast (`saliencykit report --metric ...` adds them).
    """
    import numpy as np
    import torch

    from .. import data
    from ..datasets.runner import load_subject as load_model
    from ..present import report
    from ..explanation import Explanation

    out_dir = Path(out_dir)
    subject = load_model(summary["model"])
    sections = []
    for entry in summary["photos"]:
        name = entry["photo"]
        image = data.image(name) if name in data.names() else None
        if image is None:
            continue
        exps = {}
        for method, meta in entry["maps"].items():
            with np.load(out_dir / meta["map"]) as z:
                m = torch.from_numpy(z["maps"].copy())
            exps[method] = Explanation(maps=m, method=method, signed=bool(meta["signed"]),
                                       target=meta.get("target", []), layer=meta.get("layer"),
                                       params=meta.get("params", {}), seed=meta.get("seed"),
                                       passes=meta.get("passes", {}), seconds=meta.get("seconds", 0.0),
                                       versions=summary.get("versions", {}), model=meta.get("model"),
                                       extras=meta.get("extras", {}))
        sections.append(report.photo_section(subject, image, name, explanations=exps,
                                             predictions=entry["predictions"], seed=summary.get("seed", 0)))
    if not sections:
        return
    meta = report.run_meta(subject, summary["methods"], None, summary.get("seed", 0), [],
                           extra={"command": "saliencykit demo"})
    report.write(out_dir / "report.html", report.render(sections, meta))
    if not getattr(args, "quiet", False):
        print(f"wrote {out_dir / 'report.html'}", file=sys.stderr)


__all__ = ["register", "cmd_report", "demo_step"]
