"""Dataset-scale throughput: `saliencykit run` against the plain loop a user writes with Captum
(Integrated Gradients), pytorch-grad-cam (Grad-CAM), a hand-written RISE and hand-written
deletion/insertion (Quantus has no insertion, and its pixel flipping counts channel elements, so
its step counts differ), doing the same work on the same images, in one run, side by side:

    python benchmarks/dataset_run.py [--parts 500] [--photos 200] [--rise-masks 1000] [--threads 2] \
        [--ray-images 200] [--resume-images 200]

Rows: images/s of each, their ratio, and the pipeline overhead of the run (wall time minus the
time spent explaining and scoring, which the run's timing table records), on the parts dataset
(64 px, the shipped parts CNN) and on a folder of real photos (JPEGs cut from the bundled photos,
224 px, EfficientNet-Lite0). The loop keeps its scores in memory and writes nothing; the run
writes Parquet shards and float16 maps.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saliencykit.datasets import Source


def make_photo_folder(root: Path, n: int, seed: int = 0) -> Path:
    """`n` JPEGs: random crops (50-100 % of each side), flips and sizes of the bundled photos."""
    from saliencykit import data

    rng = np.random.default_rng(seed)
    photos = [data.image(name) for name in data.names()]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(0)
        crop.thumbnail((400, 400))
        crop.save(root / f"photo_{i:04d}.jpg", quality=90)
    return root


# ------------------------------------------------------------------------------ the plain loop
def rise_masks(n, size, cell=7, p=0.5, seed=0):
    """RISE masks as in the paper: random cell grids, bilinearly upsampled and randomly shifted."""
    rng = np.random.default_rng(seed)
    H, W = size
    ch, cw = int(np.ceil(H / cell)), int(np.ceil(W / cell))
    grid = (rng.random((n, 1, cell, cell)) < p).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(grid), size=((cell + 1) * ch, (cell + 1) * cw),
                                         mode="bilinear", align_corners=False)
    out = torch.empty(n, 1, H, W)
    for i in range(n):
        dx, dy = int(rng.integers(0, cw)), int(rng.integers(0, ch))
        out[i] = up[i, :, dy:dy + H, dx:dx + W]
    return out


@torch.no_grad()
def loop_rise(model, x, target, masks, batch=32):
    sal = torch.zeros(x.shape[-2:])
    for s in range(0, len(masks), batch):
        m = masks[s:s + batch]
        p = model(x * m).softmax(-1)[:, target]
        sal += (p.view(-1, 1, 1) * m[:, 0]).sum(0)
    return sal / len(masks) / 0.5


@torch.no_grad()
def loop_causal(model, x, target, sal, step, deletion, substrate, batch=32):
    """Petsiuk et al.'s deletion/insertion: the target probability as pixels are removed/inserted."""
    H, W = x.shape[-2:]
    n = (H * W + step - 1) // step
    order = torch.argsort(sal.flatten(), descending=True)
    start, finish = (x, substrate) if deletion else (substrate, x)
    scores = []
    imgs = []
    cur = start.clone().view(1, 3, -1)
    for i in range(n + 1):
        imgs.append(cur.clone().view(1, 3, H, W))
        if i < n:
            idx = order[i * step:(i + 1) * step]
            cur[0, :, idx] = finish.view(1, 3, -1)[0, :, idx]
        if len(imgs) == batch or i == n:
            scores.append(model(torch.cat(imgs)).softmax(-1)[:, target])
            imgs = []
    y = torch.cat(scores).double()
    return float((y.sum() - y[0] / 2 - y[-1] / 2) / (len(y) - 1))


def plain_loop(subject, paths_or_images, layer_name, ig_steps, rise_n, step):
    import pytorch_grad_cam as pg
    from captum.attr import IntegratedGradients
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from saliencykit.metrics.base import rise_blur

    model = subject.model
    layer = dict(model.named_modules())[layer_name]
    ig = IntegratedGradients(model)
    cam = pg.GradCAM(model=model, target_layers=[layer])
    masks = None
    out = []
    for im in paths_or_images:
        x = subject.preprocess(im)                              # decode + resize + normalise
        with torch.no_grad():
            target = int(model(x).argmax(-1))
        if masks is None:
            masks = rise_masks(rise_n, x.shape[-2:])
        maps = {
            "gradcam": torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]),
            "integrated_gradients": ig.attribute(x, target=target, n_steps=ig_steps,
                                                 internal_batch_size=32)[0].sum(0).detach(),
            "rise": loop_rise(model, x, target, masks),
        }
        zero, blur = torch.zeros_like(x), rise_blur(x)
        for name, m in maps.items():
            out.append((name, loop_causal(model, x, target, m, step, True, zero),
                        loop_causal(model, x, target, m, step, False, blur)))
    return out


