"""Causal effect maps for image-to-image models (restoration, denoising, super-resolution).

For a chosen *output region* R (a boolean mask over the output pixels) and each *input region*
(a cell of a `patch` x `patch` grid), the input region is intervened on, `do(x_p = b_p)`, and the
effect is the change it causes in the output score over R:

    effect_p = S(f(x)) - S(f(do(x_p = b_p))),   S(y) = mean of y over R (all channels),

or, when a clean `reference` is given, S(y) = -mean((y - reference)^2 over R): then a positive
effect means the input region helps restore R (removing it makes R worse), a negative one that it
hurts. The intervention `b_p` is a parameter:

* "mean": the region replaced by its own mean colour (the information in its texture removed),
* "blur": by a Gaussian blur of the image (sigma `sigma`),
* "noise": by its mean colour plus Gaussian noise of the image's standard deviation (seeded),
* "zero": by zeros.

The positive and negative effects are returned apart (`positive = relu(effect)`,
`negative = relu(-effect)`, `effect = positive - negative`), so a picture can show them in two
colours (`CausalEffect.overlay`). The regions are occlusion's windows with stride = patch
(`methods.along_axes.occlusion_along_axes`, on the one perturbation runner) with the unchanged
input as the first row of every image (`clean_row=True`), so the clean and the intervened
outputs come from the same model form and chunks: a region outside the receptive field of R has
an effect of exactly zero. With the "zero" intervention the effect is occlusion's drop on
`sk.OutputRegion(mask, reduce="mean")` divided by the output's channels.

    >>> ce = causal_effect(load_model("denoiser"), x, out_mask, patch=8, intervention="mean")
    >>> ce.effect.shape, ce.maps.shape       # [B, H/8, W/8] per region, [B, H, W] at input size
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..methods.along_axes import occlusion_along_axes
from ..methods.base import Context
from ..errors import SaliencyError, positive_float, positive_int, resolve_seed
from ..subject import Subject

INTERVENTIONS = ("mean", "blur", "noise", "zero")


@dataclass
class CausalEffect:
    effect: torch.Tensor        # [B, gh, gw] signed effect of each input region on the output score
    maps: torch.Tensor          # [B, H, W]: each pixel carries its region's effect
    positive: torch.Tensor      # [B, H, W]: relu(maps)
    negative: torch.Tensor      # [B, H, W]: relu(-maps)
    clean_score: torch.Tensor   # [B]: S(f(x))
    patch: int
    intervention: str
    seed: int
    passes: dict = field(default_factory=dict)

    def overlay(self, image, index: int = 0, alpha: float = 0.6):
        """An RGB PIL picture of `image` with the positive effects in red and the negative in blue."""
        import numpy as np
        from PIL import Image

        base = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, np.float32) / 255.0
        pos, neg = self.positive[index].numpy(), self.negative[index].numpy()
        scale = max(float(pos.max()), float(neg.max()), 1e-12)
        if base.shape[:2] != pos.shape:
            raise SaliencyError(f"image is {base.shape[1]}x{base.shape[0]} but the map is {pos.shape[1]}x{pos.shape[0]}")
        colour = np.zeros_like(base)
        colour[..., 0], colour[..., 2] = pos / scale, neg / scale
        weight = alpha * np.clip((pos + neg) / scale, 0, 1)[..., None]
        out = base * (1 - weight) + colour * weight
        return Image.fromarray((255 * np.clip(out, 0, 1)).astype(np.uint8))


class ImageToImage(Subject):
    """A subject whose model maps `[B,C,H,W]` to `[B,C',H',W']` (a denoiser, a restorer, a
    super-resolver): `forward` returns the output image as it is. Its forward runs eagerly (the
    traced fast forms read class logits)."""

    subject_kind = "image_to_image"

    def __init__(self, model: torch.nn.Module, name: str | None = None, device=None):
        super().__init__(model, labels=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), name=name, device=device,
                         fast=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, dict) and isinstance(out.get("out"), torch.Tensor):
            out = out["out"]
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise SaliencyError(f"an image-to-image model must return a [B,C,H,W] tensor, got "
                                f"{getattr(out, 'shape', type(out).__name__)}")
        return out


class _RegionScore:
    """The output score S of the rows of one run: the mean output over the region, or minus the
    mean squared error to `reference` there. Duck-types the resolved target of the runner."""

    def __init__(self, mask: torch.Tensor, reference: torch.Tensor | None):
        self.mask = mask                   # [B,1,H,W] float
        self.reference = reference

    def score(self, out: torch.Tensor, rows: torch.Tensor, output=None) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise SaliencyError(f"causal effect maps need an image-to-image model returning [B,C,H,W], got "
                                f"{getattr(out, 'shape', type(out).__name__)}")
        b = rows.to(self.mask.device)      # the image each row belongs to
        m = self.mask[b].to(out.dtype)
        if m.shape[-2:] != out.shape[-2:]:
            raise SaliencyError(f"the output region is {tuple(m.shape[-2:])} but the model's output is "
                                f"{tuple(out.shape[-2:])}; give a mask of the output's size")
        m = m.expand(-1, out.shape[1], -1, -1)
        if self.reference is None:
            val = out
        else:
            val = -(out - self.reference[b].to(out.dtype)) ** 2
        return (val * m).sum((1, 2, 3)) / m.sum((1, 2, 3))


def _region_ids(h: int, w: int, patch: int, device) -> tuple[torch.Tensor, int, int]:
    """[H,W] the region of each pixel (row-major cells of `patch` pixels, the last ones clipped)."""
    gh, gw = math.ceil(h / patch), math.ceil(w / patch)
    ys = torch.arange(h, device=device) // patch
    xs = torch.arange(w, device=device) // patch
    return ys[:, None] * gw + xs[None, :], gh, gw


def _baseline(x: torch.Tensor, ids: torch.Tensor, n_regions: int, intervention: str, sigma: float,
              seed: int) -> torch.Tensor:
    if intervention == "zero":
        return torch.zeros_like(x)
    if intervention == "blur":
        from ..filters import gaussian_blur

        return gaussian_blur(x, sigma, padding="replicate")
    b, c = x.shape[:2]
    flat = ids.flatten()
    sums = torch.zeros(b, c, n_regions, dtype=x.dtype, device=x.device).index_add_(2, flat, x.flatten(2))
    counts = torch.bincount(flat, minlength=n_regions).to(x.dtype)
    means = (sums / counts)[:, :, flat].reshape(x.shape)
    if intervention == "mean":
        return means
    g = torch.Generator(device=x.device).manual_seed(seed)
    std = x.flatten(1).std(1).view(b, 1, 1, 1)
    return means + std * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def as_image_to_image(model_or_subject) -> ImageToImage:
    """An `ImageToImage` subject around a module, or around the model of a `Subject`."""
    if isinstance(model_or_subject, ImageToImage):
        return model_or_subject
    if isinstance(model_or_subject, Subject):
        return ImageToImage(model_or_subject.model, name=model_or_subject.name)
    if isinstance(model_or_subject, torch.nn.Module):
        return ImageToImage(model_or_subject)
    raise SaliencyError(f"causal_effect needs a Subject or an nn.Module, got {type(model_or_subject).__name__}")


def causal_effect(model_or_subject, x: torch.Tensor, out_mask, patch: int = 8, intervention: str = "mean",
                  reference: torch.Tensor | None = None, sigma: float = 4.0, seed: int | None = 0,
                  batch_size: int | None = None, progress: bool = False) -> CausalEffect:
    """The signed causal effect of every `patch` x `patch` input region on the output inside
    `out_mask` (`[H,W]` or `[B,H,W]` bool, the output's size; or the `sk.OutputRegion` target that
    `sk.explain` takes for the same region). See the module doc for the score, the interventions
    and the sign."""
    from ..targets import OutputRegion

    if isinstance(out_mask, OutputRegion):
        out_mask = out_mask.mask
    subject = as_image_to_image(model_or_subject)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise SaliencyError(f"x must be a float [B,C,H,W] image batch, got {getattr(x, 'shape', type(x).__name__)}")
    patch = positive_int(patch, "patch")
    if intervention not in INTERVENTIONS:
        raise SaliencyError(f"unknown intervention {intervention!r}; choose one of {', '.join(INTERVENTIONS)}")
    sigma = positive_float(sigma, "sigma")
    seed = resolve_seed(seed)
    b, _, h, w = x.shape
    if patch > max(h, w):
        raise SaliencyError(f"patch {patch} is larger than the {h}x{w} input")
    mask = torch.as_tensor(out_mask, device=x.device)
    if mask.dim() == 2:
        mask = mask.expand(b, -1, -1)
    if mask.dim() != 3 or mask.shape[0] != b:
        raise SaliencyError(f"out_mask must be [H,W] or [B,H,W] with B = {b}, got {tuple(mask.shape)}")
    mask = mask.bool()
    if not mask.flatten(1).any(1).all():
        raise SaliencyError("out_mask selects no output pixel (for at least one image); mark the region to explain")
    if reference is not None and tuple(reference.shape) != tuple(x.shape[:1]) + tuple(reference.shape[1:]):
        raise SaliencyError(f"reference must be a [B,C,H,W] batch like the output, got {tuple(reference.shape)}")
    x = x.detach()
    ids, gh, gw = _region_ids(h, w, patch, x.device)
    base = _baseline(x, ids, gh * gw, intervention, sigma, seed)
    target = _RegionScore(mask[:, None].float(), None if reference is None else reference.detach())
    window = (min(patch, h), min(patch, w))   # a patch longer than one side: one cell along it
    with subject.explaining():
        ctx = Context(subject, x, seed=seed, batch_size=batch_size, progress=progress)
        res = occlusion_along_axes(ctx, target, window, window, None, base, clean_row=True, desc="causal effect")
    effect = res["raw"].to(x.dtype)
    maps = res["maps"].to(x.dtype).detach().cpu()
    return CausalEffect(effect=effect.detach().cpu(), maps=maps, positive=maps.clamp(min=0), negative=(-maps).clamp(min=0),
                        clean_score=res["clean"].to(x.dtype).detach().cpu(), patch=patch, intervention=intervention,
                        seed=seed, passes=ctx.counter.per_image(b))
