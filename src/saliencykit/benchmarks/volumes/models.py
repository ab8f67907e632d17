"""Training the shipped 3-D segmenter (`saliencykit.models.small.VolumeSegmenter`).

The shipped `saliencykit/models/weights/volume_seg.pt` was made by

    saliencykit train-small volume_seg --out volume_seg.pt --seed 0
"""
from __future__ import annotations

import torch
from torch import nn

from . import dataset as V
from .. import training
from ...models import small

#: (n_train volumes, epochs, lr, batch)
RECIPE = (200, 12, 1e-2, 8)
HELDOUT_SEED = 999
#: training crops (voxels per side): 8x cheaper than whole volumes, and the fully convolutional
#: model sees every organ's texture and boundary in them
CROP = 16
#: class weights of the loss: the background is ~94 % of the voxels
CLASS_WEIGHTS = (0.25, 1.0, 1.0, 1.0)


def _crop(xb, yb, g):
    """One seeded random CROP^3 window per minibatch (the same for its volumes)."""
    d, h, w = yb.shape[1:]
    z, y, x = (int(torch.randint(0, s - CROP + 1, (), generator=g)) for s in (d, h, w))
    return xb[..., z:z + CROP, y:y + CROP, x:x + CROP], yb[..., z:z + CROP, y:y + CROP, x:x + CROP]


def train(seed: int = 0, threads: int | None = 1, n_train: int | None = None, epochs: int | None = None,
          log=print) -> tuple[nn.Module, dict]:
    n, ep, lr, bs = RECIPE
    n, ep = int(n_train or n), int(epochs or ep)
    data = V.generate(n, seed=10_000 + seed)
    torch.manual_seed(seed)
    config = {"n_classes": len(V.ORGANS), "width": 8}
    model = small.build("volume_seg", **config)
    weights = torch.tensor(CLASS_WEIGHTS)
    info = training.fit(model, torch.from_numpy(data.volumes), torch.from_numpy(data.labels),
                        lambda out, y: nn.functional.cross_entropy(out, y, weight=weights), ep, bs, lr, seed=seed,
                        threads=threads, log=log, name="volume_seg", augment=_crop)
    info.update(config=config, size=V.DEFAULT_SIZE, crop=CROP)
    return model, info


def evaluate(model: nn.Module, n: int = 24, seed: int = HELDOUT_SEED) -> dict:
    """Dice per organ and mean on `n` fresh volumes of a seed never used for training."""
    test = V.generate(n, seed=seed)
    with torch.inference_mode():
        pred = model(torch.from_numpy(test.volumes)).argmax(1).numpy()
    return {f"heldout_dice_{k}": v for k, v in V.dice(pred, test.labels).items()} | {"heldout_n": int(n)}
