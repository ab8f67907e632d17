"""Vision-Transformer support: patch-grid inference, the default layer, and attention taps.

* `infer_grid(subject, n_tokens, (H, W))` -> `(prefix, h, w)`: the patch size is read from the
  model's patch-embedding convolution (the first `Conv2d` on the input channels whose kernel
  equals its stride), so `h = H // p_h`, `w = W // p_w` (non-square inputs included) and the
  remaining `n_tokens - h*w` leading tokens are prefix tokens (CLS, distillation, registers).
  `subject.patch_size` / `subject.num_prefix_tokens`, when set, override what is read.
* `token_auto_layer(subject)`: for a transformer, the first LayerNorm of the last block (the
  input of the last attention), the standard Grad-CAM layer for ViTs: the output tokens of the
  last block only reach the head through the CLS token, so their patch gradients are zero.
* `AttentionTap(model)`: for the duration of a `with` block, every self-attention of the model
  runs an explicit path that materialises the attention probabilities `[B, heads, N, N]`; the
  recorded tensors are the ones used downstream, so `torch.autograd.grad(score, A)` is the true
  gradient. Fused kernels (PyTorch `scaled_dot_product_attention`, HF `sdpa`, timm `fused_attn`)
  are switched off and restored on exit, even after an error.

Supported attention modules: `torch.nn.MultiheadAttention` (torchvision ViT, open_clip),
Hugging Face attention modules that follow the `config._attn_implementation` interface (ViT,
DeiT, DINOv2, CLIP) and timm `Attention` modules (`fused_attn` + `attn_drop`).
"""
from __future__ import annotations

import math
import threading
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SaliencyError
from .hooks import shared_setting, this_thread_only

MAX_PREFIX = 16


