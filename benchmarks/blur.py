"""The one Gaussian blur (saliencykit.filters, banded matrix products) beside the separable grouped
convolution the package used before, same kernel and padding, one thread, side by side:
    python benchmarks/blur.py
prints ms per call on 8 images of 3x224x224 for the three settings the package uses (perturbation
substrates: sigma 2 replicate; Blur IG end of path: sigma 14; RISE substrate: sigma 5, radius 5)."""
import time

import torch
import torch.nn.functional as F

from saliencykit.filters import gaussian_blur
torch.set_num_threads(1)
def conv_blur(x, sigma, radius, replicate):
    t = torch.arange(-radius, radius + 1, dtype=x.dtype); k = torch.exp(-t**2/(2*sigma**2)); k = k/k.sum(); c = x.shape[1]
    if replicate:
        h = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1,1,1,-1).repeat(c,1,1,1), groups=c)
        return F.conv2d(F.pad(h, (0,0,radius,radius), mode="replicate"), k.view(1,1,-1,1).repeat(c,1,1,1), groups=c)
    h = F.conv2d(x, k.view(1,1,1,-1).repeat(c,1,1,1), padding=(0,radius), groups=c)
    return F.conv2d(h, k.view(1,1,-1,1).repeat(c,1,1,1), padding=(radius,0), groups=c)
x = torch.randn(8, 3, 224, 224)
for sigma, radius, rep in [(2.0, 6, True), (14.0, 56, False), (5.0, 5, False)]:
    pad = "replicate" if rep else "zeros"
    for name, f in [("band", lambda: gaussian_blur(x, sigma, radius=radius, padding=pad)), ("conv", lambda: conv_blur(x, sigma, radius, rep))]:
        f(); t0 = time.perf_counter()
        for _ in range(10): f()
        print(f"sigma {sigma} r {radius} {pad}: {name} {1000*(time.perf_counter()-t0)/10:.1f} ms / 8 images")
