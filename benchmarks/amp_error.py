"""Mixed precision (`explain(..., amp=True)`): its error against float32, and its time.

    python benchmarks/amp_error.py [--device cpu] [--threads 1] [--rounds 3]

For saliency, Integrated Gradients (50 steps) and Grad-CAM on EfficientNet-Lite0 over the
bundled photos (one batch), per map: the relative L2 error ||amp - fp32|| / ||fp32||, the
largest absolute difference relative to the map's largest magnitude, and the Pearson r of the
two maps; then the process CPU time (and wall time) of the float32 and the amp call, in
interleaved rounds (median). On a CPU amp computes in bfloat16, on CUDA in float16.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import saliencykit as sk
from saliencykit import data

METHODS = {"saliency": {}, "integrated_gradients": {"steps": 50}, "gradcam": {}}


def errors(amp: torch.Tensor, ref: torch.Tensor) -> dict:
    a, r = amp.flatten(1).double(), ref.flatten(1).double()
    rel = ((a - r).norm(dim=1) / r.norm(dim=1))
    mx = ((a - r).abs().amax(dim=1) / r.abs().amax(dim=1))
    ac, rc = a - a.mean(1, keepdim=True), r - r.mean(1, keepdim=True)
    corr = (ac * rc).sum(1) / (ac.norm(dim=1) * rc.norm(dim=1))
    return {"rel_l2": rel.tolist(), "max_rel": mx.tolist(), "r": corr.tolist()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = sk.load_model("efficientnet_lite0", device=args.device)
    x = torch.cat([s.preprocess(data.image(n)) for n in data.PHOTOS]).to(args.device)
    print(f"EfficientNet-Lite0, {x.shape[0]} photos in one batch, device {args.device}, {args.threads} thread(s), "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("| method | amp dtype | rel. L2 error (median, max) | largest abs. difference / map max (max) | "
          "Pearson r (min) | fp32 CPU s | amp CPU s | fp32 wall s | amp wall s |")
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    for m, kw in METHODS.items():
        ref = sk.explain(s, x, m, **kw)   # warm-up and the reference
        amp = sk.explain(s, x, m, amp=True, **kw)
        e = errors(amp.maps, ref.maps)
        times = {False: [], True: []}
        for i in range(args.rounds):
            for flag in ((False, True) if i % 2 == 0 else (True, False)):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                c0, w0 = time.process_time(), time.perf_counter()
                sk.explain(s, x, m, amp=flag, **kw)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[flag].append((time.process_time() - c0, time.perf_counter() - w0))
        med = {f: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for f, v in times.items()}
        print(f"| {m} | {amp.extras['amp']} | {statistics.median(e['rel_l2']):.3f}, {max(e['rel_l2']):.3f} | "
              f"{max(e['max_rel']):.3f} | {min(e['r']):.4f} | {med[False][0]:.2f} | {med[True][0]:.2f} | "
              f"{med[False][1]:.2f} | {med[True][1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
