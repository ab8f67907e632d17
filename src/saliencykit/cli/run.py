"""`saliencykit run SOURCE --model M --method A --metric m --out RUN/` and `saliencykit summarize RUN/`.

Exit codes of `run`: 0 every image succeeded; 3 the run finished and some inputs have a row in
the errors table; 2 refused (bad arguments, or RUN/ holds another configuration); 1 crashed
(the finished shards stay valid: rerun the same command to resume); 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import SaliencyError

EPILOG = ("exit codes: 0 every image succeeded; 3 finished, some inputs failed (see RUN/errors); 2 refused "
          "(bad arguments or another configuration in RUN/); 1 crashed; 130 interrupted. A rerun of the same "
          "command resumes where the last one stopped.")


def _target(args):
    if args.target == "label":
        if args.contrast or args.group:
            raise SaliencyError("--target label cannot be combined with --contrast or --group")
        return "label"
    from .common import target_from_args

    t = target_from_args(args)
    if t is None:
        return None
    if args.contrast is not None:
        return {"contrast": _plain(args.contrast), "vs": _plain(args.vs)}
    if args.group is not None:
        return {"group": args.group if "," not in args.group else [_plain(s) for s in args.group.split(",")]}
    return {"class": _plain(args.target)}


def _plain(s: str):
    s = s.strip()
    return int(s) if s.isdigit() else s


def cmd_run(args) -> int:
    from ..datasets import runner
    from ..datasets.launch import run as launch
    from .common import parse_params

    try:
        run = launch(args.source, model=args.model, method=args.method, metric=args.metric or [],
                         out=args.out, params=parse_params(args.param, "METHOD_OR_METRIC"), target=_target(args),
                         layer=args.layer, seed=args.seed, batch=args.batch, batch_size=args.batch_size,
                         shard_size=args.shard_size, maps=args.maps, limit=args.limit, shuffle=args.shuffle,
                         random_baseline=not args.no_random, force=args.force, workers=args.workers,
                         threads=args.threads, ray=args.ray, progress=not args.quiet, device=args.device,
                         amp=args.amp)
    except KeyboardInterrupt:
        print(f"saliencykit: interrupted; the finished shards in {args.out} are intact: rerun the same command "
              "to resume", file=sys.stderr)
        return runner.EXIT_INTERRUPTED
    except SaliencyError:
        raise
    except Exception as err:  # noqa: BLE001 - one line, and how to go on
        print(f"saliencykit: error: the run crashed ({type(err).__name__}: {err}); the finished shards in "
              f"{args.out} are intact: rerun the same command to resume", file=sys.stderr)
        return runner.EXIT_CRASHED
    n_images = run.rows["image"].nunique() if len(run.rows) else 0
    print(f"wrote {args.out}/: {len(run.rows)} rows for {n_images} images, {len(run.errors)} error(s)")
    if len(run.errors):
        for _, e in run.errors.head(5).iterrows():
            print(f"  {e['image']}: {e['stage']}: {e['reason']}", file=sys.stderr)
        if len(run.errors) > 5:
            print(f"  ... {len(run.errors) - 5} more in {args.out}/errors/", file=sys.stderr)
        return runner.EXIT_PARTIAL
    if run.metrics and not args.quiet:
        print(f"summarise it: saliencykit summarize {args.out}")
    return runner.EXIT_OK


def cmd_summarize(args) -> int:
    from ..datasets import load_run
    from ..datasets.summary import summarize

    run = load_run(args.run)
    s = summarize(run, metrics=args.metric, seed=args.seed)
    print(s.text())
    if not run.complete:
        print(f"(partial run: {len(run.rows)} rows from the finished shards)")
    out = Path(args.out) if args.out else Path(args.run) / "summary.html"
    if not args.no_html:
        from ..present.run_report import write_run_report

        write_run_report(run, s, out, examples=args.examples)
        print(f"wrote {out}")
    return 0


def register(subparsers):
    from .common import add_model_args

    p = subparsers.add_parser("run", help="explain and score every image of a folder, list or dataset into a "
                                          "resumable run directory (Parquet)", epilog=EPILOG)
    p.add_argument("source", help="a folder (an ImageFolder layout gives labels), a .csv/.jsonl list, "
                                  "hf:DIR_OR_NAME[@split], parts:N, or bundled")
    p.add_argument("--method", action="append", required=True, help="method name (repeat for several)")
    p.add_argument("--metric", action="append", help="metric name (repeat for several)")
    p.add_argument("--param", action="append", help="NAME.KEY=VALUE for a method or a metric, "
                                                     "e.g. integrated_gradients.steps=32, deletion.step=448")
    p.add_argument("--out", required=True, help="the run directory")
    p.add_argument("--shard-size", type=int, default=64, help="images per shard (the unit of resuming); default 64")
    p.add_argument("--batch", type=int, default=8, help="images explained together; default 8")
    p.add_argument("--maps", choices=("layer", "input", "both", "none"), default="layer",
                   help="which maps to store: at layer resolution (CAMs: their layer; pixel methods: "
                        "area-averaged to 56 px), at input resolution, both, or none; default layer")
    p.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                   help="run on Ray (a local cluster, or the cluster at ADDRESS, e.g. ray://head:10001)")
    p.add_argument("--force", action="store_true", help="start over when RUN/ holds another configuration")
    p.add_argument("--limit", type=int, help="only the first N images (after --shuffle)")
    p.add_argument("--shuffle", action="store_true", help="shuffle the images with --seed before --limit")
    p.add_argument("--workers", type=int, default=None, help="DataLoader processes decoding images (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per model (default: torch's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: where the model loads)")
    p.add_argument("--no-random", action="store_true", help="do not add the random-map baseline rows")
    p.add_argument("--amp", action="store_true",
                   help="explain under mixed precision (bfloat16 on a CPU, float16 on CUDA): faster, maps differ "
                        "from float32 (docs/performance.md); the metrics stay float32")
    add_model_args(p)
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("summarize", help="a run's table with bootstrap intervals, paired tests and an "
                                                "HTML report (RUN/summary.html)")
    p.add_argument("run", help="the run directory")
    p.add_argument("--metric", action="append", help="only these metrics (default: all of the run's)")
    p.add_argument("--out", help="HTML file (default RUN/summary.html)")
    p.add_argument("--examples", type=int, default=3, help="best and worst images shown per method; default 3")
    p.add_argument("--no-html", action="store_true", help="print the table only")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.set_defaults(func=cmd_summarize)
