"""Small offline models beyond images, with weights shipped in `weights/` beside this file.

* `series_cnn`: a 1-D CNN classifying `[B,2,128]` series by the motif planted in them
  (`saliencykit.benchmarks.series`); three Conv1d blocks, a global max pool and a linear head.
* `denoiser`: a fully convolutional RGB denoiser `[B,3,H,W] -> [B,3,H,W]` (values in [0, 1]):
  three 3x3 convolutions (3-16-16-3, padding 1), ReLU between, predicting the noise that is
  subtracted from the input. Its receptive field is exactly 7x7 (`DENOISER_RF = 3`: an output pixel
  depends on the inputs within 3 pixels of it, and on none further away).
* `volume_seg`: a tiny 3-D U-Net-like segmenter `[B,1,D,H,W] -> [B,4,D,H,W]` logits
  (background + 3 organs of `saliencykit.benchmarks.volumes`).

The training loops live with the data they need (`saliencykit.benchmarks.series.models`,
`saliencykit.benchmarks.volumes.models`, `saliencykit.benchmarks.denoise`); retrain any of them
with `saliencykit train-small NAME --out FILE`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import SaliencyError

WEIGHTS = Path(__file__).parent / "weights"
DENOISER_RF = 3          # radius of the denoiser's receptive field, in pixels (7x7 window)
SERIES_LABELS = ("sine_burst", "square_pulse", "chirp", "sawtooth")
ORGANS = ("background", "organ_a", "organ_b", "organ_c")


class SeriesCNN(nn.Module):
    """Conv1d(C,16,7)-ReLU-MaxPool(2), Conv1d(16,32,5)-ReLU-MaxPool(2), Conv1d(32,32,5)-ReLU,
    global max pool over time, Linear(32, classes). Grad-CAM's natural layer: `features.7`."""

    def __init__(self, channels: int = 2, n_classes: int = 4, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv1d(channels, w, 7, padding=3), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(w, 2 * w, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(2 * w, 2 * w, 5, padding=2), nn.ReLU())
        self.pool = nn.AdaptiveMaxPool1d(1)
        self.head = nn.Linear(2 * w, n_classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


class Denoiser(nn.Module):
    """out = x - net(x), net = conv3x3(3,w)-ReLU-conv3x3(w,w)-ReLU-conv3x3(w,3): receptive field
    7x7 (three 3x3 convolutions, stride 1)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, x):
        return x - self.net(x)


def _block3d(cin, cout):
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv3d(cout, cout, 3, padding=1), nn.ReLU())


class VolumeSegmenter(nn.Module):
    """A two-level 3-D U-Net: enc(1->w) at full size, enc(w->2w) at half size, upsample, concat,
    dec(3w->w), 1x1x1 conv to the classes."""

    def __init__(self, n_classes: int = 4, width: int = 8):
        super().__init__()
        w = width
        self.enc1 = _block3d(1, w)
        self.down = nn.MaxPool3d(2)
        self.enc2 = _block3d(w, 2 * w)
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.dec = _block3d(3 * w, w)
        self.head = nn.Conv3d(w, n_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.down(e1))
        return self.head(self.dec(torch.cat([e1, self.up(e2)], 1)))


#: name -> (class, file, what it is)
SMALL = {
    "series_cnn": (SeriesCNN, "series_cnn.pt", "1-D CNN on the planted-motif series benchmark ([B,2,128], 4 motifs)"),
    "denoiser": (Denoiser, "denoiser.pt", "3-layer RGB denoiser trained on the bundled photos (receptive field 7x7)"),
    "volume_seg": (VolumeSegmenter, "volume_seg.pt", "tiny 3-D U-Net on procedural volumes with 3 organs ([B,1,32,32,32])"),
}


def build(name: str, **config) -> nn.Module:
    if name not in SMALL:
        raise SaliencyError(f"unknown small model {name!r}; choose one of {', '.join(SMALL)}")
    return SMALL[name][0](**config)


def save(model: nn.Module, info: dict, path) -> Path:
    """Weights, the architecture's options (`info["config"]`) and the training facts, atomically."""
    from ..files import atomic_write

    path = Path(path)
    payload = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}, "info": dict(info),
               "config": dict(info.get("config", {}))}
    atomic_write(path, lambda p: torch.save(payload, p))
    return path


def load_module(name: str, weights=None) -> tuple[nn.Module, dict]:
    """The trained module `name` in eval mode and its training facts (`weights` defaults to the
    shipped file)."""
    if name not in SMALL:
        raise SaliencyError(f"unknown small model {name!r}; choose one of {', '.join(SMALL)}")
    path = Path(weights) if weights is not None else WEIGHTS / SMALL[name][1]
    if not path.exists():
        raise SaliencyError(f"no weights at {path}; make them with `saliencykit train-small {name} --out {path}`")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = build(name, **payload.get("config", {}))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), dict(payload.get("info", {}))


def load_small(name: str, weights=None, device=None):
    """A `Subject` around the small model `name` (series_cnn, denoiser, volume_seg). Its layout
    (BCT, BCHW, BCDHW) is declared; `subject.info` holds the
    training facts (seed, seconds, held-out accuracy or Dice)."""
    from ..subject import Subject

    model, info = load_module(name, weights)
    layout = {"series_cnn": "BCT", "denoiser": "BCHW", "volume_seg": "BCDHW"}[name]
    kw = {"layout": layout}
    if name == "series_cnn":
        subject = Subject(model, preprocess=_no_preprocess, labels=list(SERIES_LABELS), mean=(0.0,), std=(1.0,),
                          input_size=(int(info.get("length", 128)),), layer="features.7", name=name,
                          device=device, **kw)
    elif name == "denoiser":
        subject = Subject(model, labels=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), input_size=(64, 64),
                          layer="net.3", name=name, device=device, **kw)
    else:
        subject = Subject(model, preprocess=_no_preprocess, labels=list(ORGANS), mean=(0.0,), std=(1.0,),
                          input_size=(32, 32, 32), layer="dec.3", name=name, device=device, **kw)
    subject.info = info
    return subject


def _no_preprocess(arr):
    """Series and volumes come as arrays already in the model's scale: a float tensor of them."""
    return torch.as_tensor(arr, dtype=torch.float32)
