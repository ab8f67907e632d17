"""How much each concept of a bank matters to a prediction, two estimates side by side:

* **Sobol total-order indices** (CRAFT's estimator): each concept's coefficients over the whole
  layer are scaled by a mask value m_k in [0, 1]; the activation becomes
  `sum_k m_k u_k W_k + r` (r = the part of the activation the bank does not explain, so m = 1 is
  the model's own activation), the rest of the model runs on it, and the variance of the target's
  score over a scrambled Sobol design (seeded) is split by Jansen's estimator:
  `ST_k = E[(f(A) - f(A_B^k))^2] / (2 Var f)`. N design rows cost N (k + 2) forward rows per image, plus one clean pass (the logits and the
  activations together) and one forward and backward for the gradient
  (default 256: the design's own error on a linear score is then below 1e-6; 64 rows give +- 0.06).
* **Gradient x coefficient**: `d f / d m_k` at m = 1, i.e. the concept's coefficients times the
  gradient of the score along its direction, summed over the layer (one forward and backward).

Both run through the engine: the masked forwards are a model view `m -> logits` handed to
`engine.forward_scores` (chunks, pass counting), the gradient through `engine.gradient_pass`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SaliencyError, positive_int
from ..hooks import forward_replacing
from .bank import ConceptBank, decompose, layer_activations


class ConceptIntervention(nn.Module):
    """`m [n, k] -> logits [n, K]`: the model on one image whose activation at the bank's layer
    is rebuilt from concept coefficients scaled by m (plus the unexplained residual)."""

    def __init__(self, model: nn.Module, layer: str, x: torch.Tensor, U: torch.Tensor, W: torch.Tensor,
                 residual: torch.Tensor):
        super().__init__()
        self.model, self.layer = model, layer
        self.register_buffer("x", x, persistent=False)                 # [1,C_in,H,W]
        self.register_buffer("U", U, persistent=False)                 # [k,h,w]
        self.register_buffer("W", W, persistent=False)                 # [k,C]
        self.register_buffer("residual", residual, persistent=False)   # [C,h,w]

    def forward(self, m):
        m = m.to(self.U)
        n = m.shape[0]
        act = torch.einsum("nk,khw,kc->nchw", m, self.U, self.W) + self.residual

        # a module called more than once per forward (EfficientNet's shared `_swish`) is replaced
        # at the call whose output is the bank's activation, the one the bank was made from
        out = forward_replacing(self.model, self.layer, self.x.expand(n, *self.x.shape[1:]), act)
        from ..subject import extract_logits

        return extract_logits(out)


@dataclass
class ConceptImportance:
    """`sobol` and `gradient_x_coefficient` are [B, k]; `ranking` orders the concepts by the mean
    Sobol index over images (most important first)."""

    sobol: torch.Tensor
    gradient_x_coefficient: torch.Tensor
    coefficients: torch.Tensor
    target: list
    seed: int
    n: int
    passes: dict = field(default_factory=dict)
    tcav: torch.Tensor | None = None              # [k] with tcav=True: bank directions as CAVs (concepts.tcav)
    directional_derivative: torch.Tensor | None = None   # [B, k] the derivatives TCAV counts

    @property
    def ranking(self) -> list[int]:
        return torch.argsort(self.sobol.mean(0), descending=True, stable=True).tolist()


def decomposed(subject, bank: ConceptBank, x: torch.Tensor, target, batch_size, counter):
    """One clean pass for the logits (which fix the target) and the layer's activations, and one
    NNLS of every image on the bank: -> (activations, resolved target, coefficients [B,k,h,w])."""
    from ..targets import as_target

    acts, logits = layer_activations(subject, x, bank.layer, batch_size or 32, counter, with_logits=True)
    resolved = as_target(target).resolve(subject, logits)
    U_all, _ = decompose(acts, bank)               # refuses a bank of another layer
    return acts, resolved, U_all


def intervention_view(subject, bank: ConceptBank, x: torch.Tensor, acts: torch.Tensor, U_all: torch.Tensor, b: int):
    """(a Subject view `m [n,k] -> logits` of image b with its concepts scaled by m, its coefficients
    u [k,h,w]); the residual `a - u W` keeps m = 1 the model's own activation."""
    u = U_all[b].to(x.device)
    Wt = bank.basis.to(x.device)
    residual = acts[b].to(x.device) - torch.einsum("khw,kc->chw", u, Wt)
    return _view(subject, ConceptIntervention(subject.model, bank.layer, x[b:b + 1], u, Wt, residual)), u


