"""Channels-last input for the part of a Grad-CAM pass before its layer (measured, not in the
library): the layer's activations, its gradient and the Grad-CAM map against the contiguous pass,
and the time of both, 10 interleaved rounds, after make bench's pass-cost probe (2 threads).

    python benchmarks/prelayer_channels_last.py efficientnet_lite0
    python benchmarks/prelayer_channels_last.py resnet50          # torchvision, random weights
"""
import statistics, sys, time, gc, torch
torch.set_num_threads(2)
import saliencykit as sk
sys.path.insert(0, "benchmarks")
from methods import best_pass_costs
name = sys.argv[1]
torch.manual_seed(0)
s = sk.load_model(name if name == "efficientnet_lite0" else f"torchvision:{name}:random")
m = s.model.eval()
x8 = s.preprocess([sk.data.image(n) for n in (sk.data.PHOTOS * 2)[:8]])
best_pass_costs(s, x8[:1])
lname, layer = s.find_layer("auto", x8)
def run(x, cl):
    st = {"n": 0}
    def hook(mod, i, o):
        st["n"] += 1
        if st["n"] < ncalls: return None
        torch.set_grad_enabled(True)
        leaf = o.detach().contiguous().requires_grad_(True)
        st["a"] = leaf
        return leaf.clone()
    h = layer.register_forward_hook(hook)
    try:
        with s.explaining(), torch.no_grad():
            xi = x.contiguous(memory_format=torch.channels_last) if cl else x.clone()
            lg = m(xi)
            with torch.enable_grad():
                g, = torch.autograd.grad(lg.max(1).values.sum(), st["a"])
    finally:
        h.remove()
    return st["a"].detach(), g
cnt = []
hh = layer.register_forward_hook(lambda *a: cnt.append(1))
with torch.no_grad(): m(x8[:1])
hh.remove(); ncalls = len(cnt)
for b in (1, 8):
    x = x8[:b]
    a0, g0 = run(x, False); a1, g1 = run(x, True)
    print(name, b, "act diff", ((a0 - a1).abs().max() / a0.abs().max()).item(), "grad diff", ((g0 - g1).abs().max() / g0.abs().max()).item())
    cam = lambda a, g: torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1))
    c0, c1 = cam(a0, g0), cam(a1, g1)
    print("  cam diff", ((c0 - c1).abs().max() / c0.abs().max()).item())
    ts = {False: [], True: []}
    for r in range(10):
        for cl in ((False, True) if r % 2 else (True, False)):
            gc.collect(); t = time.perf_counter(); run(x, cl); ts[cl].append(time.perf_counter() - t)
    print("  ms/img contiguous", round(statistics.median(ts[False]) * 1000 / b, 1), "channels_last", round(statistics.median(ts[True]) * 1000 / b, 1))