# ------------------------------------------------------------------------------ the comparison
class Subset(Source):
    """The items `positions` of a source (a block of an interleaved measurement)."""

    def __init__(self, source, positions):
        self.source, self.positions = source, list(positions)
        self.kind, self.has_labels, self.has_masks = source.kind, source.has_labels, source.has_masks

    def items(self):
        from dataclasses import replace

        items = self.source.items()
        return [replace(items[p], index=k) for k, p in enumerate(self.positions)]

    def decode(self, item):
        return self.source.decode(self.source.items()[self.positions[item.index]])

    def content_hash(self, item):
        return self.source.content_hash(self.source.items()[self.positions[item.index]])

    def describe(self):
        return {**self.source.describe(), "positions": [self.positions[0], self.positions[-1]]}


def compare(label, source, images_for_loop, model, n_images, args, step):
    """Ours and the loop interleaved in blocks of `--block` images (alternating which goes first),
    so a change of load on the machine hits both alike."""
    import saliencykit as sk
    from saliencykit.datasets import open_source
    from saliencykit.datasets.runner import load_subject

    subject = load_subject(model)
    probe = subject.preprocess(images_for_loop[0])
    layer = subject.find_layer(subject.default_layer, probe)[0]   # the layer the run's Grad-CAM uses
    params = {"integrated_gradients": {"steps": args.ig_steps}, "rise": {"n_masks": args.rise_masks},
              "deletion": {"step": step}, "insertion": {"step": step}}
    src = open_source(source)
    t_run = t_loop = compute = 0.0
    for k, start in enumerate(range(0, n_images, args.block)):
        positions = range(start, min(n_images, start + args.block))
        block = Subset(src, positions)

        def ours():
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                run = sk.run(block, model=model, method=["gradcam", "integrated_gradients", "rise"],
                             metric=["deletion", "insertion"], params=params, out=Path(tmp) / "run",
                             progress=False, random_baseline=False, workers=args.workers)
                return time.perf_counter() - t0, float(run.rows["compute_seconds"].sum())

        def loop():
            t0 = time.perf_counter()
            plain_loop(subject, [images_for_loop[p] for p in positions], layer, args.ig_steps, args.rise_masks, step)
            return time.perf_counter() - t0

        if k % 2 == 0:
            (a, c), b = ours(), loop()
        else:
            b = loop()
            a, c = ours()
        t_run, compute, t_loop = t_run + a, compute + c, t_loop + b
    rows = [(label, "saliencykit run", n_images / t_run, f"{t_run:.1f} s; overhead {100 * (t_run - compute) / t_run:.1f} %"),
            (label, "plain loop (Captum + pytorch-grad-cam + hand-written RISE, deletion, insertion)",
             n_images / t_loop, f"{t_loop:.1f} s"),
            (label, "ratio run / loop", t_loop / t_run, f"interleaved in blocks of {args.block}")]
    for r in rows:
        print_row(r)
    return rows


def print_row(r):
    label, who, v, note = r
    print(f"| {label} | {who} | {v:.3f} | {note} |", flush=True)


