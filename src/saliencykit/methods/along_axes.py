"""Perturbation along the axes of any layout: occlusion windows of an image ([B,C,H,W]), a series
([B,C,T]: `patch` steps every `stride`), a volume ([B,C,D,H,W]: cubes), a clip ([B,T,C,H,W]:
cubes over frames, height and width) or a feature vector ([B,F]: runs of `patch` features); RISE's
random smooth masks over the same axes; and the equal-length time segments that are LIME's and
KernelSHAP's features on a series; all on the one perturbation runner, `engine.perturbed_scores`.

The axes a window or a mask moves along are every axis after the batch axis except the layout's
channel axis (`subject.channel_axis`: 1, 2 for a clip, none for features); a mask made over them
gets a length-1 axis where the channel axis is, so it covers every channel (`keep_mask`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

import torch.nn.functional as F

from ..engine import generator, perturbed_scores
from ..errors import SaliencyError, positive_int
from ..subject import channel_axis

#: what an input of each layout is called in the messages
NOUNS = {"BCHW": "image", "BCT": "series", "BCDHW": "volume", "BTCHW": "clip", "BF": "feature vector"}


def perturbed_axes(x: torch.Tensor, layout: str) -> tuple[tuple[int, ...], int | None]:
    """The lengths of the axes a perturbation moves along (every axis after the batch axis but
    the channel axis of `layout`) and the channel axis (None for a flat input)."""
    ca = channel_axis(layout)
    return tuple(n for i, n in enumerate(x.shape) if i not in (0, ca)), ca


def keep_mask(cover: torch.Tensor, ca: int | None) -> torch.Tensor:
    """A mask `[k, *axes]` over the perturbed axes -> `[k, ...]` broadcasting over the input's
    channel axis (`[k,1,H,W]` for an image, `[k,T,1,H,W]` for a clip, `[k,F]` for features)."""
    return cover if ca is None else cover.unsqueeze(ca)


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
    """Occlusion of an image (windows of `patch` pixels every `stride`), a series ([B,C,T]), a
    volume ([B,C,D,H,W]: cubes), a clip ([B,T,C,H,W]: cubes over T, H, W, all channels) or a
    feature vector ([B,F]: `patch` consecutive features); each position gets the mean drop of
    the windows covering it.

    The drop is from the clean score of the call (`ctx.logits()`); with `clean_row=True` from the
    unchanged input run as the first row of each example in the same run instead (the same model
    form and chunking: a window the score cannot see then drops by exactly 0), which the result
    reports as `clean` ([B])."""
    x = ctx.x.detach()
    axes, ca = perturbed_axes(x, ctx.layout)
    b, d = x.shape[0], len(axes)
    size = _sizes(patch, d, "occlusion patch")
    step = _sizes(stride, d, "occlusion stride")
    if any(p > n for p, n in zip(size, axes)):
        what = NOUNS.get(ctx.layout, "input")
        if what == "image":
            raise SaliencyError(f"occlusion patch {size} is larger than the image {axes}: pass a smaller patch=")
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
        return idx // per, keep_mask(1 - cover, ca)

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


def _consecutive(seg: torch.Tensor, single: str = "the given segments make a single segment: give at least "
                                                     "two") -> tuple[torch.Tensor, list[int]]:
    out = [torch.unique(row, return_inverse=True)[1] for row in seg]
    counts = [int(r.max()) + 1 for r in out]
    if min(counts) < 2:
        raise SaliencyError(single)
    return torch.stack(out), counts


def rise_cells(cell, axes: tuple[int, ...], layout: str) -> tuple[int, ...] | None:
    """RISE's grid: `cell` cells along each perturbed axis (an int or one per axis); None gives 7
    per axis (fewer on an axis shorter than 7: a clip of 4 frames gets 4) and, on a feature
    vector, one independent Bernoulli draw per feature (None: features have no neighbours to
    smooth over)."""
    if cell is None:
        return None if layout == "BF" else tuple(min(7, n) for n in axes)
    cells = _sizes(cell, len(axes), "rise cell")
    if any(c > n for c, n in zip(cells, axes)):
        raise SaliencyError(f"rise cell grid {cell!r} is finer than the {NOUNS.get(layout, 'input')} {axes}: "
                            "pass a smaller cell=")
    return cells


class RiseMasks:
    """RISE masks (Petsiuk et al. 2018), made on demand from a seed, over the perturbed axes of
    any layout: `[k, 1, *size]`.

    A binary grid of `cell` cells per axis, entries ~ Bernoulli(p), is upsampled (linearly,
    bilinearly or trilinearly: 1, 2 or 3 axes) to `(cell+1) * ceil(L/cell)` per axis
    (align_corners=False), shifted by a random offset in `[0, ceil(L/cell))` per axis and cropped
    to `size`. `cell=None`: no smoothing, one Bernoulli(p) draw per position (a feature vector's
    features). The tiny grids and shifts of all N masks are drawn up front (so the masks do not
    depend on the chunk size); the full-size masks are only ever built for the rows of one chunk.
    """

    def __init__(self, n: int, cell, p: float, size: tuple[int, ...], seed, device="cpu"):
        self.n, self.p, self.size = n, p, tuple(size)
        self.cells = None if cell is None else (tuple(cell) if isinstance(cell, (tuple, list))
                                                else (int(cell),) * len(self.size))
        self.cell = cell
        g = generator(seed)
        grid = self.size if self.cells is None else self.cells
        self.grids = (torch.rand(n, 1, *grid, generator=g) < p).float().to(device)
        if self.cells is not None:
            self.step = tuple(int(math.ceil(length / c)) for length, c in zip(self.size, self.cells))
            # per axis, the N shifts, kept on the device with the grids: a chunk's crops are one gather
            # there (no per-chunk copy of the indices to the host, no loop over the chunk's rows)
            self.shifts = [torch.randint(0, st, (n,), generator=g).to(device) for st in self.step]

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        """Masks for the given mask indices: [k,1,*size] in [0,1]."""
        index = index.to(self.grids.device)
        if self.cells is None:
            return self.grids[index]
        d = len(self.size)
        up = tuple((c + 1) * st for c, st in zip(self.cells, self.step))
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[d]
        big = F.interpolate(self.grids[index], size=up, mode=mode, align_corners=False).clamp_(0, 1)
        k = len(index)
        # row r's crop along axis a covers shift_a[index[r]] .. + size[a]; indices broadcast to [k, *size]
        where = [torch.arange(k, device=big.device).view(k, *[1] * d)]
        for a, (sh, length) in enumerate(zip(self.shifts, self.size)):
            along = [1] * (d + 1)
            along[a + 1] = length
            where.append(sh[index].view(k, *[1] * d) + torch.arange(length, device=big.device).view(along))
        return big[where[0], 0, *where[1:]].unsqueeze(1)


def _labels(segments, shape: tuple[int, ...], b: int, what: str, axes: str, device) -> torch.Tensor:
    """Integer labels given as one map `shape` (shared by the batch) or one per example `(B, *shape)`."""
    seg = torch.as_tensor(segments)
    if seg.is_floating_point() or seg.dtype == torch.bool:
        raise SaliencyError(f"segments must be integer labels, got dtype {seg.dtype}")
    if tuple(seg.shape) == shape:
        seg = seg.unsqueeze(0).expand(b, *shape)
    if tuple(seg.shape) != (b, *shape):
        raise SaliencyError(f"segments of a {what} must have shape ({axes}) = {shape} or (B, {axes}) = {(b, *shape)}, "
                            f"got {tuple(seg.shape)}")
    return seg.to(device).long()


def volume_segments(x: torch.Tensor, n_segments, compactness, segments, subject=None,
                    layout: str = "BCDHW") -> tuple[torch.Tensor, list[int]]:
    """[B,D,H,W] (a clip: [B,T,H,W]) labels 0..M_b-1 of supervoxels and the M_b: LIME's and
    KernelSHAP's features on a volume [B,C,D,H,W] or a clip [B,T,C,H,W]. SLIC (scikit-image) on
    each volume min-max scaled to [0,1], or on each clip's pixels (unnormalised, in [0,1]), with
    the channels as SLIC's channel axis (one channel: `channel_axis=None`); or the given labels,
    [D,H,W] / [B,D,H,W] ([T,H,W] / [B,T,H,W])."""
    ca = channel_axis(layout)
    shape, _ = perturbed_axes(x, layout)
    b, what, axes = x.shape[0], NOUNS[layout], ("T, H, W" if layout == "BTCHW" else "D, H, W")
    if segments is not None:
        return _consecutive(_labels(segments, shape, b, what, axes, x.device))
    from skimage.segmentation import slic

    n_segments = positive_int(n_segments, "n_segments", 2)
    vals = x.detach().double()
    if layout == "BTCHW" and subject is not None:
        vals = subject.unnormalize(vals)
    else:
        lo = vals.flatten(1).amin(1).view(b, *[1] * (x.dim() - 1))
        hi = vals.flatten(1).amax(1).view(b, *[1] * (x.dim() - 1))
        vals = (vals - lo) / (hi - lo).clamp_min(1e-12)
    vols = vals.movedim(ca, -1).cpu().numpy()                                 # [B, *axes, C]
    one = vols.shape[-1] == 1
    seg = torch.stack([torch.from_numpy(np.asarray(slic(v[..., 0] if one else v, n_segments=n_segments,
                                                        compactness=compactness, start_label=0,
                                                        channel_axis=None if one else -1))).long()
                       for v in vols]).to(x.device)
    return _consecutive(seg, f"SLIC found a single supervoxel in a {what} (one without regions); pass "
                             f"segments= (a [{axes.replace(' ', '')}] label map of {shape}, e.g. blocks)")


def feature_segments(x: torch.Tensor, segments) -> tuple[torch.Tensor, list[int]]:
    """[B,F] labels of a feature vector's segments: each feature alone, or the groups given as
    [F] / [B,F] integer labels (features with the same label are switched on and off together)."""
    b, f = x.shape
    if segments is None:
        return _consecutive(torch.arange(f, device=x.device).expand(b, f))
    return _consecutive(_labels(segments, (f,), b, "feature vector", "F", x.device))
