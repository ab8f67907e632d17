"""Counterfactual visual explanations (Goyal et al. 2019): which cells of a distractor image,
swapped into the query's feature map, turn the prediction into the distractor's class.

The model is split at a spatial layer: `f(x)` is that layer's output `[C, h, w]`, `g` the rest of
the forward (run by replacing the layer's output with a hook, so any architecture works, not only
`nn.Sequential`; the layers before it still run on the query, their result is discarded). With
query I (predicted c) and distractor I' (predicted c' != c), an edit replaces query cell i of f(I)
by distractor cell j of f(I'). The explanation is the smallest set of edits after which
argmax g(edited) = c'.

* `method="greedy"` (the paper's exhaustive best-edit search): at each step every pair (i, j) of
  a query cell not yet edited and a distractor cell not yet used is tried, the one with the highest
  log p(c') is kept, until the prediction flips. Step t costs (hw - t)^2 forwards of g, batched
  through the engine's runner (`engine.forward_scores`).
* `method="relaxed"` (the paper's continuous relaxation): a gate a in [0,1]^{hw} over query cells
  (a sigmoid) and a row-stochastic matrix P over distractor cells (a row softmax); the edited map
  is `(1 - a) * f(I) + a * (P f(I'))`; Adam maximises `log p(c') - lam * sum(a)`. It is then
  rounded greedily: query cells by decreasing gate, each taking its highest-P distractor cell not
  taken yet, and the shortest prefix of that order that flips the prediction is the answer (all
  prefixes in one batched run).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SaliencyError, positive_float, positive_int, resolve_seed
from ..hooks import forward_replacing

METHODS = ("greedy", "relaxed")


class FeatureHead(nn.Module):
    """`g`: feature maps [n, C, h, w] at `layer` -> the model's output, by running `model` on the
    query `x` with the layer's output replaced by the given maps."""

    def __init__(self, model: nn.Module, layer: str, x: torch.Tensor):
        super().__init__()
        self.model, self.layer = model, layer
        self.register_buffer("x", x, persistent=False)   # [1, C_in, H, W]

    def forward(self, feats):
        out = forward_replacing(self.model, self.layer, self.x.expand(feats.shape[0], *self.x.shape[1:]), feats)
        from ..subject import extract_logits

        return extract_logits(out)


@dataclass
class Counterfactual:
    """The result: `cells` is the list of swaps `((query row, col), (distractor row, col))` in the
    order they were chosen; `edited` the edited feature map [C, h, w] that `predicted_after` was
    read from; `probs_*` are the class probabilities [K] of the query before and after."""

    n_edits: int
    cells: list
    query_class: int
    distractor_class: int
    predicted_after: int
    probs_before: torch.Tensor
    probs_after: torch.Tensor
    flipped: bool
    edited: torch.Tensor
    layer: str
    grid: tuple
    method: str
    seed: int
    passes: dict
    labels: dict = field(default_factory=dict)       # class index -> name, for the picture
    extras: dict = field(default_factory=dict)
    _pictures: tuple = field(default=None, repr=False)   # (query PIL, distractor PIL, scale, input size)

    def __repr__(self):
        state = "flips" if self.flipped else "does not flip"
        return (f"Counterfactual({self.method}, {self.n_edits} edit(s) at {self.layer} {self.grid[0]}x{self.grid[1]}, "
                f"{self.query_class} -> {self.predicted_after} ({state} to {self.distractor_class}))")

    def image(self):
        """The query and the distractor side by side, each swapped pair as two boxes of one colour
        with the same number (1 = the first edit chosen). A PIL image."""
        from .pictures import PALETTE, cell_box, draw_box, side_by_side

        q, d, scale, size = self._pictures
        q, d = q.copy(), d.copy()
        for n, (qi, dj) in enumerate(self.cells):
            colour = PALETTE[n % len(PALETTE)]
            draw_box(q, cell_box(qi, self.grid, size), colour, str(n + 1), scale)
            draw_box(d, cell_box(dj, self.grid, size), colour, str(n + 1), scale)
        name = self.labels.get
        p_after = float(self.probs_after[self.distractor_class])
        return side_by_side([q, d], captions=[
            f"query: {name(self.query_class)}\nafter {self.n_edits} edit(s): {name(self.predicted_after)}",
            f"distractor: {name(self.distractor_class)}\np({name(self.distractor_class)}) after the edits: {p_after:.2f}"])

    figure = image

    def save(self, path):
        """The picture as a file (written whole or not at all)."""
        from ..files import atomic_write

        img = self.image()
        return atomic_write(path, lambda tmp: img.save(tmp, format=_format_of(path)))


