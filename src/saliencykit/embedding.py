"""Integer and bool inputs (token ids `[B,T]`, flags `[B,F]`) explained at the output of a named
embedding layer: `Subject(model, embedding="emb")`.

Gradients do not reach integers, so the explained tensor is what the embedding makes of them. For
an explain call on such an input, `embedding_view(subject, ids)` runs the model once with a
capture of the embedding's output E `[B,T,D]` (one vector per input position; a module that
gives one number per position, `[B,T]`, counts as D = 1) and returns a view of the subject whose
input is `E` laid out as a series, `z = Eᵀ` `[B,D,T]` (layout BCT: the embedding dimension is the
channel axis, the positions the time axis). The view's forward runs the model on the ids with the
embedding's output replaced by z (`hooks.forward_at`: a forward hook acting on this thread only,
removed in `finally`), so the gradient methods attribute at the embedding and the map, the
channel reduction, is one value per token `[B,T]` (`reduce="sum"`, gradient x input's and IG's
default: the sum over the embedding dimension). Occlusion runs on the same view, forward only: by
default each token alone (`patch=1, stride=1`) is replaced by the baseline embedding, and its map
is the score drop per token; `patch=k` occludes windows of k tokens. KernelSHAP and LIME take
each token as one feature (`segments=[T]` labels group them), hidden tokens taking the baseline
embedding.

`Subject` checks the name (`subject.check_embedding`) and keeps integer inputs as given (`subject.check_ids`).
The "black" baseline of the view is zeros in embedding space, or the embedding of the ids all set
to `baseline_token` when the subject has one. Rows of the view's batches (IG's path points,
SmoothGrad's noisy copies) are fed the first example's ids: the ids reach the model only through
the replaced embedding, which a batch of several examples checks once (the model run with the
examples' ids rolled along the batch must give the same scores); a model that reads the ids
elsewhere too (a padding mask) is explained one example at a time. The view's own forwards (the
capture, the check, the baseline token's embedding) are charged to the call's first method, as
the clean forward is (`setup_passes`).
"""
from __future__ import annotations

import torch

from .errors import SaliencyError
from .hooks import forward_at
from .subject import Subject, extract_logits

# the methods that take gradients at the input and nothing else, and occlusion, KernelSHAP and LIME,
# which replace tokens (one token each by default) by the baseline embedding; the others read the
# input as a signal (blurs, spectra, smooth masks) or the model's layers, which token embeddings
# are not
EMBEDDING_METHODS = ("saliency", "gradxinput", "smoothgrad", "smoothgrad_sq", "vargrad", "integrated_gradients",
                     "occlusion", "kernelshap", "lime")


def _replaced(out, z: torch.Tensor, flat: bool):
    new = z[:, 0] if flat else z.transpose(1, 2)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(new.shape):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SaliencyError(f"the embedding gave {got} for rows replaced by {tuple(new.shape)}; it must give one "
                            "vector per input position, the same at every call")
    return new.to(out.dtype)


def embedding_view(subject, ids: torch.Tensor, methods=()):
    """(the view of `subject` at its embedding's output, that output `[B,D,T]`) for the ids `ids`;
    refuses, naming the ones that work, the `methods` that cannot explain through an embedding.
    Must run inside `subject.explaining()` (eval mode: no dropout in the captured output)."""
    refused = [m for m in methods if m not in EMBEDDING_METHODS]
    if refused:
        raise SaliencyError(f"method(s) {', '.join(refused)} cannot explain integer inputs through the embedding "
                            f"{subject.embedding!r}: they read the input as a signal or the model's layers; use "
                            f"{', '.join(EMBEDDING_METHODS)}")
    view = EmbeddingView(subject, ids)
    return view, view.z


class EmbeddingView(Subject):
    """What `sk.explain` sees of a subject with an embedding: its input is the embedding's output
    `[B,D,T]` for the ids it was made for; everything else (labels, layers, eval mode) is the subject's."""

    token_view = True   # occlusion's defaults: one token at a time, replaced by the baseline embedding

    def __init__(self, subject, ids: torch.Tensor):   # no Subject.__init__: the subject's settings as they are
        self.__dict__.update(subject.__dict__)
        self.base = subject
        self.ids = ids
        self.layout = "BCT"
        self.fast = False            # forwards go through the replacing hook, eagerly
        self._auto_layer_cache = {}
        self.name = f"{subject.name}@{subject.embedding}"
        model, name = subject.model, subject.embedding
        with torch.no_grad():
            raw, out = forward_at(model, name, ids)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
            raise SaliencyError(f"the embedding {name!r} gives {got}, not a float tensor: name the module whose "
                                "output is the first float tensor the ids become")
        shape, want = tuple(out.shape), tuple(ids.shape)
        if shape == want:                        # one number per position: an embedding dimension of 1
            self._flat, z = True, out.unsqueeze(1)
        elif len(shape) == len(want) + 1 and shape[:-1] == want and ids.dim() == 2:
            self._flat, z = False, out.transpose(1, 2)
        else:
            raise SaliencyError(f"the embedding {name!r} gives {shape} for ids {want}: it must give one vector per "
                                "position ([B,T,D]) of ids [B,T]")
        self.z = z.detach().clone()
        self.setup_passes = [ids.shape[0]]          # rows of each forward made here, charged to the call
        self._base = None
        token = getattr(subject, "baseline_token", None)
        if token is not None:                       # the "black" baseline: the embedding of that id
            with torch.no_grad():
                _, out = forward_at(model, name, torch.full_like(ids[:1], token))
            self._base = (out.unsqueeze(1) if self._flat else out.transpose(1, 2)).detach()
            self.setup_passes.append(1)
        if ids.shape[0] > 1 and not torch.equal(ids, ids.roll(1, 0)):
            with torch.no_grad():   # the ids of other examples, the same embedding: the same scores?
                rolled, _ = forward_at(model, name, ids.roll(1, 0), lambda o: _replaced(o, self.z, self._flat))
            self.setup_passes.append(ids.shape[0])
            ref = extract_logits(raw, dense=True).float()
            same = torch.allclose(extract_logits(rolled, dense=True).float(), ref, rtol=1e-4,
                                  atol=1e-5 * float(ref.abs().max().clamp_min(1)))
            if not same:
                raise SaliencyError(f"the model reads the ids elsewhere than through the embedding {name!r} (a "
                                    "padding mask?): explain one example at a time (a batch of one)")

    def check_input(self, x):
        return x

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The model on the ids with the embedding's output replaced by `z` [N,D,T]."""
        ids = self.ids[:1].expand(z.shape[0], *self.ids.shape[1:])
        out, _ = forward_at(self.model, self.base.embedding, ids, lambda o: _replaced(o, z, self._flat))
        return extract_logits(out, dense=True)

    __call__ = forward

    def black(self, x: torch.Tensor) -> torch.Tensor:
        """Zeros in embedding space, or the embedding of the ids all set to the subject's `baseline_token`."""
        if self._base is None:
            return torch.zeros_like(x)
        return self._base.to(x.dtype).expand_as(x).clone()


__all__ = ["EMBEDDING_METHODS", "EmbeddingView", "embedding_view"]
