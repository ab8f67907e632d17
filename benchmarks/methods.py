"""Speed and memory of every registered method, beside the cost of the passes it must make.

For each model (the bundled EfficientNet-Lite0 and torchvision resnet50 with random weights, both
at 224x224, 2 threads) this prints: ms per image, peak extra RSS, the passes the method reports, the
measured cost of one forward and of one forward+backward pass at the best batch size, the
pass-count floor (passes x that cost) and our ratio to it. A ratio near 1 means the method spends
its time in the model, not in overhead.

    python benchmarks/methods.py [--models efficientnet_lite0,resnet50] [--methods a,b] [--repeats 3]
                                 [--out benchmarks/methods.md]
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import sys
import time

import torch

import saliencykit as sk

# expensive methods run with their defaults; the costs printed are what a user gets
SKIP_BY_DEFAULT = {"random"}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


AT_BATCH: dict = {}  # model name -> {batch: (forward s/img, forward+backward s/img)} of the last call


def best_pass_costs(subject, x, batches=(1, 4, 6, 8, 16, 32)) -> tuple[float, float]:
    """Seconds per image of one forward and of one forward+backward, at the best batch size (the
    cost at every batch size tried is kept in `AT_BATCH[subject.name]`)."""
    fwd, fb = [], []
    model = subject.model
    with subject.explaining():
        for b in batches:
            xb = x.expand(b, -1, -1, -1).contiguous()
            with torch.inference_mode():
                model(xb)
                t = time.perf_counter()
                model(xb)
                fwd.append((time.perf_counter() - t) / b)
            xg = xb.clone().requires_grad_(True)
            out = model(xg)
            torch.autograd.grad(out[:, 0].sum(), xg)
            xg = xb.clone().requires_grad_(True)
            t = time.perf_counter()
            out = model(xg)
            torch.autograd.grad(out[:, 0].sum(), xg)
            fb.append((time.perf_counter() - t) / b)
    AT_BATCH[subject.name] = dict(zip(batches, zip(fwd, fb)))
    return min(fwd), min(fb)


def bench(subject, x, method: str, repeats: int) -> dict:
    sk.explain(subject, x, method=method)  # warm-up
    times = []
    gc.collect()
    base = rss_mb()
    peak = base
    exp = None
    for _ in range(repeats):
        t = time.perf_counter()
        exp = sk.explain(subject, x, method=method)
        times.append(time.perf_counter() - t)
        peak = max(peak, rss_mb())
    return {"ms": 1000 * statistics.median(times) / x.shape[0], "mem_mb": peak - base, "passes": exp.passes}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="efficientnet_lite0,resnet50")
    ap.add_argument("--methods", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",") if args.methods else [
        m for m, info in sk.methods.available().items() if m not in SKIP_BY_DEFAULT and not info["experimental"]]
    lines = [f"# Method speed ({platform.processor() or platform.machine()}, {args.threads} threads, "
             f"torch {torch.__version__}, median of {args.repeats})", "",
             "Command: `python benchmarks/methods.py " + " ".join(argv or sys.argv[1:]) + "`", ""]
    for model_name in args.models.split(","):
        subject = sk.load_model("efficientnet_lite0" if model_name == "efficientnet_lite0"
                                else f"torchvision:{model_name}:random")
        x = subject.preprocess(sk.data.image("chelsea"))
        f1, fb1 = best_pass_costs(subject, x)
        lines += [f"## {model_name}: one forward {1000 * f1:.1f} ms, one forward+backward {1000 * fb1:.1f} ms "
                  "(per image, best batch)", "",
                  "| method | ms/image | passes F/B | floor ms | ratio to floor | peak extra MB |",
                  "|---|---:|---:|---:|---:|---:|"]
        for m in methods:
            try:
                r = bench(subject, x, m, args.repeats)
            except Exception as err:  # report, keep going
                lines.append(f"| {m} | error: {err} | | | | |")
                continue
            f, b = r["passes"]["forward"], r["passes"]["backward"]
            floor = 1000 * (b * fb1 + max(f - b, 0) * f1)
            lines.append(f"| {m} | {r['ms']:.1f} | {f:g}/{b:g} | {floor:.1f} | {r['ms'] / floor:.2f} | "
                         f"{r['mem_mb']:.0f} |")
            print(lines[-1], flush=True)
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
