"""CLIP: text prompts as targets, and zero-shot classification by description.

* `CLIPSubject`: a Subject whose output is the L2-normalised image embedding `v(x)` `[B, D]` of a
  CLIP model (Hugging Face `CLIPModel` or open_clip), with `encode_text(prompts)` for the text
  tower. Every method (gradients, CAMs, perturbations, attention methods on the vision
  transformer) explains it through a text target.
* `Text("a photo of a cat")`: score = `cos(v(x), e(text))` (text embedding fixed, computed once
  without gradient). A list gives one prompt per example; `vs=` makes it contrastive:
  `cos(v, e(a)) - cos(v, e(b))`. `explain_prompts(subject, x, prompts, method)` explains every
  prompt for every image in one batched call (the image repeated once per prompt).
* Classification by description (Menon & Vondrick 2023): a class is a list of
  descriptors; each is turned into the text "{class}, {which-phrase(descriptor)}", the class score
  is the mean cosine of its descriptors; `explain_by_description` gives one map per descriptor of
  the predicted (or given) class plus the class map (the map of the class score itself).
* Loaders: `load_clip("hf:openai/clip-vit-base-patch32")`, `load_clip("open_clip:ViT-B-32:openai")`
  (need a network or cached weights; no CLIP weights exist offline).
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SaliencyError
from ..subject import Subject
from .similarity import ResolvedScore
from ..targets import Target

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise SaliencyError(f"cannot read embeddings from a {type(out).__name__}")


class CLIPImageTower(nn.Module):
    """`x -> normalize(image_features(x))` for a Hugging Face CLIPModel or an open_clip model."""

    def __init__(self, clip: nn.Module, kind: str):
        super().__init__()
        self.clip = clip
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "hf":
            emb = _features(self.clip.get_image_features(pixel_values=x))
        else:
            emb = self.clip.encode_image(x)
        return F.normalize(emb, dim=-1)


class CLIPSubject(Subject):
    """A CLIP model explained through the image-text similarity.

    Args:
        clip: a Hugging Face `CLIPModel` (kind "hf") or an open_clip model (kind "open_clip").
        tokenizer: callable `list[str] -> input_ids [T, L]` (open_clip) or -> a mapping with
            `input_ids` (and `attention_mask`) (Hugging Face tokenizers / processors).
        input_size, mean, std: the image preprocessing (CLIP statistics by default).
    """

    def __init__(self, clip: nn.Module, tokenizer: Callable, kind: str | None = None, input_size=(224, 224),
                 mean=CLIP_MEAN, std=CLIP_STD, name: str | None = None, device=None, layer: str = "auto"):
        if kind is None:
            kind = "hf" if hasattr(clip, "get_image_features") else "open_clip"
        if kind not in ("hf", "open_clip"):
            raise SaliencyError(f"CLIP kind must be 'hf' or 'open_clip', got {kind!r}")
        if kind == "hf" and not hasattr(clip, "get_text_features"):
            raise SaliencyError(f"{type(clip).__name__} is not a CLIP model (no get_text_features)")
        if kind == "open_clip" and not (hasattr(clip, "encode_image") and hasattr(clip, "encode_text")):
            raise SaliencyError(f"{type(clip).__name__} is not an open_clip model (no encode_image/encode_text)")
        super().__init__(CLIPImageTower(clip, kind), mean=mean, std=std, input_size=input_size,
                         name=name or f"clip:{type(clip).__name__}", device=device, layer=layer)
        self.kind = kind
        self.tokenizer = tokenizer
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings `[T, D]` (cached per prompt)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise SaliencyError("text prompts must be non-empty strings")
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if new:
            clip = self.model.clip
            was = clip.training
            clip.eval()
            try:
                tokens = self.tokenizer(new)
                if self.kind == "hf":
                    if isinstance(tokens, torch.Tensor):
                        tokens = {"input_ids": tokens}
                    tokens = {k: v.to(self.device) for k, v in dict(tokens).items()
                              if k in ("input_ids", "attention_mask")}
                    emb = _features(clip.get_text_features(**tokens))
                else:
                    emb = clip.encode_text(tokens.to(self.device))
            finally:
                clip.train(was)
            for p, e in zip(new, F.normalize(emb.float(), dim=-1)):
                self._text_cache[p] = e.detach()
        return torch.stack([self._text_cache[p] for p in prompts])


def _require_clip(subject, what: str) -> CLIPSubject:
    if not isinstance(subject, CLIPSubject):
        raise SaliencyError(f"{what} needs a CLIP subject (sk.CLIPSubject / sk.load_clip); "
                            f"{subject.name} has no text encoder")
    return subject


class Text(Target):
    """Explain the image-text similarity `cos(v(x), e(prompt))`.

    `prompts`: one prompt (all examples) or a list with one prompt per example. `vs`: a prompt (or
    list) to contrast with: score = `cos(v, e(prompt)) - cos(v, e(vs))`.
    """

    def __init__(self, prompts, vs=None, each: bool | None = None):
        self.prompts = prompts
        self.vs = vs
        self.each = each

    def expand_batch(self, x: torch.Tensor):
        """Every prompt for every image: `x` repeated once per prompt (row `b*T + t` = image b,
        prompt t) and a per-row Text. Applies when `each=True`, or by default when one image gets
        several prompts; a list as long as the batch otherwise means one prompt per example."""
        if isinstance(self.prompts, str):
            return x, self
        prompts = list(self.prompts)
        each = self.each if self.each is not None else (x.shape[0] == 1 and len(prompts) > 1)
        if not each:
            return x, self
        if not prompts:
            raise SaliencyError("no prompts given")
        if self.vs is not None and not isinstance(self.vs, str):
            raise SaliencyError("a Text contrast over several prompts per image takes one `vs` prompt")
        B = x.shape[0]
        return x.repeat_interleave(len(prompts), dim=0), Text(prompts * B, vs=self.vs, each=False)

    def __repr__(self):
        return f"Text({self.prompts!r}" + (f", vs={self.vs!r})" if self.vs is not None else ")")

    @staticmethod
    def _per_example(value, batch: int) -> list[str]:
        if isinstance(value, str):
            return [value] * batch
        value = list(value)
        if len(value) != batch:
            hint = (" (to explain every prompt for every image pass Text([...], each=True))"
                    if batch > 1 else "")
            raise SaliencyError(f"Text: {len(value)} prompts given for a batch of {batch} examples{hint}")
        return value

    def resolve(self, subject, logits):
        clip = _require_clip(subject, "a Text target")
        batch = logits.shape[0]
        prompts = self._per_example(self.prompts, batch)
        text = clip.encode_text(prompts).to(logits.device)
        if text.shape[1] != logits.shape[1]:
            raise SaliencyError(f"text embeddings have {text.shape[1]} dimensions, image embeddings {logits.shape[1]}")
        neg = None
        names = list(prompts)
        if self.vs is not None:
            vs = self._per_example(self.vs, batch)
            if any(a == b for a, b in zip(prompts, vs)):
                raise SaliencyError("Text contrast needs two different prompts")
            neg = clip.encode_text(vs).to(logits.device)
            names = [f"{a} vs {b}" for a, b in zip(prompts, vs)]

        def fn(out, rows):
            v = F.normalize(out, dim=-1)
            s = (v * text[rows].to(v.dtype)).sum(1)
            if neg is not None:
                s = s - (v * neg[rows].to(v.dtype)).sum(1)
            return s

        key = ("text", tuple(prompts), None if self.vs is None else tuple(self._per_example(self.vs, batch)))
        return ResolvedScore(fn, batch, "text", names, key)


def explain_prompts(subject, x: torch.Tensor, prompts: Sequence[str], method="gradcam", **kwargs):
    """Explain each prompt for each image in one batched call.

    Returns an Explanation (or a dict per method) with maps `[B*T, H, W]`, row `b*T + t` = image b,
    prompt t (the image repeated once per prompt).
    """
    from ..methods import explain

    clip = _require_clip(subject, "explain_prompts")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return explain(clip, x, method=method, target=Text(prompts, each=True), **kwargs)


# ------------------------------------------------------------------------ classification by description
_WHICH_IS = ("a ", "an ")
_WHICH = ("has", "often", "typically", "may", "can")


def descriptor_prompt(class_name: str, descriptor: str) -> str:
    """'{class}, which is/has ... {descriptor}' (the which-phrase rules of Menon & Vondrick)."""
    d = descriptor.strip()
    low = d.lower()
    if low.startswith(_WHICH_IS) or low.startswith("used"):
        phrase = f"which is {d}"
    elif low.split(" ", 1)[0] in _WHICH:
        phrase = f"which {d}"
    else:
        phrase = f"which has {d}"
    return f"{class_name}, {phrase}"


def _check_descriptions(descriptions) -> dict[str, list[str]]:
    if not isinstance(descriptions, dict) or not descriptions:
        raise SaliencyError("descriptions must be a non-empty dict: class name -> list of descriptors")
    out = {}
    for c, ds in descriptions.items():
        ds = [ds] if isinstance(ds, str) else list(ds)
        if not ds:
            raise SaliencyError(f"class {c!r} has no descriptors")
        out[str(c)] = ds
    return out


def classify_by_description(subject, x: torch.Tensor, descriptions: dict) -> dict:
    """Class scores `[B, C]` = mean descriptor cosine, the predicted class, and per-descriptor cosines."""
    clip = _require_clip(subject, "classification by description")
    descriptions = _check_descriptions(descriptions)
    x = clip.check_input(x)
    with clip.explaining(), torch.no_grad():
        v = clip.forward(x).float()
    classes = list(descriptions)
    per = {}
    scores = []
    for c in classes:
        text = clip.encode_text([descriptor_prompt(c, d) for d in descriptions[c]]).to(v.device)
        sims = v @ text.t()  # [B, D_c]
        per[c] = sims
        scores.append(sims.mean(1))
    scores = torch.stack(scores, 1)
    return {"classes": classes, "scores": scores, "predicted": [classes[int(i)] for i in scores.argmax(1)],
            "descriptor_scores": per}


class Description(Target):
    """The class score of classification by description: mean cosine over the class's descriptors."""

    def __init__(self, class_name: str, descriptors: Sequence[str]):
        self.class_name = class_name
        self.descriptors = list(descriptors)
        if not self.descriptors:
            raise SaliencyError(f"class {class_name!r} has no descriptors")

    def resolve(self, subject, logits):
        clip = _require_clip(subject, "a Description target")
        text = clip.encode_text([descriptor_prompt(self.class_name, d) for d in self.descriptors]).to(logits.device)
        mean_text = text.mean(0)

        def fn(out, rows):
            return F.normalize(out, dim=-1) @ mean_text.to(out.dtype)

        batch = logits.shape[0]
        return ResolvedScore(fn, batch, "description", [self.class_name] * batch,
                             ("description", self.class_name, tuple(self.descriptors)))


