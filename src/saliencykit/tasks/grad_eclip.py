"""Grad-ECLIP (Zhao et al., "Gradient-based Visual Explanation for Transformer-based CLIP", ICML
2024): the CLIP task's own method, registered as `grad_eclip` with every other method. It reads
the last self-attention of the image tower, so it runs on a `CLIPSubject` only."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import upsample
from ..errors import SaliencyError
from ..hooks import this_thread_only
from ..methods.base import Method, register
from ..subject import LayerCapture
from ..tokens import _is_vision, grid_of, mha_projections, transformer_blocks
from .clip import _require_clip


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
            self._handles.append(self.attn.register_forward_pre_hook(this_thread_only(pre), with_kwargs=True))
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
        ctx.prime_under("grad_eclip", _AttentionRecorder(_require_clip(ctx.subject, "grad_eclip")))

    def run(self, ctx, target, layer):
        """One forward with the last visual attention hooked (the primed clean forward when there
        is one), one backward to its output.

        The gradient w.r.t. `o` (the input of `out_proj`, `y = o Wᵀ + b`) is read as
        `∂c/∂o = (∂c/∂y) W` from the attention module's output `y`, which works for both module
        kinds (`nn.MultiheadAttention` never calls `out_proj` as a module). `q, k, v` are the
        outputs of `q_proj/k_proj/v_proj` (Hugging Face) or of the split `in_proj` (MultiheadAttention).
        """
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
