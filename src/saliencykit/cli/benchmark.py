"""`saliencykit benchmark parts --arch cnn --method M ... --out DIR`: the FunnyBirds-style
leaderboard on the procedural parts dataset (see docs/benchmark.md).

Writes `leaderboard.csv`, `leaderboard.md`, `leaderboard.json` and `examples.png` (example maps
with the part outlines drawn on them). Besides the requested methods it always scores three
reference rows: `random` (uniform noise maps), `edge` (Sobel magnitude of the image, a model-free
baseline) and `oracle` (the true part importances from interventions: an upper reference).
"""
from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path

from ..errors import SaliencyError
from .common import parse_params

COLUMNS = ["rank", "method", "family", "completeness", "correctness", "contrastivity", "mean", "csdc", "pc", "dc",
           "d", "threshold", "ts_images", "seconds", "passes_per_image", "note"]
REFERENCE = {"random": "baseline", "edge": "baseline", "oracle": "reference"}


def run_benchmark(arch: str, methods, out: Path, n: int = 100, seed: int = 0, params: dict | None = None,
                  weights=None, batch_size: int | None = None, examples: int = 4, quiet: bool = False,
                  bench=None) -> list[dict]:
    import numpy as np
    import torch

    from ..benchmarks.parts import leaderboard as B
    from .. import methods as registry
    from ..benchmarks.parts.models import load_parts_model

    params = params or {}
    names = []
    for m in methods:
        if m in REFERENCE:
            continue
        names.append(registry.get(m).name)          # unknown names fail before any work
    unknown = set(params) - set(names)
    if unknown:
        raise SaliencyError(f"--param given for method(s) not benchmarked: {', '.join(sorted(unknown))}")
    if n < 2:
        raise SaliencyError(f"--n must be at least 2, got {n}")
    subject = load_parts_model(arch, weights) if bench is None else bench.subject
    t0 = time.perf_counter()
    if bench is None:
        if not quiet:
            print(f"rendering {n} test images and their interventions ...", file=sys.stderr)
        bench = B.PartsBench(subject, n=n, seed=777 + seed, batch_size=batch_size or 256)
    if not quiet:
        print(f"accuracy {bench.accuracy:.3f}, background independence {bench.background_independence():.3f} "
              f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    # the registered `random` method when there is one, else the same uniform noise built here
    rnd = (B.method_maps(bench, "random", seed) if "random" in registry.available() else B.random_maps(bench, seed))
    makers = [("random", "baseline", rnd), ("edge", "baseline", B.edge_maps(bench)),
              ("oracle", "reference", bench.oracle_maps)]
    for name in names:
        makers.append((name, registry.get(name).family, B.method_maps(bench, name, seed, params.get(name), batch_size)))
    rows, example_maps = [], {}
    fig_idx = np.arange(min(examples, len(bench.labels)))
    for name, family, fn in makers:
        counted = _Counting(fn, name in names)
        t = time.perf_counter()
        try:
            res = bench.score(counted)
            note = ""
        except Exception as err:       # one failing method must not lose the others' rows
            if not isinstance(err, (SaliencyError, RuntimeError, NotImplementedError, TypeError, ValueError)):
                raise
            res, note = {}, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        secs = time.perf_counter() - t
        row = {"method": name, "family": family, "seconds": round(secs, 2), "note": note,
               "passes_per_image": round(counted.passes / max(counted.images, 1), 1) if counted.passes else ""}
        for k in ("completeness", "correctness", "contrastivity", "mean", "csdc", "pc", "dc", "d", "threshold"):
            row[k] = round(float(res[k]), 4) if k in res else ""
        row["ts_images"] = res.get("ts_images", "")
        rows.append(row)
        if not note:
            example_maps[name] = counted.first if counted.first is not None else torch.as_tensor(
                fn(fig_idx, bench.labels[fig_idx]))
        if not quiet:
            print(f"  {name:24s} mean {row['mean']!s:8s} ({secs:.0f}s) {note}", file=sys.stderr)
    scored = sorted([r for r in rows if r["mean"] != ""], key=lambda r: -r["mean"])
    failed = [r for r in rows if r["mean"] == ""]
    for i, r in enumerate(scored):
        r["rank"] = i + 1
    for r in failed:
        r["rank"] = ""
    rows = scored + failed
    meta = {"arch": arch, "n": n, "seed": seed, "accuracy": bench.accuracy, "bi": bench.background_independence(),
            "intervention_passes": bench.counter.forward, "params": params}
    _write(out, rows, meta, bench, example_maps, fig_idx)
    return rows


class _Counting:
    """Wraps a maps function: keeps the first maps (for the figure) and the passes it reports."""

    def __init__(self, fn, counts: bool):
        self.fn, self.counts = fn, counts
        self.first = None
        self.passes = 0
        self.images = 0

    def __call__(self, idx, classes):
        maps = self.fn(idx, classes)
        if self.first is None:
            self.first = maps
        self.images += len(idx)
        self.passes = getattr(self.fn, "passes", 0)
        return maps


def _markdown(rows, meta) -> str:
    head = ["rank", "method", "family", "completeness", "correctness", "contrastivity", "mean", "note"]
    lines = [f"Parts benchmark, {meta['arch']} (accuracy {meta['accuracy']:.3f}, background independence "
             f"{meta['bi']:.3f}, {meta['n']} test images, seed {meta['seed']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k in head) + " |")
    return "\n".join(lines) + "\n"


def _write(out: Path, rows, meta, bench, example_maps, fig_idx):
    from ..files import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in COLUMNS})
    atomic_write(out / "leaderboard.csv", lambda p: Path(p).write_text(buf.getvalue()))
    atomic_write(out / "leaderboard.md", lambda p: Path(p).write_text(_markdown(rows, meta)))
    atomic_write(out / "leaderboard.json", lambda p: Path(p).write_text(json.dumps({"meta": meta, "rows": rows},
                                                                                  indent=2)))
    _figure(out / "examples.png", bench, example_maps, fig_idx, [r["method"] for r in rows])