def explain_by_description(subject, x: torch.Tensor, descriptions: dict, method="gradcam", cls: str | None = None,
                           **kwargs) -> dict:
    """For one image: the class (predicted unless `cls` is given), its descriptors ranked by cosine,
    one map per descriptor (one batched call) and the class map (the map of the class score)."""
    from ..methods import explain

    clip = _require_clip(subject, "explain_by_description")
    descriptions = _check_descriptions(descriptions)
    x = clip.check_input(x)
    if x.shape[0] != 1:
        raise SaliencyError("explain_by_description takes one image")
    result = classify_by_description(clip, x, descriptions)
    if cls is None:
        cls = result["predicted"][0]
    if cls not in descriptions:
        raise SaliencyError(f"class {cls!r} is not in the descriptions ({', '.join(descriptions)})")
    descs = descriptions[cls]
    prompts = [descriptor_prompt(cls, d) for d in descs]
    per = explain_prompts(clip, x, prompts, method=method, **kwargs)
    whole = explain(clip, x, method=method, target=Description(cls, descs), **kwargs)
    sims = result["descriptor_scores"][cls][0]
    order = sims.argsort(descending=True).tolist()
    return {"class": cls, "score": float(result["scores"][0, result["classes"].index(cls)]),
            "descriptors": [(descs[i], float(sims[i])) for i in order], "descriptor_maps": per,
            "class_map": whole, "prompts": prompts,
            "text": f"predicted {cls} mainly because of: " + ", ".join(f"{descs[i]} ({float(sims[i]):.3f})"
                                                                     for i in order[:3])}


