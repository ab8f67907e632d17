"""Smoothing of input-space tensors: the one Gaussian blur of the package.

It serves the blurred baselines of the gradient methods, Blur IG's scale-space path, the blur
substrates of extremal and meaningful perturbation, and the RISE insertion substrate of the
metrics. The blur is separable and computed as matrix products with banded kernel matrices
(`band`): exact in float64, faster than grouped convolutions for the wide kernels of large sigma,
and the same code for zero and replicate padding. An image is blurred along its last two axes; a
series along its last axis (`axes=1`), a volume along its last three (`axes=3`).
"""
from __future__ import annotations

import math

import torch

PADDINGS = ("zeros", "replicate")


def gaussian_kernels(sigma: float, radius: int, dtype=torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised 1-D Gaussian on -radius..radius and its exact derivative with respect to
    sigma (of the normalised, truncated kernel), both computed in float64 and cast to `dtype`."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    dk = k * (t ** 2 - (k * t ** 2).sum()) / sigma ** 3
    return k.to(dtype), dk.to(dtype)


def band(k: torch.Tensor, n: int, padding: str = "zeros") -> torch.Tensor:
    """`[n, n]` matrix of the 1-D correlation with kernel `k` (length 2r+1): row i holds the
    weights of out[i] = sum_d k[d] x[i + d]. Taps beyond the edge are dropped ("zeros") or land
    on the edge sample ("replicate")."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    r = (k.numel() - 1) // 2
    i = torch.arange(n, device=k.device).view(-1, 1)
    d = torch.arange(-r, r + 1, device=k.device).view(1, -1)
    j = i + d                                                   # [n, 2r+1] sample index of each tap
    weights = k.view(1, -1).expand(n, -1)
    if padding == "zeros":
        inside = (j >= 0) & (j < n)
        weights = torch.where(inside, weights, torch.zeros((), dtype=k.dtype, device=k.device))
    j = j.clamp(0, n - 1)
    out = torch.zeros(n, n, dtype=k.dtype, device=k.device)
    return out.index_put_((i.expand_as(j).reshape(-1), j.reshape(-1)), weights.reshape(-1), accumulate=True)


def separable(x: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Separable correlation of the last two axes of `x` with `ky` (rows) and `kx` (columns)."""
    return band(ky, x.shape[-2], padding) @ x @ band(kx, x.shape[-1], padding).T


def separable_axes(x: torch.Tensor, kernels, padding: str = "zeros") -> torch.Tensor:
    """Separable correlation of the last `len(kernels)` axes of `x`, one kernel per axis in axis
    order: `separable` for two axes (the image path, unchanged), one banded product per axis
    otherwise (a series' time axis, a volume's depth, height and width)."""
    kernels = tuple(kernels)
    if len(kernels) == 2:
        return separable(x, kernels[0], kernels[1], padding)
    if not 1 <= len(kernels) <= x.dim():
        raise ValueError(f"{len(kernels)} kernels for a tensor of {x.dim()} axes")
    out = x
    for i, k in enumerate(kernels):
        axis = x.dim() - len(kernels) + i
        out = (out.movedim(axis, -1) @ band(k, x.shape[axis], padding).T).movedim(-1, axis)
    return out


def gaussian_blur(x: torch.Tensor, sigma: float, radius: int | None = None, truncate: float = 4.0,
                  padding: str = "zeros", axes: int = 2) -> torch.Tensor:
    """Gaussian blur of each channel of `x` `[..., H, W]` (with `axes=1`: `[..., T]`; `axes=3`:
    `[..., D, H, W]`): standard deviation `sigma` samples along each of the last `axes` axes,
    kernel radius `radius` (default ceil(truncate * sigma)), zero or replicate padding.
    sigma <= 0 returns a copy of `x`."""
    if sigma <= 0:
        return x.clone()
    radius = int(math.ceil(truncate * sigma)) if radius is None else int(radius)
    k, _ = gaussian_kernels(sigma, radius, x.dtype, x.device)
    return separable_axes(x, (k,) * axes, padding)
