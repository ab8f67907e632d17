"""`Explanation`: the maps a method produced plus everything needed to reproduce and read them."""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import SaliencyError
from .maps import normalize_maps  # noqa: F401  (re-exported: it lived here)


def package_versions() -> dict:
    import platform

    import torchvision

    from .version import __version__

    return {"saliencykit": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


SAVED_FILES = ("maps.npz", "explanation.json")  # what `Explanation.save` writes into its folder
COMPLETENESS_LIMIT = 0.05   # relative completeness error above which a path method's map is flagged
UNSURE_BELOW = 0.25         # top-1 probability below which the prediction is flagged as unsure


def _as_stored(t: torch.Tensor) -> torch.Tensor:
    """A map as an Explanation keeps it: on the CPU, float64 when computed in float64 (a float64
    model keeps its precision), float32 otherwise (half, bfloat16 and integer maps widened)."""
    t = t.detach().cpu()
    return t if t.dtype == torch.float64 else t.float()


def _pct(v: float) -> str:
    return f"{100 * float(v):.0f} %" if float(v) >= 0.01 else f"{100 * float(v):.1f} %"


def map_warnings(signed: bool, maps: torch.Tensor, target: list, params: dict, extras: dict,
                 top: list | None = None) -> list[dict]:
    """Warnings a person can act on, one dict per example and kind: `{"code", "example", "message",
    "short"}` (`short`: the few words a picture has room for), and `value`, the measured number the
    warning is about, where there is one.

    - `completeness`: a path method's attributions miss the score difference by more than
      `COMPLETENESS_LIMIT` (relative); the remedy is more integration steps.
    - `one_signed`: a signed map of a contrast that is of one sign everywhere: nothing in the photo
      counts for one side, so its colours show only where the other side leads most or least.
    - `unsure`: the model's top-1 probability is below `UNSURE_BELOW` (`top`: per example
      `(label, probability)` of the top answer).
    Only the metadata and the maps are read; nothing is changed.
    """
    out = []
    rel = extras.get("relative_completeness_error")
    for i, r in enumerate(rel or []):
        if r is not None and float(r) > COMPLETENESS_LIMIT:
            steps = params.get("steps")
            more = f"more steps (now {steps}; try {4 * steps})" if isinstance(steps, int) else "more steps"
            out.append({"code": "completeness", "example": i, "value": float(r),
                        "short": f"completeness error {_pct(r)}: use {more.split(' (')[0]}",
                        "message": f"the attributions miss the score difference by {_pct(r)} "
                                   f"(completeness error above {_pct(COMPLETENESS_LIMIT)}); the map is a coarse "
                                   f"estimate of the path integral: use {more}"})
    for i, t in enumerate(target):
        if not signed or not isinstance(t, dict) or t.get("kind") != "contrast" or i >= maps.shape[0]:
            continue
        m = maps[i]
        lo, hi = float(m.min()), float(m.max())
        if lo == hi:
            continue
        a, b = t.get("name", "").split(" vs ")[0], t.get("vs_name", "the other class")
        if hi <= 0:
            out.append({"code": "one_signed", "example": i, "short": "negative everywhere (see the words)",
                        "message": f"the contrast map is negative everywhere: no part of the photo "
                                   f"counts for {a} over {b}; the colours show where {b} leads most"})
        elif lo >= 0:
            out.append({"code": "one_signed", "example": i, "short": "positive everywhere (see the words)",
                        "message": f"the contrast map is positive everywhere: no part of the photo "
                                   f"counts for {b} over {a}; the colours show where {a} leads most"})
    for i, (label, prob) in enumerate(top or []):
        if prob < UNSURE_BELOW:
            out.append({"code": "unsure", "example": i, "value": float(prob), "short": f"the model is unsure: {_pct(prob)}",
                        "message": f"the model is unsure: {_pct(prob)} for its top answer, {label}; a map of an "
                                   "unsure prediction explains a guess"})
    return out


@dataclass
class Explanation:
    maps: torch.Tensor                      # [B,H,W] at input resolution ([B,T], [B,D,H,W], [B,F]: `layout`): float32, or float64 from a float64 model
    method: str
    signed: bool = False
    target: list = field(default_factory=list)   # per example: kind, indices, name (+ vs_*)
    layer: str | None = None
    params: dict = field(default_factory=dict)
    seed: int | None = None
    passes: dict = field(default_factory=lambda: {"forward": 0, "backward": 0})
    seconds: float = 0.0
    raw: torch.Tensor | None = None          # [B,h,w] layer-resolution map, when there is one
    attributions: torch.Tensor | None = None  # [B,C,H,W] input-space attributions (the input's shape), when there are
    versions: dict = field(default_factory=dict)
    model: str | None = None
    extras: dict = field(default_factory=dict)
    layout: str = "BCHW"                    # the input's axes (`subject.LAYOUTS`); maps drop its channel axis

    def __post_init__(self):
        from .subject import LAYOUTS, check_layout

        self.layout = check_layout(self.layout)
        axes = LAYOUTS[self.layout][0].replace("C", "")
        if not isinstance(self.maps, torch.Tensor) or self.maps.dim() != len(axes) + 1:
            raise SaliencyError(f"Explanation maps of a {self.layout} input must be a [B,{','.join(axes)}] tensor, got "
                                f"{getattr(self.maps, 'shape', type(self.maps))}")
        self.maps = _as_stored(self.maps)
        if self.raw is not None:
            self.raw = _as_stored(self.raw)
        if self.attributions is not None:
            self.attributions = _as_stored(self.attributions)
        if not self.versions:
            self.versions = package_versions()

    # ------------------------------------------------------------------------------ access
    def __len__(self):
        return self.maps.shape[0]

    def __repr__(self):
        names = ", ".join(t.get("name", "?") for t in self.target[:3])
        return (f"Explanation({self.method}, maps={tuple(self.maps.shape)}, signed={self.signed}, "
                f"target=[{names}], layer={self.layer}, passes={self.passes})")

    def __getitem__(self, i: int) -> "Explanation":
        """One example of a batch as its own Explanation."""
        sl = slice(i, i + 1) if isinstance(i, int) else i
        return Explanation(
            maps=self.maps[sl], method=self.method, signed=self.signed, target=self.target[sl],
            layer=self.layer, params=dict(self.params), seed=self.seed, passes=dict(self.passes),
            seconds=self.seconds, raw=None if self.raw is None else self.raw[sl],
            attributions=None if self.attributions is None else self.attributions[sl],
            versions=dict(self.versions), model=self.model, extras=_extras_of(self.extras, i), layout=self.layout)

    @property
    def warnings(self) -> list[dict]:
        """`extras["warnings"]`: what a person should know before reading the maps (see `map_warnings`)."""
        return list(self.extras.get("warnings", []))

    def normalized(self) -> torch.Tensor:
        return normalize_maps(self.maps, self.signed)

    def metadata(self) -> dict:
        return {"method": self.method, "signed": self.signed, "target": self.target, "layer": self.layer,
                "params": _jsonable(self.params), "seed": self.seed, "passes": self.passes,
                "seconds": self.seconds, "versions": self.versions, "model": self.model,
                "shape": list(self.maps.shape), "extras": _jsonable(self.extras), "layout": self.layout}

    @staticmethod
    def random_like(exp: "Explanation", seed: int = 0) -> "Explanation":
        """A uniform-random map of the same shape: the baseline every comparison should include."""
        g = torch.Generator().manual_seed(seed)
        maps = torch.rand(exp.maps.shape, generator=g)
        return Explanation(maps=maps, method="random", signed=False, target=list(exp.target),
                           params={}, seed=seed, model=exp.model, layout=exp.layout)

    # ------------------------------------------------------------------------------ display
    def overlay(self, image, index: int = 0, alpha: float = 0.5, cmap: str | None = None):
        """The map blended over the photo (resized to the photo), as a PIL image."""
        from .maps import overlay

        if self.layout != "BCHW":
            raise SaliencyError(f"overlay draws a map over a photo; this explanation is of a {self.layout} input "
                                "(for a series use saliencykit.present.viz.series_plot)")
        return overlay(image, self.maps[index], signed=self.signed, alpha=alpha, cmap=cmap)

    # ------------------------------------------------------------------------------ saving
    def save(self, path) -> Path:
        """Write `maps.npz` + `explanation.json` into the directory `path`, atomically."""
        from .files import atomic_dir

        def write(tmp):
            arrays = {"maps": self.maps.numpy()}
            if self.raw is not None:
                arrays["raw"] = self.raw.numpy()
            if self.attributions is not None:
                arrays["attributions"] = self.attributions.numpy()
            np.savez_compressed(tmp / "maps.npz", **arrays)
            (tmp / "explanation.json").write_text(json.dumps(self.metadata(), indent=2))

        return atomic_dir(path, write, SAVED_FILES, "a saved explanation")

    @classmethod
    def load(cls, path) -> "Explanation":
        path = Path(path)
        if path.is_file():
            path = path.parent
        meta_file, npz_file = path / "explanation.json", path / "maps.npz"
        if not meta_file.exists() or not npz_file.exists():
            raise SaliencyError(f"{path} is not a saved explanation (needs explanation.json and maps.npz)")
        try:
            meta = json.loads(meta_file.read_text())
        except (UnicodeDecodeError, ValueError) as err:
            raise SaliencyError(f"{meta_file} is damaged: not valid JSON ({err})") from None
        if not isinstance(meta, dict) or not {"method", "signed", "target"} <= set(meta):
            raise SaliencyError(f"{meta_file} is not a saved explanation's metadata: it needs the keys method, "
                                "signed and target")
        try:
            with np.load(npz_file, allow_pickle=False) as data:  # never unpickle: a file can carry code
                arrays = {k: torch.from_numpy(data[k].copy()) for k in data.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, TypeError) as err:
            raise SaliencyError(f"{npz_file} is damaged or not a saliencykit maps file "
                                f"({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})") from None
        if "maps" not in arrays:
            raise SaliencyError(f"{npz_file} holds no 'maps' array (it has {sorted(arrays) or 'nothing'})")
        return cls(maps=arrays["maps"], method=meta["method"], signed=meta["signed"], target=meta["target"],
                   layer=meta.get("layer"), params=meta.get("params", {}), seed=meta.get("seed"),
                   passes=meta.get("passes", {}), seconds=meta.get("seconds", 0.0), raw=arrays.get("raw"),
                   attributions=arrays.get("attributions"), versions=meta.get("versions", {}),
                   model=meta.get("model"), extras=meta.get("extras", {}), layout=meta.get("layout", "BCHW"))


def _extras_of(extras: dict, i) -> dict:
    """The extras of example `i` of a batch: its own warnings, renumbered from 0."""
    out = dict(extras)
    if "warnings" in extras:
        start = i if isinstance(i, int) else (i.start or 0)
        stop = start + 1 if isinstance(i, int) else i.stop
        out["warnings"] = [dict(w, example=w["example"] - start) for w in extras["warnings"]
                           if start <= w.get("example", 0) and (stop is None or w.get("example", 0) < stop)]
    return out


def _jsonable(value: Any):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 16 else f"<tensor {tuple(value.shape)}>"
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 16 else f"<array {value.shape}>"
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)
