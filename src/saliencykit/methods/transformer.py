"""Transformer methods: attention rollout, relevancy propagation (Chefer et al.
2021), LeGrad and TokenTM (experimental). Grad-ECLIP, which needs a CLIP subject, lives with the
CLIP task (`saliencykit.tasks.grad_eclip`).

The attention methods read the attention probabilities `A^l` `[B, heads, N, N]` of every block through
`saliencykit.tokens.AttentionTap`, which switches fused attention kernels to an explicit path for
the duration of the call (and restores them after). Maps are read from the CLS row of the token
relevance matrix (the mean over patch rows for models without prefix tokens), the prefix tokens
(CLS, distillation, registers) are dropped, the patch tokens are laid out on the patch grid of
the input (`Explanation.raw`, `[B, h, w]`) and upsampled bilinearly to the input size.
"""
from __future__ import annotations

import torch

from ..engine import upsample
from ..errors import SaliencyError
from ..tokens import AttentionTap, grid_of
from .base import Method, register
from .cam import normalize01


def _tap_forward(ctx, tap: AttentionTap, grad: bool):
    """One forward of the context's input with the tap recording; returns logits."""
    tap.clear()
    if grad:
        with torch.enable_grad():
            logits = ctx.subject.forward(ctx.x.detach().clone().requires_grad_(True))
    else:
        with torch.no_grad():
            logits = ctx.subject.forward(ctx.x)
    ctx.counter.add(forward=ctx.batch)
    _check_recorded(ctx, tap)
    return logits


def _check_recorded(ctx, tap: AttentionTap) -> None:
    if not tap.attn:
        raise SaliencyError("no attention probabilities were recorded during the forward pass; "
                            "the model's attention modules were not called")
    if any(a.dim() != 4 or a.shape[0] != ctx.batch or a.shape[-1] != a.shape[-2] for a in tap.attn) or \
            len({a.shape[-1] for a in tap.attn}) != 1:
        raise SaliencyError("attention methods need global self-attention over one token sequence per image "
                            f"(got attention shapes {sorted({tuple(a.shape) for a in tap.attn})}); windowed or "
                            "hierarchical attention (Swin) is not supported")


def _grid(ctx, n_tokens: int) -> tuple[int, int, int]:
    return grid_of(ctx.subject, n_tokens, tuple(ctx.x.shape[-2:]), layer="attention")


def _read_map(ctx, R: torch.Tensor) -> dict:
    """Token relevance matrix `[B, N, N]` -> patch map from the CLS row."""
    prefix, h, w = _grid(ctx, R.shape[-1])
    row = R[:, 0, prefix:] if prefix > 0 else R[:, :, :].mean(1)
    raw = row.reshape(R.shape[0], h, w).float()
    return {"maps": upsample(raw, ctx.x.shape[-2:]), "raw": raw}


def _layer_range(n_layers: int, start_layer: int) -> range:
    if not -n_layers <= start_layer < n_layers:
        raise SaliencyError(f"start_layer={start_layer} is out of range for a model with {n_layers} blocks")
    return range(start_layer % n_layers, n_layers)


def fuse_heads(a: torch.Tensor, how: str) -> torch.Tensor:
    if how == "mean":
        return a.mean(1)
    if how == "max":
        return a.amax(1)
    if how == "min":
        return a.amin(1)
    raise SaliencyError(f"head_fusion must be 'mean', 'max' or 'min', got {how!r}")


