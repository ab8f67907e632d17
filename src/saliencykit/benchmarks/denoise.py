"""Training the shipped denoiser (`saliencykit.models.small.Denoiser`) on the bundled photos.

Seeded 32x32 RGB crops (values in [0, 1]) of the bundled photos except `coffee`, with Gaussian
noise of sigma 0.1 added afresh to every minibatch; the loss is the mean squared error to the clean
crop. `evaluate` reports the PSNR of the noisy and the denoised crops of `coffee`, a photo never
seen in training. The shipped `saliencykit/models/weights/denoiser.pt` was made by

    saliencykit train-small denoiser --out denoiser.pt --seed 0
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import training
from .. import data
from ..models import small

TRAIN_PHOTOS = ("chelsea", "astronaut", "rocket", "motorcycle_left", "horse", "camera", "retina")
HELDOUT_PHOTO = "coffee"
SIGMA = 0.1
PATCH = 32
#: (n_train crops, epochs, lr, batch)
RECIPE = (6000, 6, 3e-3, 64)


def crops(photos, n: int, seed: int, size: int = PATCH) -> torch.Tensor:
    """`n` seeded `[3,size,size]` crops in [0, 1], spread evenly over `photos`."""
    rng = np.random.default_rng([int(seed), 4099])
    arrays = [np.asarray(data.image(p), np.float32) / 255.0 for p in photos]
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        a = arrays[i % len(arrays)]
        y = int(rng.integers(0, a.shape[0] - size + 1))
        x = int(rng.integers(0, a.shape[1] - size + 1))
        out[i] = a[y:y + size, x:x + size].transpose(2, 0, 1)
    return torch.from_numpy(out)


def _add_noise(xb, yb, g):
    return xb + SIGMA * torch.randn(xb.shape, generator=g), yb


def train(seed: int = 0, threads: int | None = 1, n_train: int | None = None, epochs: int | None = None,
          log=print) -> tuple[nn.Module, dict]:
    n, ep, lr, bs = RECIPE
    n, ep = int(n_train or n), int(epochs or ep)
    clean = crops(TRAIN_PHOTOS, n, seed=10_000 + seed)
    torch.manual_seed(seed)
    config = {"width": 16}
    model = small.build("denoiser", **config)
    info = training.fit(model, clean, clean, nn.functional.mse_loss, ep, bs, lr, seed=seed, threads=threads,
                        log=log, name="denoiser", augment=_add_noise, weight_decay=0.0)
    info.update(config=config, sigma=SIGMA, patch=PATCH, receptive_field=2 * small.DENOISER_RF + 1)
    return model, info


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of `a` against `b` (peak 1), over the whole batch."""
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


def evaluate(model: nn.Module, n: int = 256, seed: int = 999) -> dict:
    """PSNR (dB) of noisy and denoised crops of the held-out photo."""
    clean = crops((HELDOUT_PHOTO,), n, seed=seed, size=48)
    noisy = clean + SIGMA * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        out = model(noisy)
    return {"heldout_psnr_noisy": psnr(noisy, clean), "heldout_psnr_denoised": psnr(out, clean), "heldout_n": int(n)}
