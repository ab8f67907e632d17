"""Transformer methods: attention rollout, relevancy propagation (Chefer et al.
2021), LeGrad, TokenTM (experimental), and Grad-ECLIP for CLIP image towers.

The attention methods read the attention probabilities `A^l` `[B, heads, N, N]` of every block through
`saliencykit.vit.AttentionTap`, which switches fused attention kernels to an explicit path for
the duration of the call (and restores them after). Maps are read from the CLS row of the token
relevance matrix (the mean over patch rows for models without prefix tokens), the prefix tokens
(CLS, distillation, registers) are dropped, the patch tokens are laid out on the patch grid of
the input (`Explanation.raw`, `[B, h, w]`) and upsampled bilinearly to the input size.
Grad-ECLIP instead reads the queries, keys, values and the gradient at the last visual attention
(see `GradECLIP`) and lays out its patch map the same way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import upsample
from ..errors import SaliencyError
from ..model import LayerCapture
from ..vit import AttentionTap, _is_vision, grid_of, mha_projections, transformer_blocks
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


@register
class AttentionRollout(Method):
    name = "attention_rollout"
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


# ------------------------------------------------------------------------------------ Grad-ECLIP
def _last_visual_attention(subject) -> tuple[str, nn.Module, str]:
    """`(name, module, kind)` of the self-attention of the last image-tower block; kind is "hf"
    (separate `q_proj`/`k_proj`/`v_proj`/`out_proj`, Hugging Face CLIPAttention) or "mha"
    (`torch.nn.MultiheadAttention`, open_clip / torchvision, fused `in_proj`)."""
    blocks = [(b, a) for b, a in transformer_blocks(subject.model) if _is_vision(a)]
    if not blocks:
        raise SaliencyError(
            f"grad_eclip found no self-attention module in the image tower of {subject.name} (a module path "
            "starting with visual*/vision*); it needs Hugging Face CLIPAttention (q_proj/k_proj/v_proj/out_proj) "
            "or torch.nn.MultiheadAttention in the vision transformer")
    name = blocks[-1][1]
    mod = dict(subject.model.named_modules())[name]
    if isinstance(mod, nn.MultiheadAttention):
        if mod.bias_k is not None or mod.add_zero_attn:
            raise SaliencyError(f"grad_eclip: {name} is a MultiheadAttention with bias_k/add_zero_attn "
                                "(extra key tokens), which is not supported")
        return name, mod, "mha"
    if all(isinstance(getattr(mod, p, None), nn.Module) for p in ("q_proj", "k_proj", "v_proj", "out_proj")):
        return name, mod, "hf"
    missing = [p for p in ("q_proj", "k_proj", "v_proj", "out_proj")
               if not isinstance(getattr(mod, p, None), nn.Module)]
    raise SaliencyError(f"grad_eclip needs the last visual attention to have q_proj/k_proj/v_proj/out_proj "
                        f"(Hugging Face CLIPAttention) or to be a torch.nn.MultiheadAttention; {name} "
                        f"({type(mod).__name__}) has no {', '.join(missing)}")


def _linear_weight(mod: nn.Module, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise SaliencyError(f"grad_eclip needs {what} to be a linear layer with a 2-D weight, "
                            f"got {type(mod).__name__}")
    b = getattr(mod, "bias", None)
    return w, b if isinstance(b, torch.Tensor) else None


def grad_eclip_map(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out_weight: torch.Tensor, out_bias: torch.Tensor | None, prefix: int) -> torch.Tensor:
    """Grad-ECLIP patch relevance `[B, P]` from one attention layer (computed in float64).

    `g` `[B, E]`: d score / d o_CLS (o = attention output before `out_proj`); `q, k, v` `[B, N, E]`:
    full-width queries / keys / values (all heads concatenated); `prefix`: leading non-patch tokens
    (CLS at position 0). `q̂, k̂ = out_proj(q), out_proj(k)`; `λ_i = minmax_i cos(q̂_CLS, k̂_i)` over
    patch tokens (1 for every patch when all cosines are equal);
    `map_i = ReLU(Σ_d g_d v_{i,d} λ_i)`.
    """
    dt = torch.float64
    W = out_weight.detach().to(dt)
    bias = None if out_bias is None else out_bias.detach().to(dt)
    q_hat = F.linear(q[:, :1].detach().to(dt), W, bias)        # [B, 1, E]
    k_hat = F.linear(k[:, prefix:].detach().to(dt), W, bias)    # [B, P, E]
    sim = F.cosine_similarity(q_hat, k_hat, dim=-1)             # [B, P]
    lo, hi = sim.amin(1, keepdim=True), sim.amax(1, keepdim=True)
    span = hi - lo
    lam = torch.where(span > 0, (sim - lo) / span.clamp_min(torch.finfo(dt).tiny), torch.ones_like(sim))
    gv = (g.detach().to(dt)[:, None, :] * v[:, prefix:].detach().to(dt)).sum(-1)  # [B, P]
    return (gv * lam).clamp_min(0) + 0.0  # + 0.0: no -0.0 entries


class _AttentionRecorder(LayerCapture):
    """A `LayerCapture` of the last visual attention of a CLIP subject (and, for Hugging Face
    attention, of its q/k/v projections) that also records the attention's inputs (query, key,
    value) for one forward. `rec` maps "in", "out", "q", "k", "v" to the recorded calls."""

    def __init__(self, subject):
        self.name, self.attn, self.kind = _last_visual_attention(subject)
        modules = {"out": self.attn}
        if self.kind == "hf":
            modules.update({p: getattr(self.attn, f"{p}_proj") for p in ("q", "k", "v")})
        super().__init__(modules)
        self.rec: dict[str, list] = {"in": [], **{k: r.outputs for k, r in self.records.items()}}

    def __enter__(self):
        super().__enter__()
        kind, inputs = self.kind, self.rec["in"]

        def pre(_m, args, kwargs):
            if kind == "hf":
                t = kwargs.get("hidden_states", args[0] if args else None)
                inputs.append((t, t, t))
            else:
                names = ("query", "key", "value")
                inputs.append(tuple(kwargs.get(n, args[i] if len(args) > i else None) for i, n in enumerate(names)))

        try:
            self._handles.append(self.attn.register_forward_pre_hook(pre, with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self


@register
class GradECLIP(Method):
    name = "grad_eclip"
    aliases = ("gradeclip",)
    family = "transformer"
    cost = "1F+1B"
    uses_layer = False
    defaults = {}
    description = ("Grad-ECLIP (Zhao et al., 'Gradient-based Visual Explanation for Transformer-based CLIP', "
                   "ICML 2024), CLIP image towers: in the last visual attention, map_i = ReLU(sum_d g_d v_id "
                   "lambda_i), g = d score / d(attention output before out_proj) at CLS, v = patch values, "
                   "lambda = min-max of cos(out_proj(q_CLS), out_proj(k_i)).")

    @classmethod
    def prime(cls, ctx):
        """Run first, the clean forward that fixes the target is made with the attention hooked."""
        from ..clip import _require_clip

        ctx.prime_under("grad_eclip", _AttentionRecorder(_require_clip(ctx.subject, "grad_eclip")))

    def run(self, ctx, target, layer):
        """One forward with the last visual attention hooked (the primed clean forward when there
        is one), one backward to its output.

        The gradient w.r.t. `o` (the input of `out_proj`, `y = o Wᵀ + b`) is read as
        `∂c/∂o = (∂c/∂y) W` from the attention module's output `y`, which works for both module
        kinds (`nn.MultiheadAttention` never calls `out_proj` as a module). `q, k, v` are the
        outputs of `q_proj/k_proj/v_proj` (Hugging Face) or of the split `in_proj` (MultiheadAttention).
        """
        from ..clip import _require_clip

        subject = _require_clip(ctx.subject, "grad_eclip")
        primed = ctx.take_own_primed("grad_eclip")
        if primed is not None:
            _, logits, recorder = primed
        else:
            recorder = _AttentionRecorder(subject)
            with recorder, torch.enable_grad():
                logits = subject.forward(ctx.x.detach().clone().requires_grad_(True))
            ctx.counter.add(forward=ctx.batch)
        name, attn, kind, rec = recorder.name, recorder.attn, recorder.kind, recorder.rec
        out_w, out_b = _linear_weight(attn.out_proj, f"{name}.out_proj")
        if len(rec["out"]) != 1 or len(rec["in"]) != 1:
            raise SaliencyError(f"grad_eclip: the last visual attention {name} was called {len(rec['out'])} times "
                                "during one image forward (expected exactly once); is it the image tower's?")
        query, key, value = rec["in"][0]
        y = rec["out"][0][0] if isinstance(rec["out"][0], (tuple, list)) else rec["out"][0]
        if not isinstance(query, torch.Tensor) or not isinstance(y, torch.Tensor) or query.dim() != 3:
            raise SaliencyError(f"grad_eclip: could not read the input/output tokens of {name}")
        if kind == "mha":
            for other in (key, value):
                if other is not query and not (isinstance(other, torch.Tensor) and torch.equal(other, query)):
                    raise SaliencyError(f"grad_eclip needs self-attention; {name} was called with different "
                                        "query and key/value tokens")
            if not attn.batch_first:  # [N, B, E] -> [B, N, E] (y itself stays the graph node)
                query = query.transpose(0, 1)
            with torch.no_grad():
                wq, wk, wv, bq, bk, bv = mha_projections(attn)
                xq = query.detach()
                q, k, v = F.linear(xq, wq, bq), F.linear(xq, wk, bk), F.linear(xq, wv, bv)
        else:
            if not all(len(rec[p]) == 1 for p in ("q", "k", "v")):
                raise SaliencyError(f"grad_eclip: {name}.q_proj/k_proj/v_proj were not each called once "
                                    "in the attention's forward")
            q, k, v = (rec[p][0].detach() for p in ("q", "k", "v"))
        seq_first = kind == "mha" and not attn.batch_first
        B, N = (y.shape[1], y.shape[0]) if seq_first else (y.shape[0], y.shape[1])
        if B != ctx.batch or any(t.shape[:2] != (B, N) or t.shape[-1] != out_w.shape[1] for t in (q, k, v)):
            raise SaliencyError(f"grad_eclip: unexpected token shapes at {name} (q {tuple(q.shape)}, k "
                                f"{tuple(k.shape)}, v {tuple(v.shape)}, output {tuple(y.shape)}, batch {ctx.batch})")
        prefix, h, w = grid_of(subject, N, tuple(ctx.x.shape[-2:]), layer=name)
        if prefix < 1:
            raise SaliencyError(f"grad_eclip reads the CLS token, but {name} has no prefix token "
                                f"({N} tokens = a {h}x{w} patch grid)")
        with torch.enable_grad():
            score = target.score(logits)
            gy = torch.autograd.grad(score.sum(), y, allow_unused=True)[0]
        ctx.counter.add(backward=ctx.batch)
        gy = torch.zeros_like(y) if gy is None else gy.detach()
        if seq_first:
            gy = gy.transpose(0, 1)
        g = gy[:, 0].to(torch.float64) @ out_w.detach().to(torch.float64)  # dc/do_CLS = dc/dy_CLS W
        raw = grad_eclip_map(g, q, k, v, out_w, out_b, prefix).reshape(B, h, w).float()
        return {"maps": upsample(raw, ctx.x.shape[-2:]), "raw": raw, "layer": name,
                "extras": {"attention": name, "kind": kind, "prefix_tokens": prefix}}
