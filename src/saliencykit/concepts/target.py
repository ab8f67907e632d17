"""`Concept(bank, k)`: explain a concept's coefficient instead of a logit, with any method.

The explained score of an image is the mean over the layer's locations of the concept's
coefficient, computed differentiably as the clamped least-squares projection of the (clamped)
activation on the bank, `u = max(0, a Wᵀ (W Wᵀ)⁻¹)` (exact non-negative least squares when the
concept directions do not overlap; `concept_maps` uses the exact solve for display). Every method
then runs on a view of the model whose outputs are the k concept scores, so gradients, CAMs and
perturbation methods need nothing new.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SaliencyError
from ..hooks import forward_at
from ..subject import Subject
from ..targets import Class, Target
from .bank import ConceptBank


class ConceptHead(nn.Module):
    """`x -> [B, k]` concept scores of `bank` at `layer` of `model` (the rest of the forward still
    runs; its output is discarded)."""

    def __init__(self, model: nn.Module, bank: ConceptBank):
        super().__init__()
        self.model = model
        self.layer = bank.layer
        W = bank.basis.double()
        gram = W @ W.T
        self.register_buffer("projector", (W.T @ torch.linalg.pinv(gram)).float(), persistent=False)   # [C, k]

    def forward(self, x):
        _, a = forward_at(self.model, self.layer, x)
        if not isinstance(a, torch.Tensor) or a.dim() != 4:
            raise SaliencyError(f"layer {self.layer!r} does not output a feature map [B,C,h,w]")
        P = self.projector.to(a)
        if a.shape[1] != P.shape[0]:
            raise SaliencyError(f"the bank has {P.shape[0]} channels and layer {self.layer!r} has {a.shape[1]}")
        u = torch.einsum("bchw,ck->bkhw", a.clamp(min=0), P).clamp(min=0)
        return u.mean((2, 3))


def model_view(subject: Subject, module: nn.Module, what: str, labels=None) -> Subject:
    """A Subject around `module` (a head or an intervention built on `subject`'s model) that keeps
    `subject`'s normalisation and input size, named `subject:what`; eager (the module changes per
    call, so no faster model form is timed for it). The concepts room's one way to wrap its views."""
    return Subject(module, labels=subject.labels if labels is None else labels, mean=subject.mean, std=subject.std,
                   input_size=subject.input_size, name=f"{subject.name}:{what}", fast=False)


class ConceptSubject(Subject):
    """The subject's model seen through a concept bank: outputs are concept scores; layer names
    of the original model work unchanged."""

    is_view = True   # its outputs are not class probabilities (no "unsure model" warning)

    def __init__(self, subject: Subject, bank: ConceptBank):
        layer = subject.default_layer
        super().__init__(ConceptHead(subject.model, bank), preprocess=subject._preprocess,
                         labels=[f"concept {i}" for i in range(bank.n_concepts)], mean=subject.mean, std=subject.std,
                         input_size=subject.input_size, layer=layer if layer == "auto" else f"model.{layer}",
                         name=f"{subject.name}:concepts@{bank.layer}", fast=False)
        self.base = subject

    def find_layer(self, layer, x=None):
        if isinstance(layer, str) and layer not in ("auto",) and layer not in self.named_layers() \
                and f"model.{layer}" in self.named_layers():
            layer = f"model.{layer}"
        return super().find_layer(layer, x)


class Concept(Target):
    """Explain concept `k` of `bank` (an int or a per-example list) instead of a class."""

    def __init__(self, bank: ConceptBank, k):
        if not isinstance(bank, ConceptBank):
            raise SaliencyError(f"Concept needs a ConceptBank (sk.concepts.extract), got {type(bank).__name__}")
        ks = k if isinstance(k, (list, tuple)) else [k]
        for j in ks:
            if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < bank.n_concepts:
                raise SaliencyError(f"concept index {j!r} is not in 0..{bank.n_concepts - 1}")
        self.bank, self.k = bank, k
        self._views: dict = {}

    def __repr__(self):
        return f"Concept(k={self.k}, bank={self.bank})"

    def subject_view(self, subject):
        """(the concept view of `subject`, the class target over its concept outputs)."""
        if isinstance(subject, ConceptSubject):
            return subject, Class(self.k)
        if getattr(subject, "subject_kind", None) != "classifier":
            raise SaliencyError("a Concept target needs an image classifier Subject")
        view = self._views.get(id(subject))
        if view is None or view.base is not subject:
            view = ConceptSubject(subject, self.bank)
            self._views = {id(subject): view}
        return view, Class(self.k)

    def resolve(self, subject, logits):
        if not isinstance(subject, ConceptSubject):
            raise SaliencyError("a Concept target is resolved on the concept view of the subject "
                                "(sk.explain and sk.evaluate do this)")
        return Class(self.k).resolve(subject, logits)


__all__ = ["Concept", "ConceptSubject", "ConceptHead"]
