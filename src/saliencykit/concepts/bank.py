"""Concept banks: CRAFT's concept extraction (Fel et al. 2023) and where each concept sits.

CRAFT, as implemented here:
  1. random square crops of every image (side `crop` x the image side, seeded), each resized to
     the input size;
  2. the crops' activations at `layer`, averaged over space: one non-negative vector per crop
     (`A`, [n_crops, C]; a layer with negative outputs is clamped at 0 and the clamp reported);
  3. non-negative matrix factorisation `A ~ U W` (scikit-learn, seeded): the `k` rows of `W`
     ([k, C]) are the concept directions, the bank's `basis`.

A concept's map on an image is its coefficient at every location of the layer: the activation
vector `a` at each location is decomposed on the fixed basis by non-negative least squares,
`u = argmin_{u >= 0} |a - u W|`, so the maps of all concepts recombine (`sum_k u_k W_k`) into the
projection of the activation on the bank; the relative error of that projection is reported.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import SaliencyError, positive_int

METHODS = ("craft", "ace")
# extractors other than CRAFT, registered by their modules (concepts.ace), which import this one:
# name -> (function(subject, x, layer, n_concepts, seed, batch_size, **options), accepted options)
EXTRACTORS: dict = {}


@dataclass
class ConceptBank:
    """`basis` [k, C] non-negative concept directions at `layer` of the model they came from."""

    basis: torch.Tensor
    layer: str
    method: str = "craft"
    seed: int | None = 0
    model: str | None = None
    params: dict = field(default_factory=dict)
    reconstruction_error: float = float("nan")   # |A - UW|_F / |A|_F on the crops it was fitted to
    passes: dict = field(default_factory=lambda: {"forward": 0.0, "backward": 0.0})
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        b = torch.as_tensor(self.basis, dtype=torch.float32)
        if b.dim() != 2 or b.shape[0] < 1:
            raise SaliencyError(f"a concept basis must be [k, channels], got shape {tuple(b.shape)}")
        if (b < 0).any():
            raise SaliencyError("a concept basis must be non-negative")
        self.basis = b.detach().cpu()

    @property
    def n_concepts(self) -> int:
        return int(self.basis.shape[0])

    def __len__(self):
        return self.n_concepts

    def __repr__(self):
        return (f"ConceptBank({self.method}, k={self.n_concepts}, layer={self.layer!r}, channels="
                f"{self.basis.shape[1]}, reconstruction_error={self.reconstruction_error:.3f})")

    def split(self, k: int, subject, images, layer, n_concepts: int = 3, seed: int | None = None,
              **kwargs) -> "ConceptBank":
        """The sub-concepts of concept `k` at an earlier `layer` (CRAFT's recursive split; see
        `split_concept`)."""
        return split_concept(self, subject, images, k, layer, n_concepts, seed, **kwargs)

    def metadata(self) -> dict:
        from ..explanation import _jsonable, package_versions

        return {"layer": self.layer, "method": self.method, "seed": self.seed, "model": self.model,
                "params": _jsonable(self.params), "reconstruction_error": self.reconstruction_error,
                "passes": self.passes, "extras": _jsonable(self.extras), "shape": list(self.basis.shape),
                "versions": package_versions()}

    def save(self, path) -> Path:
        """`basis.npz` + `bank.json` in the directory `path`, written whole or not at all."""
        from ..files import atomic_dir

        def write(tmp):
            np.savez_compressed(tmp / "basis.npz", basis=self.basis.numpy())
            (tmp / "bank.json").write_text(json.dumps(self.metadata(), indent=2))

        return atomic_dir(path, write, ("basis.npz", "bank.json"), "a saved concept bank")

    @classmethod
    def load(cls, path) -> "ConceptBank":
        path = Path(path)
        meta_file, npz_file = path / "bank.json", path / "basis.npz"
        if not meta_file.exists() or not npz_file.exists():
            raise SaliencyError(f"{path} is not a saved concept bank (needs bank.json and basis.npz)")
        try:
            meta = json.loads(meta_file.read_text())
            with np.load(npz_file, allow_pickle=False) as data:
                basis = torch.from_numpy(data["basis"].copy())
        except (OSError, ValueError, KeyError) as err:
            raise SaliencyError(f"{path} holds a damaged concept bank ({type(err).__name__}: {err})") from None
        return cls(basis=basis, layer=meta["layer"], method=meta.get("method", "craft"), seed=meta.get("seed"),
                   model=meta.get("model"), params=meta.get("params", {}),
                   reconstruction_error=float(meta.get("reconstruction_error", float("nan"))),
                   passes=meta.get("passes", {}), extras=meta.get("extras", {}))


# ------------------------------------------------------------------------------ activations
def layer_activations(subject, x: torch.Tensor, layer: str, batch_size: int = 32, counter=None,
                      with_logits: bool = False, spatial: bool = True):
    """[N, C, h, w] activations of `layer` for `x`, without gradient, in chunks; with `with_logits`
    also the model's logits of the same passes (`(acts, logits)`). Rows are counted in `counter`.
    `spatial=False` accepts a layer of any output shape (TCAV works on flattened activations)."""
    outs, logits = [], []
    with torch.no_grad(), subject.explaining():
        for s in range(0, x.shape[0], batch_size):
            with subject.capture([layer]) as cap:
                logits.append(subject.forward(x[s:s + batch_size]).detach())
                a = cap.get(layer)
            if counter is not None:
                counter.add(forward=logits[-1].shape[0])
            if not isinstance(a, torch.Tensor) or (spatial and a.dim() != 4):
                shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
                raise SaliencyError(f"layer {layer!r} has no spatial output [B,C,h,w] (got {shape}); concepts "
                                    "need a convolutional feature map: pick a conv block's layer")
            outs.append(a.detach().float().cpu())
    acts = torch.cat(outs)
    return (acts, torch.cat(logits)) if with_logits else acts


def random_crops(x: torch.Tensor, per_image: int, crop: float, generator: torch.Generator) -> torch.Tensor:
    """`per_image` random square crops of side `crop` x min(H, W) per image, resized to [H, W]."""
    N, C, H, W = x.shape
    side = max(2, int(round(crop * min(H, W))))
    tops = torch.randint(0, H - side + 1, (N, per_image), generator=generator)
    lefts = torch.randint(0, W - side + 1, (N, per_image), generator=generator)
    crops = [x[i, :, t:t + side, l_:l_ + side] for i in range(N) for t, l_ in zip(tops[i].tolist(), lefts[i].tolist())]
    return torch.nn.functional.interpolate(torch.stack(crops), size=(H, W), mode="bilinear", align_corners=False)


def _as_input(subject, images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return subject.check_input(images)
    from ..datasets.sources import open_source

    source = open_source(images)
    pics = []
    for item in source.items():
        if item.problem:
            continue
        try:
            pics.append(source.decode(item).image)
        except SaliencyError:
            continue
    if not pics:
        raise SaliencyError(f"no readable image in {images!r}")
    return subject.preprocess(pics)


def extract(subject, images, layer="auto", method: str = "craft", n_concepts: int = 10, seed: int | None = 0,
            crops_per_image: int = 8, crop: float = 0.5, max_iter: int = 500, batch_size: int = 32,
            **options) -> ConceptBank:
    """A concept bank for `subject` at `layer` from `images` (a [N,3,H,W] input tensor or any
    dataset source: a folder, a list, `parts:N`, ...). See the module docstring for CRAFT, and
    `concepts.ace` for `method="ace"`, whose own settings (`resolutions`, `min_area`, `top`,
    `tcav_runs`, `target`) go in `options`."""
    if method not in METHODS:
        raise SaliencyError(f"unknown concept extractor {method!r}; available: {', '.join(METHODS)}")
    k = positive_int(n_concepts, "n_concepts")
    per = positive_int(crops_per_image, "crops_per_image")
    if not 0 < float(crop) <= 1:
        raise SaliencyError(f"crop must be a fraction of the image side in (0, 1], got {crop}")
    if seed is None:
        import secrets

        seed = secrets.randbelow(2**31)
    if method in EXTRACTORS:
        run, accepted = EXTRACTORS[method]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise SaliencyError(f"unknown option(s) {unknown} for the {method} extractor; accepted: {', '.join(accepted)}")
        x = _as_input(subject, images)
        return run(subject, x, subject.find_layer(layer, x[:1])[0], k, int(seed), batch_size, **options)
    if options:
        raise SaliencyError(f"unknown option(s) {sorted(options)} for the CRAFT extractor")
    x = _as_input(subject, images)
    n_crops = x.shape[0] * per
    if n_crops < 2 * k:
        raise SaliencyError(f"{x.shape[0]} image(s) x {per} crops = {n_crops} crops is too few for {k} concepts: "
                            f"give at least {-(-2 * k // per)} images or more crops_per_image")
    name = subject.find_layer(layer, x[:1])[0]
    g = torch.Generator().manual_seed(int(seed))
    crops = random_crops(x.cpu(), per, float(crop), g).to(x.device)
    acts = layer_activations(subject, crops, name, batch_size)       # [n_crops, C, h, w]
    Wb, err, extras = _nmf(acts, name, k, seed, max_iter)
    extras = {"crops": n_crops, "images": int(x.shape[0]), **extras}
    return ConceptBank(basis=torch.from_numpy(Wb).float(), layer=name, method=method, seed=int(seed),
                       model=getattr(subject, "name", None),
                       params={"n_concepts": k, "crops_per_image": per, "crop": float(crop), "max_iter": max_iter},
                       reconstruction_error=err, passes={"forward": float(n_crops) / x.shape[0], "backward": 0.0},
                       extras=extras)


def _nmf(acts: torch.Tensor, name: str, k: int, seed: int, max_iter: int):
    """CRAFT's factorisation of crop activations [n, C, h, w] at layer `name` (spatial mean,
    negatives clamped): -> (basis [k, C] numpy, relative reconstruction error, extras)."""
    from sklearn.decomposition import NMF

    negative = float((acts < 0).float().mean())
    A = acts.clamp(min=0).mean((2, 3)).double().numpy()
    if not np.isfinite(A).all():
        raise SaliencyError(f"layer {name!r} gave non-finite activations")
    if (A.sum(1) == 0).all():
        raise SaliencyError(f"layer {name!r} is zero on every crop (after clamping negatives): choose another layer")
    nmf = NMF(n_components=k, init="nndsvda", random_state=int(seed), max_iter=int(max_iter), tol=1e-5)
    U = nmf.fit_transform(A)
    Wb = nmf.components_
    err = float(np.linalg.norm(A - U @ Wb) / max(np.linalg.norm(A), 1e-12))
    extras = {"negative_fraction_clamped": negative, "nmf_iterations": int(nmf.n_iter_)}
    if negative > 0.01:
        extras["warnings"] = [f"{negative:.0%} of the activations at {name} are negative and were clamped to 0: "
                              "NMF needs non-negative features (a layer after a ReLU is the natural choice)"]
    return Wb, err, extras


def split_concept(bank: ConceptBank, subject, images, k: int, layer, n_concepts: int = 3, seed: int | None = None,
                  max_iter: int = 500, batch_size: int = 32) -> ConceptBank:
    """CRAFT's recursive split: the sub-concepts of concept `k` of `bank` at an EARLIER `layer`.
    Random crops of `images` are made as the bank's were (its `crops_per_image`, `crop`; `seed`
    defaults to the bank's); the crops where concept k has the largest part `|u_k| |W_k|` of the
    activation at the bank's layer (u: NNLS coefficients) are kept, and NMF of their activations at `layer` gives `n_concepts`
    sub-concepts. The new bank records its parent in `extras["parent"]`."""
    m = positive_int(n_concepts, "n_concepts")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < bank.n_concepts:
        raise SaliencyError(f"concept index {k!r} is not in 0..{bank.n_concepts - 1}")
    seed = bank.seed if seed is None else seed
    seed = int(seed) if seed is not None else 0
    x = _as_input(subject, images)
    name = subject.find_layer(layer, x[:1])[0]
    order = list(subject.named_layers())
    if name == bank.layer or (name in order and bank.layer in order and order.index(name) > order.index(bank.layer)):
        raise SaliencyError(f"split a concept at a layer before the bank's ({bank.layer!r}); {name!r} is not earlier")
    per = int(bank.params.get("crops_per_image", 8))
    g = torch.Generator().manual_seed(seed)
    crops = random_crops(x.cpu(), per, float(bank.params.get("crop", 0.5)), g).to(x.device)
    coarse = layer_activations(subject, crops, bank.layer, batch_size)
    if coarse.dim() != 4 or coarse.shape[1] != bank.basis.shape[1]:
        raise SaliencyError(f"the bank has {bank.basis.shape[1]} channels and layer {bank.layer!r} has "
                            f"{coarse.shape[1]}: the bank was made on another model or layer")
    W = bank.basis.double().numpy()
    U = nnls(coarse.clamp(min=0).mean((2, 3)).double().numpy(), W)
    part = U * np.linalg.norm(W, axis=1)              # each concept's part of the crop's activation, |u_k W_k|
    chosen = np.nonzero((part.argmax(1) == k) & (part[:, k] > 0))[0]
    if len(chosen) < 2 * m:
        raise SaliencyError(f"concept {k} leads only {len(chosen)} of {len(U)} crops, too few for {m} sub-concepts "
                            f"(need {2 * m}): give more images or ask for fewer sub-concepts")
    fine = layer_activations(subject, crops[torch.from_numpy(chosen).to(crops.device)], name, batch_size)
    Wb, err, extras = _nmf(fine, name, m, seed, max_iter)
    extras = {"crops": int(len(chosen)), "crops_made": int(len(U)), "images": int(x.shape[0]), **extras,
              "parent": {"layer": bank.layer, "concept": k, "method": bank.method, "n_concepts": bank.n_concepts}}
    return ConceptBank(basis=torch.from_numpy(Wb).float(), layer=name, method="craft", seed=seed,
                       model=getattr(subject, "name", None),
                       params={"n_concepts": m, "crops_per_image": per, "crop": float(bank.params.get("crop", 0.5)),
                               "max_iter": max_iter},
                       reconstruction_error=err,
                       passes={"forward": (len(U) + len(chosen)) / x.shape[0], "backward": 0.0}, extras=extras)


# ------------------------------------------------------------------------------ where concepts sit
@dataclass
class ConceptMaps:
    """Per image and concept the coefficient at each layer location (`layer_maps` [B,k,h,w]) and
    upsampled to the input (`maps` [B,k,H,W]); `coefficients` [B,k] is their spatial mean, and
    `projection_error` [B] the relative error of sum_k u_k W_k against the activation."""

    layer_maps: torch.Tensor
    maps: torch.Tensor
    coefficients: torch.Tensor
    projection_error: torch.Tensor


def nnls(a: np.ndarray, basis: np.ndarray, max_iter: int = 500) -> np.ndarray:
    """Non-negative coefficients u [n, k] minimising |a - u basis| for every row of a [n, C]."""
    from sklearn.decomposition import non_negative_factorization

    k = basis.shape[0]
    u, _, _ = non_negative_factorization(np.ascontiguousarray(a, dtype=np.float64), H=basis.astype(np.float64),
                                         n_components=k, update_H=False, max_iter=max_iter, tol=1e-6)
    return u


def decompose(acts: torch.Tensor, bank: ConceptBank) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [B,C,h,w] (clamped at 0) on the bank's basis, one NNLS over every location of
    every image: -> (coefficients [B,k,h,w], relative projection error [B])."""
    acts = acts.clamp(min=0)
    B, C, h, w = acts.shape
    if C != bank.basis.shape[1]:
        raise SaliencyError(f"the bank has {bank.basis.shape[1]} channels and layer {bank.layer!r} has {C}: the "
                            "bank was made on another model or layer")
    a = acts.permute(0, 2, 3, 1).reshape(-1, C).double().numpy()
    W = bank.basis.double().numpy()
    u = nnls(a, W)
    err = np.linalg.norm((a - u @ W).reshape(B, -1), axis=1) / np.maximum(np.linalg.norm(a.reshape(B, -1), axis=1),
                                                                          1e-12)
    layer_maps = torch.from_numpy(u).float().reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous()
    return layer_maps, torch.from_numpy(err).float()


