"""Perturbation along the axes of any layout: occlusion windows of an image ([B,C,H,W]), a series
([B,C,T]: `patch` steps every `stride`) or a volume ([B,C,D,H,W]: cubes), and the equal-length
time segments that are LIME's and KernelSHAP's features on a series; all on the one perturbation
runner, `engine.perturbed_scores`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..engine import perturbed_scores
from ..errors import SaliencyError, positive_int


def window_starts(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    """[(start, stop)] of the sliding windows along one axis: ceil((L - w) / s) + 1 windows,
    the last one clipped at the border."""
    n = int(math.ceil((length - window) / stride)) + 1
    return [(k * stride, min(k * stride + window, length)) for k in range(n)]


def _sizes(value, n: int, what: str) -> tuple[int, ...]:
    """An int or a tuple of `n` ints >= 1 (one per axis after the channel axis)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value),) * n
    if (not isinstance(value, (tuple, list)) or len(value) != n
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
        raise SaliencyError(f"{what} must be an int or {n} ints (one per axis), got {value!r}")
    if min(value) < 1:
        raise SaliencyError(f"{what} must be >= 1, got {tuple(value)}")
    return tuple(int(v) for v in value)


def occlusion_along_axes(ctx, target, patch, stride, out: str | None, base: torch.Tensor, clean_row: bool = False,
                         desc: str = "occlusion") -> dict:
    """Occlusion of an image (windows of `patch` pixels every `stride`), a series ([B,C,T]) or a
    volume ([B,C,D,H,W]: cubes); each position gets the mean drop of the windows covering it.

    The drop is from the clean score of the call (`ctx.logits()`); with `clean_row=True` from the
    unchanged input run as the first row of each example in the same run instead (the same model
    form and chunking: a window the score cannot see then drops by exactly 0), which the result
    reports as `clean` ([B])."""
    x = ctx.x.detach()
    b, axes = x.shape[0], tuple(x.shape[2:])
    d = len(axes)
    size = _sizes(patch, d, "occlusion patch")
    step = _sizes(stride, d, "occlusion stride")
    if any(p > n for p, n in zip(size, axes)):
        if d == 2:
            raise SaliencyError(f"occlusion patch {size} is larger than the image {axes}: pass a smaller patch=")
        what = "series" if d == 1 else "volume"
        raise SaliencyError(f"the {what} {axes} is shorter than the occlusion window {size}: pass a smaller patch=")
    if any(s > p for s, p in zip(step, size)):
        raise SaliencyError(f"occlusion stride {step} is larger than the patch {size}: some positions would "
                            "never be occluded")
    # indicator of every window along each axis: window (i, j, ...) covers R[0][i] x R[1][j] x ...
    ind = []
    for length, p, st in zip(axes, size, step):
        spans = window_starts(length, p, st)
        r = torch.zeros(len(spans), length, device=x.device)
        for i, (a, z) in enumerate(spans):
            r[i, a:z] = 1
        ind.append(r)
    counts = [r.shape[0] for r in ind]
    nwin = math.prod(counts)

    def cover_of(win: torch.Tensor) -> torch.Tensor:   # [k, *axes]
        cover, rest = None, win
        for a in reversed(range(d)):
            part = ind[a][rest % counts[a]].view(len(win), *[1] * a, axes[a], *[1] * (d - a - 1))
            rest = rest // counts[a]
            cover = part if cover is None else cover * part
        return cover

    per = nwin + int(clean_row)          # rows per example; with clean_row, row 0 is the unchanged input

    def masks(start, stop):
        idx = torch.arange(start, stop, device=x.device)
        win = idx % per - int(clean_row)
        cover = cover_of(win.clamp(min=0)) * (win >= 0).view(-1, *[1] * d)
        return idx // per, (1 - cover).unsqueeze(1)

    scores = perturbed_scores(ctx.subject, x, base, target, masks, b * per, batch_size=ctx.batch_size,
                              counter=ctx.counter, output=out, progress=ctx.progress, desc=desc).view(b, per)
    clean = scores[:, 0] if clean_row else target.score(ctx.logits(), output=out)
    drop = (clean.view(b, 1) - scores[:, int(clean_row):]).view(b, *counts)
    wl, al = "ijk"[:d], "tuv"[:d]
    spec = "b" + wl + "," + ",".join(f"{w}{a}" for w, a in zip(wl, al)) + "->b" + al
    summed = torch.einsum(spec, drop, *ind)
    count = torch.einsum(",".join(f"{w}{a}" for w, a in zip(wl, al)) + "->" + al, *ind)
    res = {"maps": summed / count.clamp_min(1), "raw": drop, "signed": True,
           "extras": {"windows": nwin, "window_grid": tuple(counts)}}
    if clean_row:
        res["clean"] = clean
    return res


def time_segments(length: int, n_segments: int) -> torch.Tensor:
    """`[T]` long labels of `n_segments` consecutive segments of (nearly) equal length: the
    features of `lime` / `kernelshap` on a series [B,C,T]."""
    n_segments = positive_int(n_segments, "n_segments", 2)
    if n_segments > length:
        raise SaliencyError(f"the series has {length} steps, too few for {n_segments} time segments: pass "
                            f"n_segments <= {length}")
    return torch.arange(length) * n_segments // length


def series_segments(x: torch.Tensor, n_segments, segments) -> tuple[torch.Tensor, list[int]]:
    """[B,T] labels 0..M_b-1 of a series' time segments (equal lengths, or the given [T] / [B,T]
    labels, relabelled to consecutive ids) and the M_b: LIME's and KernelSHAP's features."""
    b, t = x.shape[0], x.shape[-1]
    if segments is None:
        return _consecutive(time_segments(t, n_segments).to(x.device).expand(b, t))
    seg = torch.as_tensor(segments)
    if seg.is_floating_point() or seg.dtype == torch.bool:
        raise SaliencyError(f"segments must be integer labels, got dtype {seg.dtype}")
    if seg.dim() == 1 and seg.shape[0] == t:
        seg = seg.unsqueeze(0).expand(b, t)
    if tuple(seg.shape) != (b, t):
        raise SaliencyError(f"segments of a series must have shape (T,) = {(t,)} or (B, T) = {(b, t)}, "
                            f"got {tuple(seg.shape)}")
    return _consecutive(seg.to(x.device).long())


def _consecutive(seg: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    out = [torch.unique(row, return_inverse=True)[1] for row in seg]
    counts = [int(r.max()) + 1 for r in out]
    if min(counts) < 2:
        raise SaliencyError("the given time segments make a single segment: give at least two")
    return torch.stack(out), counts
