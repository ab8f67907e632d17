"""Feature visualisation: an input made to excite a class, a channel or a concept.

* `method="class_model"` (Simonyan et al. 2014, class model visualisation): gradient ascent, with
  Adam, on `S(x) - l2 * |x|^2` in the model's normalised input space, where S is the target's
  pre-softmax score; from a small seeded random image (`init_std` x N(0, 1); 0 starts from the
  zero image, the dataset mean); `jitter` rolls the image by up to that many pixels each step.
* `method="maco"` (Fel et al. 2023, magnitude-constrained optimisation): the image is
  `irfft2(M * exp(i phi))` per colour channel, with the magnitude M fixed and only the phase phi
  optimised. M is the mean magnitude spectrum of the five bundled colour photos (chelsea, coffee,
  astronaut, rocket, motorcycle) resized to the input size (`spectrum="photos"`), or a 1/f
  spectrum (`spectrum="1/f"`). Each channel is then standardised and mapped affinely to pixels
  (`0.5 + contrast * z`, an affine map, so the magnitude spectrum stays M up to one factor per
  channel, the zero frequency aside); each step scores `crops` random crops (side 60-100 % of the
  image, resized back) with Gaussian noise added. The transparency map (`alpha`) is the absolute
  gradient of the objective w.r.t. the image's pixels, accumulated over the steps (the parts of
  the image the objective relied on), scaled to [0, 1].

Targets: `sk.Class(c)` -> the logit of c; `(layer, c)` -> the mean activation of channel c at
`layer`; `sk.Concept(bank, k)` -> concept k's coefficient (the concept view of the subject, as
every method explains it). Every step is one forward and one backward per row, counted in passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

from ..errors import SaliencyError, positive_float, positive_int, resolve_seed
from ..hooks import forward_at

METHODS = ("maco", "class_model")
SPECTRA = ("photos", "1/f")


class ChannelHead(nn.Module):
    """`x -> [B, 1]`: the mean activation of channel `c` at `layer` of `model`."""

    def __init__(self, model: nn.Module, layer: str, c: int):
        super().__init__()
        self.model, self.layer, self.c = model, layer, c

    def forward(self, x):
        _, a = forward_at(self.model, self.layer, x)
        if isinstance(a, (tuple, list)):
            a = a[0]
        if not isinstance(a, torch.Tensor) or a.dim() not in (2, 4):
            raise SaliencyError(f"layer {self.layer!r} gives no channels to visualise ([B,C] or [B,C,h,w] needed)")
        if not 0 <= self.c < a.shape[1]:
            raise SaliencyError(f"channel {self.c} is not in 0..{a.shape[1] - 1} at layer {self.layer!r}")
        a = a[:, self.c]
        return (a.mean((1, 2)) if a.dim() == 3 else a).unsqueeze(1)


@dataclass
class Visualization:
    """`image` (PIL), `input` [1,3,H,W] in the model's normalised space, `trace` the objective per
    step, `score_start`/`score_end` the target's score on the un-augmented image before the first
    step and after the last; for MACO also `alpha` [H,W] (transparency, in [0,1])."""

    image: object
    input: torch.Tensor
    method: str
    target: str
    trace: list
    score_start: float
    score_end: float
    seed: int
    passes: dict
    alpha: torch.Tensor | None = None
    params: dict = field(default_factory=dict)

    @property
    def transparency(self):
        return self.alpha

    def image_with_alpha(self):
        """The image as RGBA, the transparency map as its alpha channel (MACO only)."""
        if self.alpha is None:
            raise SaliencyError("only a MACO visualisation has a transparency map")
        import numpy as np
        from PIL import Image

        img = self.image.convert("RGBA")
        img.putalpha(Image.fromarray((self.alpha.numpy() * 255).round().astype(np.uint8)))
        return img

    def __repr__(self):
        return (f"Visualization({self.method}, {self.target}, {len(self.trace)} steps, "
                f"score {self.score_start:.3g} -> {self.score_end:.3g})")


def objective(subject, target):
    """(the subject whose output column `col` is the objective, col, a description)."""
    from ..targets import Class
    from .target import Concept

    if isinstance(target, Concept):
        if not isinstance(target.k, int):
            raise SaliencyError("visualise one concept at a time: Concept(bank, k) with an int k")
        view, _ = target.subject_view(subject)
        return view, target.k, f"concept {target.k} at {target.bank.layer}"
    if isinstance(target, Class):
        if target.c is None or isinstance(target.c, (list, tuple)):
            raise SaliencyError("visualise one given class: sk.Class(index or label), not the top-1 class or a list")
        c = subject.class_index(target.c)
        return subject, c, f"class {subject.label(c)!r}"
    if isinstance(target, tuple) and len(target) == 2 and isinstance(target[1], int) and not isinstance(target[1], bool):
        name = subject.find_layer(target[0])[0]
        if target[1] < 0:
            raise SaliencyError(f"channel {target[1]} is negative")
        view = _view(subject, ChannelHead(subject.model, name, target[1]), f"{name}[{target[1]}]")
        return view, 0, f"channel {target[1]} of {name}"
    raise SaliencyError(f"cannot visualise {target!r}: give sk.Class(c), a channel (layer, c) or "
                        "sk.Concept(bank, k)")


def _view(subject, module, what):
    from .target import model_view

    return model_view(subject, module, what, labels=[what])


@lru_cache(maxsize=8)
def photo_spectrum(size: tuple) -> torch.Tensor:
    """The mean magnitude of the half spectrum (rfft2) of the bundled colour photos at `size`, per
    channel: [3, H, W//2+1], pixels in [0,1]."""
    import numpy as np
    from PIL import Image

    from .. import data

    H, W = size
    mags = []
    for name in data.PHOTOS:
        img = data.image(name).resize((W, H), Image.BILINEAR)
        px = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mags.append(torch.fft.rfft2(px).abs())
    return torch.stack(mags).mean(0)


def one_over_f(size: tuple) -> torch.Tensor:
    """A 1/f magnitude spectrum [3, H, W//2+1] (frequency in cycles per image, the zero one as 1)."""
    H, W = size
    fy = torch.fft.fftfreq(H).abs().view(-1, 1) * H
    fx = torch.fft.rfftfreq(W).view(1, -1) * W
    f = torch.sqrt(fy ** 2 + fx ** 2).clamp(min=1.0)
    return (1.0 / f).expand(3, -1, -1).clone()


def visualize(subject, target, method: str = "maco", steps: int = 128, size=None, lr: float | None = None,
              seed: int | None = 0, l2: float = 1e-4, jitter: int = 0, init_std: float = 0.01,
              spectrum: str = "photos", crops: int = 4, noise: float = 0.05, contrast: float = 0.15,
              progress: bool = False) -> Visualization:
    """An input that maximises `target` for `subject` (see the module docstring). `size` defaults
    to the subject's input size; `lr` to 0.05 (class_model) or 0.1 (maco)."""
    from ..engine import PassCounter, Progress, gradient_pass
    from ..targets import Class

    if method not in METHODS:
        raise SaliencyError(f"unknown visualisation method {method!r}; available: {', '.join(METHODS)}")
    if spectrum not in SPECTRA:
        raise SaliencyError(f"unknown spectrum {spectrum!r}; available: {', '.join(SPECTRA)}")
    steps = positive_int(steps, "steps")
    crops = positive_int(crops, "crops")
    jitter = positive_int(jitter, "jitter", minimum=0)
    lr = positive_float(lr if lr is not None else (0.1 if method == "maco" else 0.05), "lr")
    l2 = positive_float(l2, "l2", allow_zero=True)
    noise = positive_float(noise, "noise", allow_zero=True)
    seed = resolve_seed(seed)
    H, W = (subject.input_size if size is None else ((size, size) if isinstance(size, int) else tuple(size)))
    view, col, what = objective(subject, target)
    device, dtype = subject.device, subject.dtype
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(subject.mean, dtype=dtype, device=device).view(1, -1, 1, 1)
    std = torch.tensor(subject.std, dtype=dtype, device=device).view(1, -1, 1, 1)
    counter = PassCounter()
    alpha_sum = torch.zeros(H, W, dtype=torch.float64)

    if method == "maco":
        if subject.in_channels != 3:
            raise SaliencyError("MACO's spectrum is of colour photos: it needs a 3-channel model")
        mag = (photo_spectrum((H, W)) if spectrum == "photos" else one_over_f((H, W))).to(device, dtype)
        phase = (2 * math.pi * torch.rand(mag.shape, generator=g, dtype=torch.float64) - math.pi).to(device, dtype)
        param = phase.requires_grad_(True)

        def model_input(p):
            s = torch.fft.irfft2(mag * torch.exp(1j * p), s=(H, W))            # [3, H, W]
            z = (s - s.mean((1, 2), keepdim=True)) / s.std(dim=(1, 2), keepdim=True).clamp(min=1e-12)
            return ((0.5 + contrast * z).unsqueeze(0) - mean) / std             # pixels -> normalised space
    else:
        start = (init_std * torch.randn(1, subject.in_channels, H, W, generator=g, dtype=torch.float64)).to(device, dtype)
        param = start.requires_grad_(True)

        def model_input(p):
            return p

    opt = torch.optim.Adam([param], lr=lr)
    K = None
    trace = []

    def clean_score(x):
        nonlocal K
        with torch.no_grad():
            out = view.forward(x.detach())
        counter.add(forward=1)
        K = out.shape[1]
        if not 0 <= col < K:
            raise SaliencyError(f"class {col} is not in 0..{K - 1}: the model has {K} outputs")
        return float(out[0, col])

    with subject.explaining():
        score_start = clean_score(model_input(param))
        resolved = Class(col).resolve(view, torch.zeros(1, K))
        with Progress(steps, f"visualising ({method})", enabled=progress, unit="step") as bar:
            for _ in range(steps):
                with torch.enable_grad():
                    x = model_input(param)
                    if method == "maco":
                        x.retain_grad()
                    if method == "maco":
                        batch = _augment(x, crops, noise, g)
                    elif jitter:
                        dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=g))
                        batch = torch.roll(x, (dy, dx), dims=(2, 3))
                    else:
                        batch = x
                    res = gradient_pass(view, batch, resolved, rows=torch.zeros(batch.shape[0], dtype=torch.long,
                                                                                device=device), counter=counter)
                    opt.zero_grad()
                    # the objective's gradient from the engine's pass, chained back to the parameters by hand;
                    # Adam minimises, so the gradient of -(mean score - l2 |x|^2) goes in
                    loss_grad = -res.input_grad.to(batch) / batch.shape[0]
                    penalty = l2 * (x ** 2).sum() if method == "class_model" and l2 > 0 else None
                    tensors = [batch] + ([penalty] if penalty is not None else [])
                    grads = [loss_grad] + ([torch.ones((), dtype=x.dtype, device=device)] if penalty is not None else [])
                    torch.autograd.backward(tensors, grads)
                    if method == "maco":   # d objective / d pixels = d / d x divided by std, per channel
                        alpha_sum += (x.grad.detach() / std).abs().sum((0, 1)).double().cpu()
                    opt.step()
                value = float(res.scores.mean())
                if method == "class_model" and l2 > 0:
                    value -= l2 * float((x.detach() ** 2).sum())
                trace.append(value)
                bar.step()
        final = model_input(param).detach()
        score_end = clean_score(final)
    alpha = None
    if method == "maco":
        alpha = (alpha_sum / alpha_sum.max().clamp(min=1e-30)).float()
    from .pictures import photo

    image, _ = photo(subject, final, min_side=1)
    params = {"steps": steps, "lr": lr, "size": [H, W]}
    if method == "maco":
        params.update(spectrum=spectrum, crops=crops, noise=noise, contrast=contrast)
    else:
        params.update(l2=l2, jitter=jitter, init_std=init_std)
    return Visualization(image=image, input=final, method=method, target=what, trace=trace, score_start=score_start,
                         score_end=score_end, seed=seed, passes=counter.per_image(1), alpha=alpha, params=params)


def _augment(x: torch.Tensor, crops: int, noise: float, g: torch.Generator) -> torch.Tensor:
    """`crops` random square-ish crops of `x` [1,C,H,W] (side 60-100 % of each dimension), resized
    back to [H, W], with N(0, noise^2) added: [crops, C, H, W], differentiable in x."""
    _, C, H, W = x.shape
    out = []
    for _ in range(crops):
        frac = 0.6 + 0.4 * float(torch.rand((), generator=g))
        h, w = max(2, int(round(frac * H))), max(2, int(round(frac * W)))
        t = int(torch.randint(0, H - h + 1, (), generator=g))
        l_ = int(torch.randint(0, W - w + 1, (), generator=g))
        crop = x[:, :, t:t + h, l_:l_ + w]
        out.append(torch.nn.functional.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False))
    batch = torch.cat(out)
    if noise > 0:
        batch = batch + noise * torch.randn(batch.shape, generator=g, dtype=torch.float64).to(batch)
    return batch


__all__ = ["visualize", "Visualization", "ChannelHead", "photo_spectrum", "one_over_f"]
