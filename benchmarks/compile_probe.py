"""torch.compile on this CPU: a compiled gradient pass (forward + gradient w.r.t. the input) of
EfficientNet-Lite0 at batch 8 (and a new batch size, 4) against eager, one thread: compile
seconds, CPU ms per image (interleaved rounds) and the largest difference of the input gradients.

    python benchmarks/compile_probe.py
"""
import time, torch, os, sys
torch.set_num_threads(1)
import saliencykit as sk
from saliencykit import data
s = sk.load_model("efficientnet_lite0")
m = s.model.eval()
x1 = torch.cat([s.preprocess(data.image(n)) for n in list(data.PHOTOS)])
x = torch.cat([x1, x1[:3]])  # batch 8
print("load", os.getloadavg(), flush=True)
def grad_pass(model, inp, cls):
    inp = inp.detach().requires_grad_(True)
    out = model(inp)
    s_ = out.gather(1, cls[:, None]).sum()
    return torch.autograd.grad(s_, inp)[0]
cls = m(x).argmax(1)
def timeit(f, n=5):
    ts = []
    for _ in range(n):
        c = time.process_time(); w = time.perf_counter(); f(); ts.append((time.process_time()-c, time.perf_counter()-w))
    ts.sort()
    return ts[len(ts)//2]
ref = grad_pass(m, x, cls)
mc = torch.compile(m)
c0, w0 = time.process_time(), time.perf_counter()
g = grad_pass(mc, x, cls)
print(f"compile+first: cpu {time.process_time()-c0:.1f}s wall {time.perf_counter()-w0:.1f}s", flush=True)
print("max rel diff", float((g - ref).abs().max() / ref.abs().max()), flush=True)
for _ in range(2): grad_pass(mc, x, cls)
for r in range(3):
    te = timeit(lambda: grad_pass(m, x, cls), 3); tc = timeit(lambda: grad_pass(mc, x, cls), 3)
    print(f"round {r}: eager cpu {te[0]*1000/8:.1f} ms/img wall {te[1]*1000/8:.1f}; compiled cpu {tc[0]*1000/8:.1f} wall {tc[1]*1000/8:.1f}", flush=True)
# batch of another size (IG chunk, e.g. 4): recompile?
x4 = x[:4]; c4 = cls[:4]
c0, w0 = time.process_time(), time.perf_counter()
g4 = grad_pass(mc, x4, c4)
print(f"new batch 4 first call: cpu {time.process_time()-c0:.1f}s wall {time.perf_counter()-w0:.1f}s; max rel diff", float((g4 - ref[:4]).abs().max()/ref[:4].abs().max()), flush=True)
te = timeit(lambda: grad_pass(m, x4, c4), 3); tc = timeit(lambda: grad_pass(mc, x4, c4), 3)
print(f"batch4: eager cpu {te[0]*1000/4:.1f} ms/img; compiled cpu {tc[0]*1000/4:.1f}", flush=True)
print("load", os.getloadavg())