def concept_maps(subject, bank: ConceptBank, x: torch.Tensor, batch_size: int = 32) -> ConceptMaps:
    """Where each concept of `bank` sits in each image of `x` (see the module docstring)."""
    x = subject.check_input(x)
    layer_maps, err = decompose(layer_activations(subject, x, bank.layer, batch_size), bank)
    maps = torch.nn.functional.interpolate(layer_maps, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    return ConceptMaps(layer_maps, maps, layer_maps.mean((2, 3)), err)


def best_match_iou(maps: torch.Tensor, masks: dict) -> dict:
    """How well concepts find known parts: for each part (a [B,H,W] bool mask per part name), the
    best concept's mean IoU over the images showing the part, where a concept map is cut at the
    part's own area (its top pixels, as many as the part has), so every part is judged at its
    size. `maps` is [B,k,H,W]. Returns {part: (iou, concept)}."""
    B, k = maps.shape[:2]
    flat = maps.reshape(B, k, -1)
    out = {}
    for part, m in masks.items():
        m = torch.as_tensor(m).reshape(B, -1).bool()
        area = m.sum(1)
        shown = area > 0
        if not shown.any():
            continue
        ious = torch.zeros(k)
        for j in range(k):
            vals = []
            for b in torch.nonzero(shown).flatten().tolist():
                top = torch.topk(flat[b, j], int(area[b])).indices
                pred = torch.zeros_like(m[b])
                pred[top] = True
                vals.append(float((pred & m[b]).sum()) / float((pred | m[b]).sum()))
            ious[j] = float(np.mean(vals))
        j = int(ious.argmax())
        out[part] = (float(ious[j]), j)
    return out


__all__ = ["ConceptBank", "ConceptMaps", "extract", "split_concept", "concept_maps", "decompose", "layer_activations", "random_crops", "nnls",
           "best_match_iou"]
