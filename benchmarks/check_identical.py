"""Before/after check for speed levers: every map a lever touches must stay the same.

    python benchmarks/check_identical.py --save /tmp/maps-before.pt    # on the code before a change
    python benchmarks/check_identical.py --check /tmp/maps-before.pt   # on the code after it

Runs the gradient methods (single- and multi-pass), the layer CAMs, Score-CAM and the sensitivity
and ROAD metrics on EfficientNet-Lite0 (ReLU6, depthwise convolutions) and a random-weight
torchvision resnet18 (ReLU, batch norm), with batches that split into several chunks, and
compares every map (and metric value) with the saved ones: allclose at float32 tolerance
(rtol 1e-4, atol 1e-5 x the map's largest magnitude; a change of kernel or memory layout
reorders float32 sums, nothing more may change). Step and sample counts are smaller than the
defaults so the check runs in a few minutes on two cores; the code paths are the defaults'.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import saliencykit as sk
from saliencykit.metrics import evaluate

CASES = {  # method -> (params, batch)
    "saliency": ({}, 8), "gradxinput": ({}, 8), "guided_backprop": ({}, 8), "deconvnet": ({}, 3),
    "gradcam": ({}, 8), "gradcam_pp": ({}, 8), "xgradcam": ({}, 8), "layercam": ({}, 8), "hirescam": ({}, 8),
    "integrated_gradients": ({"steps": 12}, 2), "smoothgrad": ({"samples": 8}, 2),
    "smoothgrad_sq": ({"samples": 8}, 2), "vargrad": ({"samples": 8}, 2),
    "blur_ig": ({"steps": 8}, 2), "guided_ig": ({"steps": 6}, 2),
    "smooth_gradcam_pp": ({"samples": 6}, 2), "iia": ({"steps": 3}, 1),
    "xrai": ({"steps": 6}, 1), "scorecam": ({}, 1),
}
SHARED = ["gradcam", "gradcam_pp", "saliency", "gradxinput"]  # several clean-pass methods in one call


def subjects(threads: int):
    torch.set_num_threads(threads)
    out = {"efficientnet_lite0": sk.load_model("efficientnet_lite0")}
    torch.manual_seed(0)
    out["resnet18"] = sk.load_model("torchvision:resnet18:random")
    return out


def collect(models=None, methods=None) -> dict:
    res = {}
    photos = sk.data.PHOTOS * 4
    for mname, subject in subjects(2).items():
        if models and mname not in models:
            continue
        for method, (params, b) in CASES.items():
            if methods and method not in methods:
                continue
            if mname == "resnet18" and method in ("scorecam", "xrai", "iia"):
                continue  # the Lite0 rows cover their code; resnet18 adds the ReLU network
            x = subject.preprocess([sk.data.image(n) for n in photos[:b]])
            t = time.perf_counter()
            e = sk.explain(subject, x, method, params={method: params} if params else None)
            res[f"{mname}/{method}"] = e.maps.detach().float().clone()
            print(f"{mname}/{method}: {time.perf_counter() - t:.2f} s, passes {e.passes}", flush=True)
        if methods:
            continue
        x = subject.preprocess([sk.data.image(n) for n in photos[:8]])
        many = sk.explain(subject, x, SHARED)
        for k, e in many.items():
            res[f"{mname}/shared/{k}"] = e.maps.detach().float().clone()
        if mname == "efficientnet_lite0":
            x = subject.preprocess([sk.data.image(n) for n in photos[:2]])
            exps = sk.explain(subject, x, ["saliency", "gradcam"])
            r = evaluate(subject, x, exps, metrics=["max_sensitivity", "avg_sensitivity", "road_morf"],
                         params={"max_sensitivity": {"n_samples": 6}, "avg_sensitivity": {"n_samples": 6},
                                 "road_morf": {"levels": [0.2, 0.5, 0.8]}}, random_baseline=False)
            res[f"{mname}/metrics"] = torch.tensor(_metric_values(r), dtype=torch.float64)
            print(f"{mname}/metrics: {res[f'{mname}/metrics'].tolist()}", flush=True)
    return res


def _metric_values(result) -> list:
    """Every per-example value of an evaluate() result, in a fixed order."""
    vals = []
    for metric in sorted(result.results):
        for method in sorted(result.results[metric]):
            vals.extend(float(v) for v in result.results[metric][method].scores)
    return vals


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save")
    ap.add_argument("--check")
    ap.add_argument("--models", default=None, help="comma list (default: both)")
    ap.add_argument("--methods", default=None, help="comma list (default: all of CASES)")
    args = ap.parse_args(argv)
    res = collect(args.models.split(",") if args.models else None, args.methods.split(",") if args.methods else None)
    if args.save:
        torch.save(res, args.save)
        print(f"saved {len(res)} maps to {args.save}")
    if args.check:
        ref = torch.load(args.check)
        bad = []
        for k, v in res.items():
            if k not in ref:
                print(f"  {k}: no reference")
                continue
            r = ref[k]
            scale = float(r.abs().max()) or 1.0
            ok = r.shape == v.shape and torch.allclose(v, r, rtol=1e-4, atol=1e-5 * scale)
            err = float((v - r).abs().max()) / scale if r.shape == v.shape else float("inf")
            print(f"  {k}: {'ok' if ok else 'DIFFERENT'} (max |diff| / max |ref| = {err:.2e})")
            if not ok:
                bad.append(k)
        print("all identical" if not bad else f"DIFFERENT: {bad}")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