def _view(subject, module: nn.Module):
    from .target import model_view

    return model_view(subject, module, "concept-masks")


def importance(subject, bank: ConceptBank, x: torch.Tensor, target=None, n: int = 256, seed: int | None = 0,
               batch_size: int | None = None, tcav: bool = False) -> ConceptImportance:
    """Sobol total-order indices and gradient x coefficient of every concept of `bank` for the
    target (default: each image's top-1 class) of each image of `x`; with `tcav=True` also the
    TCAV score of each bank direction over the images (`concepts.tcav.bank_tcav`: one more forward
    and backward per image)."""
    from scipy.stats import qmc

    from ..engine import PassCounter, forward_scores, gradient_pass

    if not isinstance(bank, ConceptBank):
        raise SaliencyError(f"importance needs a ConceptBank, got {type(bank).__name__}")
    n = positive_int(n, "n")
    if n & (n - 1):
        raise SaliencyError(f"n must be a power of two for the Sobol design (16, 32, 64, ...), got {n}")
    if seed is None:
        import secrets

        seed = secrets.randbelow(2**31)
    x = subject.check_input(x)
    B, k = x.shape[0], bank.n_concepts
    counter = PassCounter()
    acts, resolved, U_all = decomposed(subject, bank, x, target, batch_size, counter)
    design = torch.from_numpy(qmc.Sobol(d=2 * k, scramble=True, seed=int(seed)).random(n)).float()
    A, Bm = design[:, :k], design[:, k:]
    rows = [A, Bm] + [torch.where(torch.arange(k) == i, Bm, A) for i in range(k)]
    masks = torch.cat(rows).to(x.device)                                   # [(k+2) n, k]
    sobol = torch.zeros(B, k)
    gxc = torch.zeros(B, k)
    coefs = torch.zeros(B, k)
    for b in range(B):
        view, u = intervention_view(subject, bank, x, acts, U_all, b)
        coefs[b] = u.mean((1, 2)).cpu()
        one = _single(resolved, b)
        with subject.explaining():
            f = forward_scores(view, lambda s, e: masks[s:e], masks.shape[0], one,
                               lambda s, e: torch.zeros(e - s, dtype=torch.long, device=x.device),
                               batch_size=batch_size, counter=counter).double().cpu()
            fA, fB = f[:n], f[n:2 * n]
            var = torch.cat([fA, fB]).var(unbiased=False)
            for i in range(k):
                fAB = f[(2 + i) * n:(3 + i) * n]
                sobol[b, i] = float(((fA - fAB) ** 2).mean() / (2 * var)) if var > 0 else 0.0
            g = gradient_pass(view, torch.ones(1, k, device=x.device), one, counter=counter)
        gxc[b] = g.input_grad[0].float().cpu()
    scores = deriv = None
    if tcav:
        from .tcav import bank_tcav

        scores, deriv = bank_tcav(subject, bank, x, resolved, batch_size, counter)
    return ConceptImportance(sobol, gxc, coefs, resolved.describe(), int(seed), n,
                             counter.per_image(B), scores, deriv)


def _single(resolved, b: int):
    """The resolved target of example `b` alone (a one-example ResolvedTarget)."""
    from ..targets import ResolvedTarget

    return ResolvedTarget([resolved.pos[b]], [resolved.neg[b]], resolved.output, resolved.kind)


__all__ = ["importance", "ConceptImportance", "ConceptIntervention", "decomposed", "intervention_view"]