def _format_of(path) -> str:
    suffix = str(path).rsplit(".", 1)[-1].lower()
    return {"jpg": "JPEG", "jpeg": "JPEG"}.get(suffix, "PNG")


def _one(subject, x, what):
    if not isinstance(x, torch.Tensor):
        x = subject.preprocess(x)
    x = subject.check_input(x)
    if x.shape[0] != 1:
        raise SaliencyError(f"the {what} must be one image ([1,3,H,W]), got a batch of {x.shape[0]}")
    return x


def _view(subject, head: nn.Module):
    from .target import model_view

    return model_view(subject, head, "head")


def counterfactual(subject, query, distractor, layer="auto", method: str = "greedy", max_edits: int | None = None,
                   steps: int = 200, lr: float = 0.1, sparsity: float = 0.05, seed: int | None = 0,
                   batch_size: int | None = None, progress: bool = False) -> Counterfactual:
    """The fewest distractor-cell swaps into the query's feature map at `layer` that make the model
    predict the distractor's class (see the module docstring). `query` and `distractor` are one
    image each (a [1,3,H,W] input or a photo); `max_edits` bounds the search (default: every cell);
    `steps`, `lr`, `sparsity` (lam) and `seed` are the relaxed method's."""
    from ..engine import PassCounter
    from ..targets import Class
    from .bank import layer_activations

    if method not in METHODS:
        raise SaliencyError(f"unknown counterfactual method {method!r}; available: {', '.join(METHODS)}")
    seed = resolve_seed(seed)
    x, xd = _one(subject, query, "query"), _one(subject, distractor, "distractor")
    if x.shape != xd.shape:
        raise SaliencyError(f"the query is {tuple(x.shape[1:])} and the distractor {tuple(xd.shape[1:])}: their "
                            "feature maps must have the same grid; preprocess both to one input size")
    name = subject.find_layer(layer, x)[0]
    counter = PassCounter()
    acts, logits = layer_activations(subject, torch.cat([x, xd]), name, counter=counter, with_logits=True)
    c, c2 = (int(i) for i in logits.argmax(1))
    if c == c2:
        raise SaliencyError(f"the query and the distractor are both predicted {subject.label(c)!r}: a counterfactual "
                            "needs a distractor the model puts in another class")
    C, h, w = acts.shape[1:]
    hw = h * w
    limit = hw if max_edits is None else min(positive_int(max_edits, "max_edits"), hw)
    f = acts[0].reshape(C, hw).to(x.device, x.dtype)
    fd = acts[1].reshape(C, hw).to(x.device, x.dtype)
    view = _view(subject, FeatureHead(subject.model, name, x))
    target = Class(c2, output="log_prob").resolve(view, logits[1:2])
    with subject.explaining():
        if batch_size is None:   # rows of g per chunk that fit memory (one probe forward, not a pass)
            from ..engine import auto_batch

            batch_size = auto_batch(view, (1, C, h, w), grad=False, rows=hw * hw)
        else:
            batch_size = positive_int(batch_size, "batch_size")
        if method == "greedy":
            cells, edited = _greedy(view, f, fd, c2, target, (C, h, w), limit, batch_size, counter, progress)
        else:
            positive_int(steps, "steps")
            cells, edited, extras = _relaxed(view, f, fd, c2, target, (C, h, w), limit, int(steps),
                                             positive_float(lr, "lr"), float(sparsity), seed, batch_size, counter,
                                             progress)
        with torch.no_grad():   # what the reported map gives, read again from the head
            after = view.forward(edited.reshape(1, C, h, w)).float()[0]
        counter.add(forward=1)
    probs_after = after.softmax(-1).cpu()
    grid = lambda k: (k // w, k % w)   # noqa: E731
    pairs = [(grid(i), grid(j)) for i, j in cells]
    from .pictures import photo

    qpic, scale = photo(subject, x)
    dpic, _ = photo(subject, xd)
    labels = {k: subject.label(k) for k in {c, c2, int(after.argmax())}}
    return Counterfactual(n_edits=len(pairs), cells=pairs, query_class=c, distractor_class=c2,
                          predicted_after=int(after.argmax()), probs_before=logits[0].float().softmax(-1).cpu(),
                          probs_after=probs_after, flipped=int(after.argmax()) == c2,
                          edited=edited.reshape(C, h, w).detach().cpu(), layer=name, grid=(h, w), method=method,
                          seed=seed, passes=counter.per_image(1), labels=labels,
                          extras=extras if method == "relaxed" else {},
                          _pictures=(qpic, dpic, scale, tuple(x.shape[-2:])))


def _greedy(view, f, fd, c2, target, shape, limit, batch_size, counter, progress):
    """Exhaustive best-edit search: returns ([(query cell, distractor cell)], the edited map [C, hw])."""
    from ..engine import Progress, forward_scores

    C, h, w = shape
    cur = f.clone()
    free_q, free_d = list(range(h * w)), list(range(h * w))
    cells = []
    with Progress(limit, "counterfactual", enabled=progress, unit="edit") as bar:
        while len(cells) < limit:
            q_idx, d_idx = torch.tensor(free_q), torch.tensor(free_d)
            nd = len(free_d)
            n = len(free_q) * nd
            predicted = torch.empty(n, dtype=torch.long)

            def make(start, stop):
                k = torch.arange(start, stop)
                qi, dj = q_idx[k // nd], d_idx[k % nd]
                feats = cur.unsqueeze(0).repeat(stop - start, 1, 1)
                feats[torch.arange(stop - start), :, qi] = fd[:, dj].T
                return feats.reshape(-1, C, h, w)

            def keep(start, stop, logits, _scores):
                predicted[start:stop] = logits.argmax(1).cpu()

            scores = forward_scores(view, make, n, target, lambda s, e: torch.zeros(e - s, dtype=torch.long),
                                    batch_size=batch_size, counter=counter, on_chunk=keep)
            best = int(torch.argmax(scores))   # the first of equal scores: deterministic
            i, j = free_q[best // nd], free_d[best % nd]
            cur[:, i] = fd[:, j]
            cells.append((i, j))
            free_q.remove(i)
            free_d.remove(j)
            bar.step()
            if int(predicted[best]) == c2:
                break
    return cells, cur


def _relaxed(view, f, fd, c2, target, shape, limit, steps, lr, sparsity, seed, batch_size, counter, progress):
    """The continuous relaxation, optimised with Adam, then rounded greedily (module docstring)."""
    from ..engine import Progress, forward_scores, gradient_pass

    C, h, w = shape
    hw = h * w
    g = torch.Generator().manual_seed(seed)
    gate = torch.full((hw,), -2.0).to(f).requires_grad_(True)                            # a = sigmoid(gate)
    perm = (0.01 * torch.randn(hw, hw, generator=g)).to(f).requires_grad_(True)          # P = softmax(perm, rows)
    opt = torch.optim.Adam([gate, perm], lr=lr)
    trace = []
    with Progress(steps, "counterfactual (relaxed)", enabled=progress, unit="step") as bar:
        for _ in range(steps):
            with torch.enable_grad():
                a = torch.sigmoid(gate)
                P = torch.softmax(perm, dim=1)
                edited = (1 - a) * f + a * (fd @ P.T)               # [C, hw]: query cell i takes sum_j P_ij fd_j
                res = gradient_pass(view, edited.detach().reshape(1, C, h, w), target, counter=counter)
                opt.zero_grad()
                # d(-log p(c'))/d(edited) from the engine's pass, chained through the small graph by hand
                torch.autograd.backward([edited.reshape(1, C, h, w), sparsity * a.sum()],
                                        [-res.input_grad.to(edited), torch.ones((), dtype=f.dtype, device=f.device)])
                opt.step()
            trace.append(float(res.scores[0]))
            bar.step()
    with torch.no_grad():
        a, P = torch.sigmoid(gate), torch.softmax(perm, dim=1)
    order = torch.argsort(a, descending=True, stable=True).tolist()
    taken, cells = set(), []
    for i in order[:limit]:
        j = next(int(j) for j in torch.argsort(P[i], descending=True, stable=True).tolist() if int(j) not in taken)
        taken.add(j)
        cells.append((i, j))
    n = len(cells)
    predicted = torch.empty(n, dtype=torch.long)

    def prefix(start, stop):
        out = f.unsqueeze(0).repeat(stop - start, 1, 1)
        for r, length in enumerate(range(start + 1, stop + 1)):
            qi = torch.tensor([i for i, _ in cells[:length]])
            dj = torch.tensor([j for _, j in cells[:length]])
            out[r][:, qi] = fd[:, dj]
        return out.reshape(-1, C, h, w)

    def keep(start, stop, logits, _scores):
        predicted[start:stop] = logits.argmax(1).cpu()

    forward_scores(view, prefix, n, target, lambda s, e: torch.zeros(e - s, dtype=torch.long),
                   batch_size=batch_size, counter=counter, on_chunk=keep)
    hits = torch.nonzero(predicted == c2).flatten()
    k = int(hits[0]) + 1 if len(hits) else n
    cells = cells[:k]
    edited = f.clone()
    for i, j in cells:
        edited[:, i] = fd[:, j]
    extras = {"log_prob_trace": trace, "gate": a.cpu().reshape(h, w), "steps": steps, "lr": lr, "sparsity": sparsity}
    return cells, edited, extras


__all__ = ["counterfactual", "Counterfactual", "FeatureHead"]
