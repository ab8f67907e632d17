"""Training the shipped 1-D CNN of the series benchmark (`saliencykit.models.small.SeriesCNN`).

The shipped `saliencykit/models/weights/series_cnn.pt` was made by

    saliencykit train-small series_cnn --out series_cnn.pt --seed 0

(one thread; the same seed, thread count and machine reproduce it bit for bit)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import dataset as S
from .. import training
from ...models import small

#: (n_train, epochs, lr, batch)
RECIPE = (8000, 16, 1e-2, 64)
TRAIN_SEED_BASE = 10_000
HELDOUT_SEED = 999


def train(seed: int = 0, threads: int | None = 1, n_train: int | None = None, epochs: int | None = None,
          log=print) -> tuple[nn.Module, dict]:
    n, ep, lr, bs = RECIPE
    n, ep = int(n_train or n), int(epochs or ep)
    data = S.generate(n, seed=TRAIN_SEED_BASE + seed)
    torch.manual_seed(seed)
    config = {"channels": S.DEFAULT_CHANNELS, "n_classes": len(S.MOTIFS)}
    model = small.build("series_cnn", **config)
    info = training.fit(model, S.to_tensor(data.series), torch.from_numpy(data.labels),
                        lambda out, y: nn.functional.cross_entropy(out, y), ep, bs, lr, seed=seed, threads=threads,
                        log=log, name="series_cnn")
    info.update(config=config, length=S.DEFAULT_LENGTH)
    return model, info


def evaluate(model: nn.Module, n: int = 400, seed: int = HELDOUT_SEED) -> dict:
    """`{"heldout_accuracy", "heldout_n"}` on `n` fresh series of a seed never used for training."""
    test = S.generate(n, seed=seed)
    with torch.inference_mode():
        pred = model(S.to_tensor(test.series)).argmax(1).numpy()
    return {"heldout_accuracy": float(np.mean(pred == test.labels)), "heldout_n": int(n)}
