"""Post-hoc prototypes ("this looks like that" on a pretrained network, in the manner of EPIC):
the parts of an image that drive its prediction, each shown beside the reference patches that
look most like it to the model.

1. The query's relevance at `layer` (Grad-CAM by default, through `sk.explain`, at the layer's
   resolution) gives the `n_regions` most relevant cells of the layer's grid.
2. Every reference image's features at `layer` ([C, h, w], one forward per image) are compared to
   each region's feature vector by cosine similarity; each reference image contributes its most
   similar cell, and the `k` most similar images are the region's matches (so the k patches come
   from k different images).
3. A cell is shown as a box: its share of the image widened to `context` times its side, about
   its centre, inside the image (the receptive field of a deep cell is larger still; the box is
   where the cell sits, not all it sees).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import SaliencyError, positive_float, positive_int


@dataclass
class Prototypes:
    """`regions` [(row, col)] of the query's grid, most relevant first; per region `similarity`
    [n_regions, k], the `indices` [n_regions, k] of the matching reference images, their `cells`
    and input-pixel `boxes` [n_regions, k, 4] (left, top, right, bottom); `region_boxes` the
    query's boxes; `relevance` [h, w] the layer-resolution map the regions came from."""

    regions: list
    region_boxes: list
    similarity: torch.Tensor
    indices: torch.Tensor
    cells: list
    boxes: torch.Tensor
    relevance: torch.Tensor
    layer: str
    grid: tuple
    target: list
    method: str
    passes: dict
    extras: dict = field(default_factory=dict)
    _pictures: tuple = field(default=None, repr=False)   # (subject, query [1,3,H,W], reference [N,3,H,W])

    def __repr__(self):
        return (f"Prototypes({len(self.regions)} region(s) x {self.similarity.shape[1]} match(es) at {self.layer} "
                f"{self.grid[0]}x{self.grid[1]}, best similarity {float(self.similarity.max()):.3f})")

    def describe(self) -> list[str]:
        """One line per region: "region 1 (row, col) looks like reference 4 (0.93), 7 (0.88), ..."."""
        out = []
        for n, cell in enumerate(self.regions):
            matches = ", ".join(f"{int(i)} ({float(s):.2f})" for i, s in zip(self.indices[n], self.similarity[n]))
            out.append(f"region {n + 1} {cell} looks like reference {matches}")
        return out

    def image(self, patch: int = 96):
        """The query with its numbered regions, then one row per region: the region's patch and its
        k matched reference patches, each captioned with its similarity. A PIL image."""
        from PIL import Image

        from .pictures import PALETTE, draw_box, photo, side_by_side, stacked

        subject, x, ref = self._pictures
        q, scale = photo(subject, x)
        for n, box in enumerate(self.region_boxes):
            draw_box(q, box, PALETTE[n % len(PALETTE)], str(n + 1), scale)

        def crop(img_t, box):
            pic, s = photo(subject, img_t, min_side=1)
            l_, t, r, b = (int(round(v * s)) for v in box)
            return pic.crop((l_, t, max(r, l_ + 1), max(b, t + 1))).resize((patch, patch), Image.BILINEAR)

        rows = [side_by_side([q], captions=[f"query ({', '.join(t.get('name', '') for t in self.target)})"])]
        for n, box in enumerate(self.region_boxes):
            tiles = [crop(x, box)] + [crop(ref[int(i)], tuple(self.boxes[n, m].tolist()))
                                      for m, i in enumerate(self.indices[n])]
            caps = [f"region {n + 1}"] + [f"ref {int(i)}: {float(s):.2f}" for i, s in
                                          zip(self.indices[n], self.similarity[n])]
            rows.append(side_by_side(tiles, captions=caps))
        return stacked(rows)

    figure = image


def context_box(cell, grid, size, context: float) -> tuple[float, float, float, float]:
    """The cell's box widened `context` times about its centre, shifted to lie inside the image."""
    from .pictures import cell_box

    l_, t, r, b = cell_box(cell, grid, size)
    H, W = size
    bw, bh = min(W, (r - l_) * context), min(H, (b - t) * context)
    cx, cy = (l_ + r) / 2, (t + b) / 2
    left = min(max(0.0, cx - bw / 2), W - bw)
    top = min(max(0.0, cy - bh / 2), H - bh)
    return (left, top, left + bw, top + bh)


