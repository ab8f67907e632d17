"""Batch-norm folding for gradient passes (measured, not adopted): EfficientNet-Lite0 with every
convolution+batch-norm pair folded into one convolution, against eager; input gradients at batch
8, 4, 1, one thread: CPU ms per image and the largest difference of the gradients.

    python benchmarks/bnfold_probe.py
"""
import time, torch, os, copy
torch.set_num_threads(1)
import saliencykit as sk
from saliencykit import data
from torch import nn
s = sk.load_model("efficientnet_lite0")
m = s.model.eval()
x1 = torch.cat([s.preprocess(data.image(n)) for n in list(data.PHOTOS)])
x = torch.cat([x1, x1[:3]])
def fold(model, probe):
    order, outs = [], {}
    def hook(mod, inp, out):
        order.append((mod, inp[0], out))
    hs = [mm.register_forward_hook(hook) for mm in model.modules() if isinstance(mm, (nn.Conv2d, nn.BatchNorm2d))]
    with torch.no_grad(): model(probe)
    for h in hs: h.remove()
    pairs = []
    for (a, ai, ao), (b, bi, bo) in zip(order, order[1:]):
        if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and bi is ao:
            pairs.append((a, b))
    new = copy.deepcopy(model)
    names = {mm: n for n, mm in model.named_modules()}
    for conv, bn in pairs:
        c = new.get_submodule(names[conv]); 
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        with torch.no_grad():
            c.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            b0 = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            newb = (b0 - bn.running_mean) * scale + bn.bias
            if c.bias is None: c.bias = nn.Parameter(newb)
            else: c.bias.copy_(newb)
        parent, _, leaf = names[bn].rpartition(".")
        setattr(new.get_submodule(parent) if parent else new, leaf, nn.Identity())
    return new, len(pairs)
f, n = fold(m, x[:1])
print("folded pairs", n)
def grad_pass(model, inp, cls):
    inp = inp.detach().requires_grad_(True)
    out = model(inp)
    return torch.autograd.grad(out.gather(1, cls[:, None]).sum(), inp)[0]
cls = m(x).argmax(1)
ref = grad_pass(m, x, cls); g = grad_pass(f, x, cls)
print("max rel diff", float((g-ref).abs().max()/ref.abs().max()), "allclose(1e-4, 1e-5*max)", torch.allclose(g, ref, rtol=1e-4, atol=1e-5*float(ref.abs().max())))
def t(fn, n=3):
    ts=[]
    for _ in range(n):
        c=time.process_time(); fn(); ts.append(time.process_time()-c)
    return sorted(ts)[n//2]
for bs in (8, 4, 1):
    xe, ce = x[:bs], cls[:bs]
    res = []
    for r in range(3):
        res.append((t(lambda: grad_pass(m, xe, ce)), t(lambda: grad_pass(f, xe, ce))))
    e = sorted(a for a, b in res)[1]; ff = sorted(b for a, b in res)[1]
    print(f"batch {bs}: eager {e*1000/bs:.1f} ms/img, folded {ff*1000/bs:.1f} ms/img, gain {e/ff:.2f}x", flush=True)
