"""Ranking fidelity: does a concept ranking (from Sobol, TCAV or gradient x coefficient) order the
concepts by what the model needs? Concept deletion and insertion curves (CRAFT, Fel et al. 2023).

For each image the layer's activation is decomposed on the bank, `a = sum_k u_k W_k + r` (NNLS;
`r` the part the bank does not explain), and rebuilt with the coefficients of some concepts set
to zero (`importance.ConceptIntervention`, the same model view the Sobol estimator runs):
  * deletion: step j = 0..k removes the first j concepts of the ranking (j = 0 is the model's own
    score, j = k leaves only the residual);
  * insertion: step j keeps only the first j concepts (j = 0 is the residual alone, j = k the
    model's own score).
The curves are the target's score at each step; their area is the trapezoid mean over j / k in
[0, 1]. A good ranking has a LOW deletion area (the score falls fast) and a HIGH insertion area.
The same curves for `n_random` random rankings (seeded) give the reference a ranking must beat.
Cost: (k + 1) forward rows per curve and image, plus the clean pass; all through
`engine.forward_scores`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import SaliencyError, resolve_seed
from .bank import ConceptBank


@dataclass
class RankingFidelity:
    """`deletion` / `insertion` [B, k+1] curves of the ranking; `*_area` [B]; `random_*_area` [B]
    the mean area over the random rankings; `rankings` [B, k] the ranking used per image."""

    deletion: torch.Tensor
    insertion: torch.Tensor
    deletion_area: torch.Tensor
    insertion_area: torch.Tensor
    random_deletion_area: torch.Tensor
    random_insertion_area: torch.Tensor
    rankings: torch.Tensor
    target: list
    seed: int
    n_random: int
    passes: dict = field(default_factory=dict)

    @property
    def beats_random(self) -> torch.Tensor:
        """[B] bool: deletion area below and insertion area above the random rankings' mean."""
        return (self.deletion_area < self.random_deletion_area) & (self.insertion_area > self.random_insertion_area)


def area(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid mean of curves [..., n+1] sampled at 0, 1/n, ..., 1."""
    return (curve[..., 1:] + curve[..., :-1]).sum(-1) / (2 * (curve.shape[-1] - 1))


def step_masks(order: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion masks [(k+1), k] for one ranking `order` [k]: row j removes (keeps)
    the first j concepts of the order."""
    rank = torch.empty(k, dtype=torch.long)
    rank[order] = torch.arange(k)
    j = torch.arange(k + 1).view(-1, 1)
    inserted = (rank.view(1, -1) < j).float()
    return 1 - inserted, inserted


def _rankings(ranking, B: int, k: int) -> torch.Tensor:
    if isinstance(ranking, str):
        raise SaliencyError("pass the ranking itself (a list of concept indices, or [B, k]); from an importance "
                            "result: ranking_from(result, 'sobol'|'gradient'|'tcav')")
    r = torch.as_tensor(ranking, dtype=torch.long)
    if r.dim() == 1:
        r = r.expand(B, -1)
    if r.shape != (B, k) or not all(sorted(row.tolist()) == list(range(k)) for row in r):
        raise SaliencyError(f"a ranking must order all {k} concepts of the bank (a permutation of 0..{k - 1}, "
                            f"one for all images or one per image), got shape {tuple(r.shape)}")
    return r


def ranking_from(result, by: str = "sobol") -> torch.Tensor:
    """[B, k] per-image rankings (most important first) from a `ConceptImportance`: by "sobol",
    "gradient" (gradient x coefficient) or "tcav" (the directional derivative, needs tcav=True)."""
    values = {"sobol": result.sobol, "gradient": result.gradient_x_coefficient,
              "tcav": result.directional_derivative}.get(by)
    if values is None:
        raise SaliencyError(f"no {by!r} values in this importance result (sobol, gradient, or tcav with tcav=True)")
    return torch.argsort(values, dim=1, descending=True, stable=True)


def ranking_fidelity(subject, bank: ConceptBank, x: torch.Tensor, ranking, target=None, n_random: int = 8,
                     seed: int | None = 0, batch_size: int | None = None) -> RankingFidelity:
    """Deletion and insertion curves of `ranking` (one order of the bank's concepts, or one per
    image [B, k]) for the target (default each image's top-1 class), beside `n_random` random
    rankings. See the module docstring."""
    from ..engine import PassCounter, forward_scores
    from .importance import _single, decomposed, intervention_view

    if not isinstance(bank, ConceptBank):
        raise SaliencyError(f"ranking_fidelity needs a ConceptBank, got {type(bank).__name__}")
    seed = resolve_seed(seed)
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise SaliencyError(f"n_random must be an integer >= 0, got {n_random!r}")
    x = subject.check_input(x)
    B, k = x.shape[0], bank.n_concepts
    orders = _rankings(ranking, B, k)
    counter = PassCounter()
    acts, resolved, U_all = decomposed(subject, bank, x, target, batch_size, counter)
    g = torch.Generator().manual_seed(seed)
    randoms = [torch.randperm(k, generator=g) for _ in range(n_random)]
    dele, ins = torch.zeros(B, k + 1), torch.zeros(B, k + 1)
    rdel, rins = torch.zeros(B), torch.zeros(B)
    for b in range(B):
        view, _ = intervention_view(subject, bank, x, acts, U_all, b)
        blocks = [step_masks(o, k) for o in [orders[b]] + randoms]
        masks = torch.cat([m for pair in blocks for m in pair]).to(x.device)      # [(1 + n_random) 2 (k+1), k]
        with subject.explaining():
            f = forward_scores(view, lambda s, e: masks[s:e], masks.shape[0], _single(resolved, b),
                               lambda s, e: torch.zeros(e - s, dtype=torch.long, device=x.device),
                               batch_size=batch_size, counter=counter).float().cpu()
        curves = f.view(1 + n_random, 2, k + 1)
        dele[b], ins[b] = curves[0, 0], curves[0, 1]
        if n_random:
            rdel[b], rins[b] = area(curves[1:, 0]).mean(), area(curves[1:, 1]).mean()
        else:
            rdel[b] = rins[b] = float("nan")
    return RankingFidelity(dele, ins, area(dele), area(ins), rdel, rins, orders, resolved.describe(), seed, n_random,
                           counter.per_image(B))


__all__ = ["ranking_fidelity", "RankingFidelity", "ranking_from", "area", "step_masks"]