# ----------------------------------------------------------------------------- grid inference
def patch_embedding(model: nn.Module, in_channels: int = 3) -> tuple[str, nn.Conv2d] | None:
    """The patch-embedding convolution: the first Conv2d on the input channels with kernel == stride."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.in_channels == in_channels:
            k, s = tuple(mod.kernel_size), tuple(mod.stride)
            if k == s and k[0] > 1:
                return name, mod
            return None  # the model starts with an ordinary convolution: a CNN (or hybrid)
    return None


def patch_size(subject) -> tuple[int, int] | None:
    override = getattr(subject, "patch_size", None)
    if override is not None:
        return (override, override) if isinstance(override, int) else tuple(override)
    found = patch_embedding(subject.model, subject.in_channels)
    return None if found is None else tuple(found[1].kernel_size)


def infer_grid(subject, n_tokens: int, input_hw, layer: str | None = None) -> tuple[int, int, int] | None:
    """`(prefix, h, w)` for `n_tokens` tokens of an `H x W` input, or None when no patch size is known.

    Raises `SaliencyError` when the patch size is known but the token count does not fit it.
    """
    p = patch_size(subject)
    if p is None:
        return None
    H, W = input_hw
    h, w = H // p[0], W // p[1]
    prefix = n_tokens - h * w
    forced = getattr(subject, "num_prefix_tokens", None)
    if forced is not None and forced != prefix:
        raise SaliencyError(
            f"layer {layer!r} has {n_tokens} tokens but num_prefix_tokens={forced} and a {h}x{w} patch grid "
            f"({H}x{W} input, patch {p[0]}x{p[1]}) need {forced + h * w}; fix subject.num_prefix_tokens or "
            "set subject.grid_fn")
    if not 0 <= prefix <= MAX_PREFIX:
        raise SaliencyError(
            f"cannot turn {n_tokens} tokens of layer {layer!r} into a patch grid: a {H}x{W} input with patch "
            f"{p[0]}x{p[1]} gives {h}x{w}={h * w} patches, leaving {prefix} prefix tokens; set "
            "subject.patch_size / subject.num_prefix_tokens, or subject.grid_fn = lambda t: ... -> [B, D, h, w]")
    return prefix, h, w


def grid_of(subject, n_tokens: int, input_hw, layer: str | None = None) -> tuple[int, int, int]:
    """Like `infer_grid`, falling back to a search over patch sizes (square patches, prefix 0..8)."""
    found = infer_grid(subject, n_tokens, input_hw, layer)
    if found is not None:
        return found
    H, W = input_hw
    for prefix in (1, 0, 2, 5, 3, 4, 6, 7, 8):
        patches = n_tokens - prefix
        if patches <= 0:
            continue
        for p in range(1, min(H, W) + 1):
            if H % p == 0 and W % p == 0 and (H // p) * (W // p) == patches:
                return prefix, H // p, W // p
    raise SaliencyError(f"cannot turn {n_tokens} tokens of layer {layer!r} into a patch grid for a {H}x{W} input; "
                        "set subject.patch_size / subject.num_prefix_tokens, or "
                        "subject.grid_fn = lambda t: ... returning [B, D, h, w]")


# ------------------------------------------------------------------------------ attention modules
def _attention_kind(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.MultiheadAttention):
        return "mha"
    if hasattr(mod, "fused_attn") and isinstance(getattr(mod, "attn_drop", None), nn.Module) and hasattr(mod, "qkv"):
        return "timm"
    cfg = getattr(mod, "config", None)
    if cfg is not None and hasattr(cfg, "_attn_implementation") and all(
            hasattr(mod, a) for a in ("q_proj", "k_proj", "v_proj")):
        return "hf"
    if cfg is not None and hasattr(cfg, "_attn_implementation") and all(
            hasattr(mod, a) for a in ("query", "key", "value")):
        return "hf"
    return None


def attention_modules(model: nn.Module, exclude: Callable[[str], bool] | None = None) -> list[tuple[str, nn.Module, str]]:
    """`(name, module, kind)` of every self-attention module, in registration order."""
    out = []
    for name, mod in model.named_modules():
        kind = _attention_kind(mod)
        if kind is None or (exclude is not None and exclude(name)):
            continue
        if any(name.startswith(prev + ".") for prev, _, _ in out):
            continue  # an inner module of an attention already listed
        out.append((name, mod, kind))
    return out


def _block_name(model: nn.Module, attn_name: str) -> str:
    """The transformer block holding an attention module: the ancestor that is an item of a
    ModuleList / Sequential."""
    modules = dict(model.named_modules())
    parts = attn_name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:i - 1]) if i > 1 else ""
        container = modules.get(parent)
        if isinstance(container, (nn.ModuleList, nn.Sequential)):
            return ".".join(parts[:i])
    return ".".join(parts[:-1])


def _is_vision(name: str) -> bool:
    return any(part.startswith(("visual", "vision")) for part in name.split("."))


def transformer_blocks(model: nn.Module) -> list[tuple[str, str]]:
    """`(block_name, attention_name)` pairs of the (vision) transformer, in order. In a two-tower
    model (CLIP) only the image tower's blocks (a `visual*` / `vision*` path) count."""
    found = attention_modules(model, exclude=lambda n: any(p.startswith("text") for p in n.split(".")))
    vision = [item for item in found if _is_vision(item[0])]
    return [(_block_name(model, n), n) for n, _, _ in (vision or found)]


def token_auto_layer(subject) -> str | None:
    """The default CAM layer of a ViT (first LayerNorm of the last block), or None for other models."""
    if patch_embedding(subject.model, subject.in_channels) is None and getattr(subject, "patch_size", None) is None:
        return None
    blocks = transformer_blocks(subject.model)
    if not blocks:
        return None
    block_name = blocks[-1][0]
    block = dict(subject.model.named_modules())[block_name]
    chosen = None
    for name, mod in block.named_modules():
        if isinstance(mod, nn.LayerNorm):
            chosen = f"{block_name}.{name}"
            break
    if chosen is None:
        chosen = blocks[-2][0] if len(blocks) > 1 else block_name
    _check_token_layer(subject, chosen)
    return chosen