# ------------------------------------------------------------------------------------ loaders
def load_clip(name: str, device=None) -> CLIPSubject:
    """`hf:REPO` (transformers CLIPModel + processor) or `open_clip:ARCH:PRETRAINED`; needs the weights."""
    if name.startswith("hf:"):
        if importlib.util.find_spec("transformers") is None:
            raise SaliencyError("hf CLIP models need transformers: pip install transformers")
        from transformers import CLIPModel, CLIPProcessor

        repo = name[3:]
        try:
            model = CLIPModel.from_pretrained(repo, attn_implementation="eager").eval()
            processor = CLIPProcessor.from_pretrained(repo)
        except Exception as err:  # no network and no cache
            raise SaliencyError(f"could not load CLIP {repo!r} ({type(err).__name__}: {err})") from None
        size = model.config.vision_config.image_size
        ip = processor.image_processor

        def tokenizer(prompts):
            return processor.tokenizer(prompts, padding=True, return_tensors="pt")

        return CLIPSubject(model, tokenizer, "hf", input_size=(size, size), mean=ip.image_mean, std=ip.image_std,
                           name=name, device=device)
    if name.startswith("open_clip:"):
        if importlib.util.find_spec("open_clip") is None:
            raise SaliencyError("open_clip models need open_clip_torch: pip install open_clip_torch")
        import open_clip

        parts = name.split(":")
        arch, pretrained = parts[1], (parts[2] if len(parts) > 2 else "")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
        except Exception as err:
            raise SaliencyError(f"could not load open_clip {arch!r}/{pretrained!r} ({type(err).__name__}: {err})") \
                from None
        tok = open_clip.get_tokenizer(arch)
        size = model.visual.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        return CLIPSubject(model.eval(), tok, "open_clip", input_size=size, name=name, device=device,
                           mean=getattr(model.visual, "image_mean", None) or CLIP_MEAN,
                           std=getattr(model.visual, "image_std", None) or CLIP_STD)
    raise SaliencyError(f"unknown CLIP model {name!r}; use 'hf:REPO' or 'open_clip:ARCH:PRETRAINED'")


__all__ = ["CLIPSubject", "Text", "Description", "explain_prompts", "descriptor_prompt", "classify_by_description",
           "explain_by_description", "load_clip"]
