"""The graph-from-the-layer lever on and off, interleaved in one process: our CPU time per call.

    python benchmarks/graph_from_layer.py gradcam/1 smooth_gradcam_pp/1 iia/1 --threads 1

Each argument is METHOD/BATCH on EfficientNet-Lite0 (the bundled photos). The lever
(`engine.graph_from_layer_ok`, used by `capturing_forward` and IIA's representation paths) is
switched off by replacing that check for the "full" calls; both modes run in rotating order after
a warm-up call each, six rounds; the median CPU seconds per call is printed. The maps are the same
in both modes (tests/core/test_graph_from_layer.py checks it to the bit).
"""
import argparse
import statistics
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", nargs="+", help="METHOD/BATCH, e.g. gradcam/8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import saliencykit as sk
    from saliencykit import engine
    from saliencykit.methods import paths

    s = sk.load_model("efficientnet_lite0")
    photos = s.preprocess([sk.data.image(n) for n in (sk.data.PHOTOS * 8)[:32]])
    on = engine.graph_from_layer_ok

    def mode(lever):
        check = on if lever else (lambda subject: False)
        engine.graph_from_layer_ok = paths.graph_from_layer_ok = check

    try:
        for row in args.rows:
            method, batch = row.split("/")
            x = photos[:int(batch)]
            times = {True: [], False: []}
            for lever in (True, False):
                mode(lever)
                sk.explain(s, x, method)
            for r in range(args.rounds):
                for lever in ((True, False) if r % 2 else (False, True)):
                    mode(lever)
                    c = time.process_time()
                    sk.explain(s, x, method)
                    times[lever].append(time.process_time() - c)
            print(f"{method}, batch {batch}: graph from the layer {statistics.median(times[True]):.4f} s, "
                  f"from the input {statistics.median(times[False]):.4f} s (CPU, median of {args.rounds})", flush=True)
    finally:
        mode(True)


if __name__ == "__main__":
    main()