def _check_token_layer(subject, name: str):
    """One dry forward: the default ViT layer must output tokens [B, N, D]; channels-last maps
    [B, h, w, C] (Swin-style models) would be misread as [B, C, h, w], so they are refused."""
    module = dict(subject.model.named_modules())[name]
    shapes = []
    handle = module.register_forward_hook(this_thread_only(
        lambda _m, _i, out: shapes.append(tuple((out[0] if isinstance(out, (tuple, list)) else out).shape))))
    probe = torch.zeros(1, subject.in_channels, *subject.input_size, device=subject.device)
    try:
        with subject.explaining(), torch.no_grad():
            subject.forward(probe)
    finally:
        handle.remove()
    if shapes and len(shapes[-1]) == 4:
        raise SaliencyError(
            f"layer {name!r} outputs channels-last maps {shapes[-1]} (a Swin-style model); CAM methods read "
            "[B, C, h, w] or tokens [B, N, D]: pass layer=NAME of a channels-first layer, or wrap the model")


# ----------------------------------------------------------------------------------- the tap
def _first_tensor(args, kwargs):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    return None


class AttentionTap:
    """Record attention probabilities (and block input/output tokens) during forward passes.

    Attributes after a forward pass: `attn[i]` = `[B, heads, N, N]` of the i-th self-attention in
    execution order; `block_in[i]`, `block_out[i]` = tokens entering / leaving block i. Call
    `clear()` between passes. `skip_after=l` makes every block after block l return its input
    (the model's own head then reads block l's tokens: LeGrad's layer-wise score).
    """

    def __init__(self, model: nn.Module, blocks: list[tuple[str, str]] | None = None):
        self.model = model
        self.blocks = blocks if blocks is not None else transformer_blocks(model)
        if not self.blocks:
            raise SaliencyError(
                f"{type(model).__name__} has no self-attention module this library can read (supported: "
                "torch.nn.MultiheadAttention, Hugging Face ViT/DeiT/DINOv2/CLIP attention, timm Attention); "
                "attention methods need a Vision Transformer")
        modules = dict(model.named_modules())
        self._attn = [(n, modules[n], _attention_kind(modules[n])) for _, n in self.blocks]
        self._block_mods = [modules[b] for b, _ in self.blocks]
        self.attn: list[torch.Tensor] = []
        self.block_in: list[torch.Tensor] = []
        self.block_out: list[torch.Tensor] = []
        self.skip_after: int | None = None
        self._undo: list[Callable] = []

    def clear(self):
        self.attn.clear()
        self.block_in.clear()
        self.block_out.clear()

    # each installer appends an undo callable, so a failure half-way restores what was done
    def __enter__(self):
        try:
            for _name, mod, kind in self._attn:
                getattr(self, f"_install_{kind}")(mod)
            for i, block in enumerate(self._block_mods):
                self._install_block(i, block)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc):
        self._restore()
        return False

    def _restore(self):
        while self._undo:
            self._undo.pop()()

    def _record(self, a: torch.Tensor):
        self.attn.append(a)

    def _install_block(self, i, block):
        def pre(_m, args, kwargs):
            t = _first_tensor(args, kwargs)
            if t is not None:
                self.block_in.append(t)

        def post(_m, args, kwargs, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if self.skip_after is not None and i > self.skip_after:
                t_in = _first_tensor(args, kwargs)
                self.block_out.append(t_in)
                if isinstance(out, tuple):
                    return (t_in,) + tuple(out[1:])
                if isinstance(out, list):
                    return [t_in] + list(out[1:])
                return t_in
            self.block_out.append(t)
            return None

        h1 = block.register_forward_pre_hook(this_thread_only(pre), with_kwargs=True)
        h2 = block.register_forward_hook(this_thread_only(post), with_kwargs=True)
        self._undo.append(h1.remove)
        self._undo.append(h2.remove)

    def _install_hf(self, mod):
        cfg = mod.config
        self._undo.append(shared_setting(cfg, "_attn_implementation", "eager"))

        def hook(_m, _i, out):
            if not (isinstance(out, (tuple, list)) and len(out) > 1 and isinstance(out[1], torch.Tensor)):
                raise SaliencyError(f"{type(mod).__name__} did not return its attention probabilities")
            self._record(out[1])

        self._undo.append(mod.register_forward_hook(this_thread_only(hook)).remove)

    def _install_timm(self, mod):
        self._undo.append(shared_setting(mod, "fused_attn", False))
        # in eval mode attn_drop returns its input itself: the recorded tensor is the one used next
        self._undo.append(mod.attn_drop.register_forward_hook(this_thread_only(lambda _m, _i, out: self._record(out))).remove)

    def _install_mha(self, mod):
        # one explicit forward per module, shared by the overlapping calls of several threads; each
        # thread's forwards record into that thread's tap, other forwards run the module's own
        owner = threading.get_ident()
        with _MHA_LOCK:
            taps = _MHA_TAPS.setdefault(mod, {})
            taps.setdefault(owner, []).append(self)
        try:
            self._undo.append(shared_setting(mod, "forward", _tapped_mha_forward(mod)))
        finally:
            self._undo.append(lambda: _drop_mha_tap(mod, owner, self))


_MHA_LOCK = threading.Lock()
# MultiheadAttention module -> {thread id: [taps of that thread's calls, innermost last]}
_MHA_TAPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _drop_mha_tap(mod, owner, tap):
    with _MHA_LOCK:
        taps = _MHA_TAPS.get(mod, {})
        mine = taps.get(owner, [])
        if tap in mine:
            mine.remove(tap)
        if not mine:
            taps.pop(owner, None)


def _tapped_mha_forward(mod: nn.MultiheadAttention):
    own_forward = type(mod).forward.__get__(mod)

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        mine = _MHA_TAPS.get(mod, {}).get(threading.get_ident())
        if not mine:
            return own_forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        return _explicit_mha(mod, mine[-1], query, key, value, key_padding_mask, need_weights, attn_mask,
                             average_attn_weights, is_causal)

    return forward


def mha_projections(mod: nn.MultiheadAttention):
    """(W_q, W_k, W_v, b_q, b_k, b_v) of an `nn.MultiheadAttention` (fused or separate weights;
    biases None when it has none)."""
    if mod._qkv_same_embed_dim:
        wq, wk, wv = mod.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight
    bq = bk = bv = None
    if mod.in_proj_bias is not None:
        bq, bk, bv = mod.in_proj_bias.chunk(3)
    return wq, wk, wv, bq, bk, bv

def _explicit_mha(mod: nn.MultiheadAttention, tap: AttentionTap, query, key, value, key_padding_mask,
                  need_weights, attn_mask, average_attn_weights, is_causal):
    """Multi-head attention written out: softmax(Q K^T / sqrt(d) + mask) V, then the output projection."""
    if mod.bias_k is not None or mod.add_zero_attn:
        raise SaliencyError("MultiheadAttention with bias_k/add_zero_attn is not supported by attention methods")
    if mod.batch_first:
        q_in, k_in, v_in = query, key, value
    else:
        q_in, k_in, v_in = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    B, L, E = q_in.shape
    S = k_in.shape[1]
    h = mod.num_heads
    d = E // h
    wq, wk, wv, bq, bk, bv = mha_projections(mod)
    Q = F.linear(q_in, wq, bq).view(B, L, h, d).transpose(1, 2)
    K = F.linear(k_in, wk, bk).view(B, S, h, d).transpose(1, 2)
    V = F.linear(v_in, wv, bv).view(B, S, h, d).transpose(1, 2)
    scores = Q @ K.transpose(-2, -1) / math.sqrt(d)
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=scores.device).triu(1)
    if attn_mask is not None:
        m = attn_mask
        if m.dim() == 3:
            m = m.view(B, h, L, S)
        if m.dtype == torch.bool:
            scores = scores.masked_fill(m, float("-inf"))
        else:
            scores = scores + m
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(B, 1, 1, S)
        if kpm.dtype == torch.bool:
            scores = scores.masked_fill(kpm, float("-inf"))
        else:
            scores = scores + kpm
    A = scores.softmax(-1)
    tap._record(A)
    out = (A @ V).transpose(1, 2).reshape(B, L, E)
    out = F.linear(out, mod.out_proj.weight, mod.out_proj.bias)
    if not mod.batch_first:
        out = out.transpose(0, 1)
    weights = None
    if need_weights:
        weights = A.mean(1) if average_attn_weights else A
    return out, weights
