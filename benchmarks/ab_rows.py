"""Our CPU time per row (EfficientNet-Lite0, one thread), for an A/B of two source trees run in
alternating processes (issue 17's "no speed regression beyond 5 %" check):

    git worktree add /tmp/old 8b0e297^
    for r in 1 2 3; do for t in /tmp/old $PWD; do echo -n "$t "; PYTHONPATH=$t/src python benchmarks/ab_rows.py | tail -1; done; done > ab.log

Each process warms each row up once, then prints the median CPU seconds of its repeats as JSON;
compare the medians over the processes of each tree (RISE: `--rise`, 1,000 masks at batch 1).
"""

import json, statistics, sys, time, torch
torch.set_num_threads(1)
import saliencykit as sk
s = sk.load_model("efficientnet_lite0")
photos = list(sk.data.PHOTOS)
x8 = s.preprocess([sk.data.image(n) for n in (photos * 2)[:8]])
rows = [("saliency", 1, {}), ("saliency", 8, {}), ("gradcam", 1, {}), ("gradcam", 8, {}),
        ("integrated_gradients", 1, {"steps": 50}), ("smoothgrad", 1, {"samples": 25}),
        ("occlusion", 1, {"patch": 15, "stride": 8, "output": "logit"})]
if "--rise" in sys.argv:
    rows = [("rise", 1, {"n_masks": 1000})]
out = {}
for m, b, kw in rows:
    x = x8[:b]
    sk.explain(s, x, m, **kw)
    ts = []
    for _ in range(3 if m not in ("integrated_gradients", "smoothgrad", "occlusion", "rise") else 2):
        c = time.process_time(); sk.explain(s, x, m, **kw); ts.append(time.process_time() - c)
    out[f"{m}/b{b}"] = statistics.median(ts)
print(json.dumps(out))