def rollout(attentions: list[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0,
            prefix: int = 1) -> torch.Tensor:
    """Attention rollout `R = Â_L ... Â_1`, `Â = rownorm(0.5 A + 0.5 I)` with heads fused.

    `discard_ratio` zeroes that fraction of the lowest fused entries per example among the entries
    whose key is a patch token (attention to prefix tokens is never discarded), before the
    residual is added.
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise SaliencyError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    B, _, N, _ = attentions[0].shape
    eye = torch.eye(N, dtype=torch.float64, device=attentions[0].device).expand(B, N, N)
    R = eye.clone()
    for a in attentions:
        fused = fuse_heads(a.detach().double(), head_fusion)
        if discard_ratio > 0:
            patch = fused[:, :, prefix:].reshape(B, -1)
            k = int(patch.shape[1] * discard_ratio)
            if k > 0:
                idx = patch.topk(k, dim=1, largest=False).indices
                patch = patch.scatter(1, idx, 0.0)
                fused = torch.cat([fused[:, :, :prefix], patch.view(B, N, N - prefix)], dim=2)
        a_hat = 0.5 * fused + 0.5 * eye
        a_hat = a_hat / a_hat.sum(-1, keepdim=True)
        R = a_hat @ R
    return R


# the ViT methods read attention between image patch tokens: no other layout has those tokens
VIT_ONLY = dict.fromkeys(("BCT", "BCDHW", "BTCHW", "BF"),
                         "it reads a Vision Transformer's attention between image patch tokens")


@register
class AttentionRollout(Method):
    name = "attention_rollout"
    not_for = VIT_ONLY
    aliases = ("rollout",)
    family = "transformer"
    cost = "1F"
    defaults = {"head_fusion": "mean", "discard_ratio": 0.0, "start_layer": 0}
    description = ("Attention rollout (Abnar & Zuidema 2020): product of head-fused attention with the "
                   "residual identity, rows re-normalised; class-agnostic.")

    def run(self, ctx, target, layer, head_fusion="mean", discard_ratio=0.0, start_layer=0):
        with AttentionTap(ctx.subject.model) as tap:
            _tap_forward(ctx, tap, grad=False)
            attn = list(tap.attn)
        prefix, _, _ = _grid(ctx, attn[0].shape[-1])
        layers = _layer_range(len(attn), start_layer)
        R = rollout([attn[i] for i in layers], head_fusion, discard_ratio, prefix)
        out = _read_map(ctx, R)
        out["extras"] = {"blocks": len(attn), "class_agnostic": True}
        return out


def relevancy_matrix(attentions, gradients, start: int = 0, weights=None) -> torch.Tensor:
    """Chefer et al. 2021 rules 5-7: `R = I`; for each block `R += mean_h(ReLU(∇A ⊙ A)) R`."""
    B, _, N, _ = attentions[0].shape
    R = torch.eye(N, dtype=torch.float64, device=attentions[0].device).expand(B, N, N).clone()
    for i in range(start, len(attentions)):
        a = attentions[i].detach().double()
        if weights is not None:
            a = a * weights[i].double()[:, None, None, :]
        abar = (gradients[i].double() * a).clamp_min(0).mean(1)
        R = R + abar @ R
    return R


_TAP_KEY = "attention_tap"


class _TapPrimed:
    """Methods whose pass is one tapped forward + one backward: run first, that forward is also
    the clean forward that fixes the target (`Context.prime_under`), so they cost 1F+1B alone."""

    @classmethod
    def prime(cls, ctx):
        ctx.prime_under(_TAP_KEY, AttentionTap(ctx.subject.model))


def _attention_gradients(ctx, target):
    """`(tap, attn, grads)`: every block's attention probabilities and the target's gradient
    w.r.t. them, from the primed tapped forward when there is one, else from a tapped forward."""
    primed = ctx.take_own_primed(_TAP_KEY)
    if primed is not None:
        _, logits, tap = primed
        _check_recorded(ctx, tap)
    else:
        with AttentionTap(ctx.subject.model) as tap:
            logits = _tap_forward(ctx, tap, grad=True)
    attn = list(tap.attn)
    with torch.enable_grad():
        score = target.score(logits)
        grads = torch.autograd.grad(score.sum(), attn, allow_unused=True)
    ctx.counter.add(backward=ctx.batch)
    grads = [torch.zeros_like(a) if g is None else g.detach() for a, g in zip(attn, grads)]
    return tap, attn, grads


@register
class Relevancy(_TapPrimed, Method):
    name = "relevancy"
    not_for = VIT_ONLY
    aliases = ("chefer", "transformer_attribution")
    family = "transformer"
    cost = "1F+1B"
    defaults = {"start_layer": 0}
    description = ("Gradient-weighted attention relevancy propagation (Chefer et al. 2021): "
                   "R += mean_heads(ReLU(dA * A)) R over blocks, map = CLS row.")

    def run(self, ctx, target, layer, start_layer=0):
        _, attn, grads = _attention_gradients(ctx, target)
        start = _layer_range(len(attn), start_layer).start
        out = _read_map(ctx, relevancy_matrix(attn, grads, start))
        out["extras"] = {"blocks": len(attn)}
        return out


@register
class LeGrad(Method):
    name = "legrad"
    not_for = VIT_ONLY
    family = "transformer"
    cost = "2F+2B"
    defaults = {"layers": 2, "aggregate": "sum"}
    description = ("LeGrad (Bousselham et al. 2024): for each selected block, the model's own head reads "
                   "that block's tokens (later blocks skipped); map = mean over heads and queries of "
                   "ReLU(d score / d attention), summed over blocks, min-max normalised.")

    def run(self, ctx, target, layer, layers=2, aggregate="sum"):
        if aggregate not in ("sum", "mean"):
            raise SaliencyError(f"aggregate must be 'sum' or 'mean', got {aggregate!r}")
        with AttentionTap(ctx.subject.model) as tap:
            n_blocks = len(tap.blocks)
            if isinstance(layers, int):
                if not 1 <= layers <= n_blocks:
                    raise SaliencyError(f"layers={layers} but the model has {n_blocks} blocks")
                chosen = list(range(n_blocks - layers, n_blocks))
            else:
                chosen = sorted({int(i) % n_blocks for i in layers})
                if not chosen:
                    raise SaliencyError("legrad needs at least one block index in layers")
            total = None
            prefix = h = w = None
            for l in chosen:
                tap.skip_after = l if l < n_blocks - 1 else None
                logits = _tap_forward(ctx, tap, grad=True)
                a = tap.attn[l]
                with torch.enable_grad():
                    g = torch.autograd.grad(target.score(logits).sum(), a, allow_unused=True)[0]
                ctx.counter.add(backward=ctx.batch)
                g = torch.zeros_like(a) if g is None else g.detach()
                e = g.float().clamp_min(0).mean(1).mean(1)  # heads, then queries -> [B, N]
                if prefix is None:
                    prefix, h, w = _grid(ctx, e.shape[-1])
                emap = e[:, prefix:].reshape(e.shape[0], h, w)
                total = emap if total is None else total + emap
            tap.skip_after = None
        if aggregate == "mean":
            total = total / len(chosen)
        maps = normalize01(upsample(total, ctx.x.shape[-2:]))
        return {"maps": maps, "raw": total, "extras": {"blocks": chosen}}


@register
class TokenTM(_TapPrimed, Method):
    name = "tokentm"
    not_for = VIT_ONLY
    family = "transformer"
    cost = "1F+1B"
    experimental = True
    defaults = {"start_layer": 0}
    description = ("EXPERIMENTAL TokenTM-style relevancy (after Wu et al. 2024, definition not verified "
                   "against the paper): attention columns weighted by each token's transformation "
                   "(norm ratio x cosine of the block's output vs input token), then Chefer propagation.")

    def run(self, ctx, target, layer, start_layer=0):
        tap, attn, grads = _attention_gradients(ctx, target)
        t_in = [t.detach().double() for t in tap.block_in]
        t_out = [t.detach().double() for t in tap.block_out]
        if len(t_in) != len(attn) or len(t_out) != len(attn):
            raise SaliencyError("tokentm could not pair every attention map with its block's tokens")
        weights = []
        for zi, zo in zip(t_in, t_out):
            ratio = zo.norm(dim=-1) / zi.norm(dim=-1).clamp_min(1e-12)
            cos = torch.nn.functional.cosine_similarity(zo, zi, dim=-1)
            weights.append(ratio * cos)
        start = _layer_range(len(attn), start_layer).start
        out = _read_map(ctx, relevancy_matrix(attn, grads, start, weights))
        out["extras"] = {"blocks": len(attn), "experimental": True}
        return out
