"""Grad-CAM on EfficientNet-Lite0 in three allocator states: why a fresh process and `make bench`
disagree on the gradient-CAM rows.

    python benchmarks/allocator_probe.py --threads 2 --batch 8            # a fresh process
    python benchmarks/allocator_probe.py --threads 2 --batch 8 --warm     # after 32-row passes, as in make bench
    MALLOC_MMAP_THRESHOLD_=134217728 MALLOC_TRIM_THRESHOLD_=268435456 \\
        python benchmarks/allocator_probe.py --threads 2 --batch 8        # glibc keeps freed memory

Rows, interleaved in rotating order after a warm-up call each, `gc.collect()` before each call
(the harness's `compare.measure`): `explain` with the graph starting at the layer (the default),
`explain` with the graph from the input (the lever off), Captum's LayerGradCam, torchcam's GradCAM.
Prints ms per image, wall and CPU.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--warm", action="store_true", help="first run make bench's pass-cost probe (1..32 rows)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import compare
    from methods import best_pass_costs

    import saliencykit as sk
    from saliencykit import engine

    s = sk.load_model("efficientnet_lite0")
    x = s.preprocess([sk.data.image(n) for n in (sk.data.PHOTOS * 8)[:args.batch]])
    y = s.forward(x).argmax(1)
    with s.explaining():
        name, module = s.find_layer("auto", x)
    if args.warm:
        best_pass_costs(s, x[:1])
    lever = engine.graph_from_layer_ok

    def ours(on):
        def run():
            engine.graph_from_layer_ok = lever if on else (lambda subject: False)
            try:
                return sk.explain(s, x, "gradcam", target=y.tolist()).maps
            finally:
                engine.graph_from_layer_ok = lever
        return run

    anchors = compare.anchors_for(s, x, y, name, module, "gradcam")
    calls = {"saliencykit (graph from the layer)": ours(True), "saliencykit (graph from the input)": ours(False),
             **{k: anchors[k] for k in ("captum", "torchcam") if k in anchors}}
    res = compare.measure(calls, args.repeats, x.shape[0])
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"threads {args.threads}, batch {args.batch}, warm {args.warm}, env {env or 'default'}")
    for k, v in res.items():
        print(f"  {k}: {v['ms']:.1f} ms/img (CPU {v['cpu_ms']:.1f})")


if __name__ == "__main__":
    main()