def check_normalised(subject, x: torch.Tensor, what: str) -> None:
    """Refuse an input whose values, taken back to pixels, are clearly not in [0, 1] (raw 0-255
    values, or an input normalised twice or with other statistics)."""
    mean = torch.tensor(subject.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(subject.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    pixels = x * std + mean
    outside = float(((pixels < -0.25) | (pixels > 1.25)).float().mean())
    if outside > 0.01:
        lo, hi = float(x.min()), float(x.max())
        raise SaliencyError(f"the {what} has values {lo:.3g}..{hi:.3g}: {outside:.0%} of them lie outside the model's "
                            "normalised range (pixels 0..1 after mean/std); make it with subject.preprocess "
                            "like the query, not from raw 0-255 values or other statistics")


def prototypes(subject, image, reference, layer="auto", k: int = 3, n_regions: int = 3, target=None,
               method: str = "gradcam", context: float = 2.0, batch_size: int = 32) -> Prototypes:
    """For the regions of `image` that drive the prediction (of `target`, default the top-1 class),
    the `k` reference patches whose features at `layer` are most similar (see the module docstring).
    `reference` is a [N,3,H,W] input tensor made like the query, or any dataset source."""
    from ..engine import PassCounter
    from ..methods import explain
    from .bank import _as_input, layer_activations

    k, n_regions = positive_int(k, "k"), positive_int(n_regions, "n_regions")
    context = positive_float(context, "context")
    x = image if isinstance(image, torch.Tensor) else subject.preprocess(image)
    x = subject.check_input(x)
    if x.shape[0] != 1:
        raise SaliencyError(f"prototypes explain one image ([1,3,H,W]), got a batch of {x.shape[0]}")
    if isinstance(reference, torch.Tensor) and (reference.dim() == 0 or reference.shape[0] == 0):
        raise SaliencyError("the reference set is empty: give [N,3,H,W] images (N >= 1) or a dataset source")
    ref = _as_input(subject, reference)
    if ref.shape[-2:] != x.shape[-2:]:
        raise SaliencyError(f"the reference images are {tuple(ref.shape[-2:])} and the query {tuple(x.shape[-2:])}: "
                            "make both with subject.preprocess (one input size) so their feature grids match")
    check_normalised(subject, x, "query")
    check_normalised(subject, ref, "reference set")
    name = subject.find_layer(layer, x)[0]
    exp = explain(subject, x, method, target=target, layer=name)
    if exp.raw is None:
        raise SaliencyError(f"method {method!r} gives no layer-resolution map: use a CAM method (gradcam, ...)")
    counter = PassCounter()
    q = layer_activations(subject, x, name, counter=counter)[0]                            # [C, h, w]
    acts = layer_activations(subject, ref, name, batch_size=batch_size, counter=counter)   # [N, C, h, w]
    C, h, w = q.shape
    if tuple(exp.raw.shape[-2:]) != (h, w):
        raise SaliencyError(f"the relevance map is {tuple(exp.raw.shape[-2:])}, layer {name!r} {(h, w)}")
    N = acts.shape[0]
    k = min(k, N)
    n_regions = min(n_regions, h * w)
    relevance = exp.raw[0]
    top = torch.argsort(relevance.flatten(), descending=True, stable=True)[:n_regions].tolist()
    regions = [(i // w, i % w) for i in top]
    refs = torch.nn.functional.normalize(acts.double().flatten(2), dim=1)                 # [N, C, hw]
    size = tuple(x.shape[-2:])
    sims, idx, cells, boxes = [], [], [], []
    for r, c in regions:
        v = torch.nn.functional.normalize(q[:, r, c].double(), dim=0)
        cos = torch.einsum("c,nch->nh", v, refs)                                            # [N, hw]
        best, where = cos.max(1)                                                             # each image's best cell
        order = torch.argsort(best, descending=True, stable=True)[:k]
        sims.append(best[order].float())
        idx.append(order)
        row_cells = [(int(where[i]) // w, int(where[i]) % w) for i in order]
        cells.append(row_cells)
        boxes.append(torch.tensor([context_box(cell, (h, w), size, context) for cell in row_cells]))
    passes = {"forward": float(exp.passes.get("forward", 0)) + counter.forward,
              "backward": float(exp.passes.get("backward", 0)) + counter.backward}
    return Prototypes(regions=regions, region_boxes=[context_box(cell, (h, w), size, context) for cell in regions],
                      similarity=torch.stack(sims), indices=torch.stack(idx), cells=cells, boxes=torch.stack(boxes),
                      relevance=relevance, layer=name, grid=(h, w), target=exp.target, method=method, passes=passes,
                      extras={"references": N, "context": context},
                      _pictures=(subject, x.detach().cpu(), ref.detach().cpu()))


__all__ = ["prototypes", "Prototypes", "context_box", "check_normalised"]