def ray_section(n: int, args) -> list:
    """The same run as 1 process x 2 threads and as 2 Ray actors x 1 thread (a local cluster)."""
    import saliencykit as sk

    kw = dict(model="parts_cnn", method=["gradcam", "integrated_gradients"], metric=["deletion"],
              params={"integrated_gradients": {"steps": args.ig_steps}, "deletion": {"step": 16}},
              progress=False, random_baseline=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sk.run(f"parts:{n}", out=Path(tmp) / "local", threads=2, **kw)
        t_local = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = sk.run(f"parts:{n}", out=Path(tmp) / "ray", ray=True, threads=1, **kw)
        t_ray = time.perf_counter() - t0
    label = f"{n} parts images, gradcam + IG {args.ig_steps} + deletion"
    peaks = ", ".join(f"{v:.0f}" for v in r.stats.get("actors", {}).values())
    rows.append((label, "local: 1 process x 2 threads", n / t_local, f"{t_local:.1f} s"))
    rows.append((label, "Ray: 2 actors x 1 thread (local cluster)", n / t_ray,
                 f"{t_ray:.1f} s, of which Ray start {r.stats.get('ray_start_seconds', 0):.1f} s; "
                 f"peak RSS per actor {peaks} MB"))
    return rows


def resume_section(n: int, args) -> list:
    """Kill the CLI with SIGKILL at 30, 60 and 90 % of its shards, then resume: seconds and rows redone."""
    import os
    import signal
    import subprocess
    import sys

    import saliencykit as sk

    rows = []
    shard = 16
    total = -(-n // shard)
    for frac in (0.3, 0.6, 0.9):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            cmd = [sys.executable, "-m", "saliencykit", "run", f"parts:{n}", "--model", "parts_cnn", "--method",
                   "gradcam", "--method", "integrated_gradients", "--metric", "deletion", "--param",
                   f"integrated_gradients.steps={args.ig_steps}", "--param", "deletion.step=16", "--shard-size",
                   str(shard), "--out", str(out), "--quiet", "--no-random"]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            want = max(1, int(frac * total))
            while proc.poll() is None and len(list((out / "rows").glob("shard-*.parquet"))) < want:
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            done = len(list((out / "rows").glob("shard-*.parquet")))
            t0 = time.perf_counter()
            r = sk.run(f"parts:{n}", out=out, model="parts_cnn", method=["gradcam", "integrated_gradients"],
                       metric=["deletion"], params={"integrated_gradients": {"steps": args.ig_steps},
                                                    "deletion": {"step": 16}}, shard_size=shard, progress=False,
                       random_baseline=False)
            t_resume = time.perf_counter() - t0
            redone = (total - done) * shard * 2
            rows.append((f"resume after SIGKILL at {int(frac * 100)} % ({done}/{total} shards on disk)",
                         "saliencykit run", n / t_resume,
                         f"{t_resume:.1f} s to finish; rows computed again: at most one shard "
                         f"({shard * 2} rows) of the {redone} left; complete: {r.complete}"))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", type=int, default=500, help="parts-dataset images (0 to skip)")
    ap.add_argument("--photos", type=int, default=200, help="real photos (0 to skip)")
    ap.add_argument("--ig-steps", type=int, default=32)
    ap.add_argument("--rise-masks", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block", type=int, default=25, help="images per interleaved block")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers of the run (default: its own)")
    ap.add_argument("--ray-images", type=int, default=0, help="parts images for the Ray comparison (0 to skip)")
    ap.add_argument("--resume-images", type=int, default=0, help="parts images for the resume timings (0 to skip)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; methods gradcam, integrated_gradients ({args.ig_steps} steps), rise "
          f"({args.rise_masks} masks); metrics deletion + insertion\n")
    print("| workload | who | images/s | notes |\n|---|---|---|---|", flush=True)
    rows = []
    if args.parts:
        from saliencykit.datasets import open_source

        src = open_source(f"parts:{args.parts}")
        images = [src.decode(it).image for it in src.items()]
        rows += compare(f"{args.parts} parts images (64 px, parts CNN)", f"parts:{args.parts}", images, "parts_cnn",
                        args.parts, args, step=16)
    if args.photos:
        with tempfile.TemporaryDirectory() as tmp:
            folder = make_photo_folder(Path(tmp) / "photos", args.photos)
            paths = sorted(str(p) for p in folder.iterdir())
            rows += compare(f"{args.photos} photos (224 px, EfficientNet-Lite0)", str(folder), paths,
                            "efficientnet_lite0", args.photos, args, step=224)
    if args.ray_images:
        for r in ray_section(args.ray_images, args):
            print_row(r)
    if args.resume_images:
        for r in resume_section(args.resume_images, args):
            print_row(r)


if __name__ == "__main__":
    main()