def _figure(path: Path, bench, example_maps, fig_idx, order):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from skimage.segmentation import find_boundaries

    from ..files import atomic_write

    names = [m for m in order if m in example_maps]
    n_rows, n_cols = len(fig_idx), len(names) + 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols, 1.7 * n_rows), squeeze=False)
    for r, i in enumerate(fig_idx):
        pm = bench.part_maps[i].numpy()
        parts_only = np.where((pm >= 1) & (pm <= 8), pm, 0)
        edge = find_boundaries(parts_only, mode="inner") & (parts_only > 0)
        axes[r, 0].imshow(bench.images[i])
        axes[r, 0].set_title(f"class {int(bench.labels[i])}" if r == 0 else "", fontsize=7)
        for c, name in enumerate(names, start=1):
            m = np.asarray(example_maps[name][r], dtype=float)
            lim = np.abs(m).max() or 1.0
            axes[r, c].imshow(m, cmap="RdBu_r" if m.min() < 0 else "viridis", vmin=-lim if m.min() < 0 else 0,
                              vmax=lim)
            ov = np.zeros(pm.shape + (4,))
            ov[edge] = (1, 1, 1, 1)
            axes[r, c].imshow(ov)
            if r == 0:
                axes[r, c].set_title(name, fontsize=7)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def cmd_benchmark(args):
    from .. import methods as registry

    if args.suite != "parts":
        raise SaliencyError(f"unknown benchmark {args.suite!r}; available: parts")
    if args.method and args.all_methods:
        raise SaliencyError("give --method or --all-methods, not both")
    if args.all_methods:
        methods = [k for k, v in registry.available(include_experimental=False).items()
                   if not v["requires"] and "BCHW" in v["layouts"]]   # photos: no concept-only or series-only method
    else:
        methods = args.method or ["saliency", "gradxinput", "integrated_gradients", "gradcam", "rise"]
    for m in methods:
        registry.get(m)  # unknown names and an unwritable output fail before any work
    from ..files import check_writable_dir

    check_writable_dir(args.out, "the output")
    rows = run_benchmark(args.arch, methods, Path(args.out), n=args.n, seed=args.seed,
                         params=parse_params(args.param, "METHOD"), weights=args.weights, batch_size=args.batch_size,
                         quiet=args.quiet)
    print(_markdown(rows, json.loads((Path(args.out) / "leaderboard.json").read_text())["meta"]))
    print(f"wrote {args.out}/ (leaderboard.csv, leaderboard.md, leaderboard.json, examples.png)")


def register(subparsers):
    p = subparsers.add_parser("benchmark", help="leaderboard of methods on the procedural parts benchmark")
    p.add_argument("suite", choices=["parts"], help="the benchmark (parts)")
    p.add_argument("--arch", choices=["cnn", "vit"], default="cnn")
    p.add_argument("--method", action="append", help="method to score (repeat); default saliency, gradxinput, "
                                                     "integrated_gradients, gradcam, rise; random, edge and oracle "
                                                     "rows are always added")
    p.add_argument("--all-methods", action="store_true", help="score every registered non-experimental method")
    p.add_argument("--param", action="append", help="method parameter METHOD.NAME=VALUE, e.g. rise.n_masks=500")
    p.add_argument("--n", type=int, default=100, help="test images (default 100)")
    p.add_argument("--weights", help="model weights (default: the shipped ones)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_benchmark)
