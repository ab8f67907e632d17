"""Object detectors: `Box` targets, detector adapters and D-RISE.

A detector is queried as a black box on photos (uint8 `HxWx3` RGB arrays; many detectors do
their own preprocessing), so maps come back at photo size.

* `Detector(fn)`: the adapter protocol. `fn(image) -> (boxes [K,4] x1y1x2y2 in pixels, scores [K],
  classes [K])` or a mapping with `boxes`, `scores`, `labels` (torchvision style) and optionally
  `probs` `[K,C]` (full class probabilities) and `objectness` `[K]`. With `batched=True`, `fn`
  takes a list of images and returns a list of such results (YOLO-style and custom detectors).
* `load_detector(name)`: `"opencv:haarcascade_frontalface_default"` (any OpenCV Haar cascade),
  `"skimage:lbp_frontal_face"`, `"mtcnn"` (facenet-pytorch), `"torchvision:NAME[:random]"`.
* `Box(i)`: the i-th detection of the unperturbed photo (by decreasing score); `Box(label=c)`: the
  best detection of class c; `Box(box=(x1,y1,x2,y2), label=c)`: an explicit box with a one-hot class
  vector (to explain a miss).
* `sk.explain(detector, photo, "drise", target=Box(i))` (or `drise(detector, photo, targets)`):
  D-RISE (Petsiuk et al. 2021). N random masks (s x s grid cells kept with probability p,
  upsampled to `(s+1) * cell size` and randomly shifted), the detector run on every masked photo
  `M ⊙ I` through the shared perturbation runner, and for each target `w_i = max_j IoU(L_t, L_j) ·
  cos(P_t, P_j) · O_t O_j`; `S_t = Σ_i w_i M_i / (N p)`. One set of masked passes serves every
  target (one `[T, N] @ [N, H·W]` product per chunk).
* `sk.explain(detector, photo, "gradcam", target=Box(i))` (or `detector_gradcam`): Grad-CAM of
  one detection of a torchvision detector.

A `Detector` is a subject of kind "detector" for `sk.explain`: its input is the photo itself
(`check_input` turns it into a `[1, 3, H, W]` float tensor of its pixel values, `forward` turns
masked copies back into uint8 photos and detects), its targets are `Box`es, and the methods
registered for that kind (`DRISE`, `DetectorGradCAM`) run on the same `Context` as every other.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..engine import generator, perturbed_scores
from ..errors import SaliencyError, positive_int
from ..hooks import this_thread_only
from ..methods.base import Method, explain, register
from ..subject import LayerCapture
from ..targets import Target


@dataclass
class Detections:
    """Detections of one image: boxes `[K,4]` (x1,y1,x2,y2 pixels), scores `[K]`, classes `[K]`,
    class-probability vectors `[K,C]` and objectness `[K]` (1 where the detector has none)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    probs: torch.Tensor
    objectness: torch.Tensor

    def __len__(self):
        return self.boxes.shape[0]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix `[A, B]` of x1y1x2y2 boxes (0 for empty boxes)."""
    a, b = a.double(), b.double()
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def detection_similarity(t: Detections, d: Detections) -> torch.Tensor:
    """`[T, K]` = IoU(L_t, L_j) · cos(P_t, P_j) · O_t · O_j (D-RISE)."""
    if len(d) == 0:
        return torch.zeros(len(t), 0, dtype=torch.float64)
    iou = box_iou(t.boxes, d.boxes)
    pt, pd = t.probs.double(), d.probs.double()
    if pt.shape[1] != pd.shape[1]:
        raise SaliencyError(f"class vectors differ in length ({pt.shape[1]} vs {pd.shape[1]})")
    cos = F.normalize(pt, dim=1, eps=1e-12) @ F.normalize(pd, dim=1, eps=1e-12).t()
    return iou * cos * t.objectness.double()[:, None] * d.objectness.double()[None, :]


# ------------------------------------------------------------------------------------ adapters
def _as_photo(photo) -> np.ndarray:
    from ..images import load_image

    if isinstance(photo, np.ndarray) and photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3:
        return photo
    if isinstance(photo, torch.Tensor):
        raise SaliencyError("a detector takes the photo itself (PIL image, path or uint8 HxWx3 array), "
                            "not a preprocessed tensor")
    return np.asarray(load_image(photo), dtype=np.uint8)


class Detector:
    """A detector queried as a black box (see the module docstring for the protocol).

    Args:
        fn: the detector callable.
        num_classes: length of the class vectors (default: inferred, at least max class + 1).
        class_names: optional names, index = class id.
        batched: `fn` takes a list of images.
        name: shown in reports.
    """

    def __init__(self, fn: Callable, num_classes: int | None = None, class_names: Sequence[str] | None = None,
                 batched: bool = False, name: str | None = None):
        if not callable(fn):
            raise SaliencyError(f"Detector needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.class_names = list(class_names) if class_names is not None else None
        self.num_classes = num_classes or (len(self.class_names) if self.class_names else None)
        self.batched = batched
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.calls = 0

    # a subject for `sk.explain`: which methods run on it, no faster model forms (it is a black
    # box), and the rows of one chunk of masked photos (it cannot be probed for memory)
    subject_kind = "detector"
    fast = False
    chunk_rows = 16

    def __repr__(self):
        return f"Detector({self.name})"

    def check_input(self, photo) -> torch.Tensor:
        """The photo (PIL image, path or uint8 HxWx3 array) as a `[1, 3, H, W]` float tensor of its
        pixel values 0..255: masking blends it like any input, `forward` rounds it back."""
        return torch.from_numpy(_as_photo(photo).astype(np.float32)).permute(2, 0, 1)[None].contiguous()

    def forward(self, x: torch.Tensor) -> list[Detections]:
        """Detections of each row of `x` (`[k, 3, H, W]` pixel values, rounded to uint8)."""
        photos = x.detach().round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return self.detect(list(photos))

    def explaining(self):
        import contextlib

        return contextlib.nullcontext()

    def target_for(self, target) -> "Boxes":
        """None (every detection of the clean photo), a `Box`, or a list of `Box`."""
        if target is None:
            return Boxes(None)
        if isinstance(target, Boxes):
            return target
        if isinstance(target, Box):
            return Boxes([target])
        if isinstance(target, (list, tuple)) and target and all(isinstance(t, Box) for t in target):
            return Boxes(list(target))
        raise SaliencyError(f"a detector is explained for sk.Box targets (a detection), got {target!r}")

    def class_index(self, label) -> int:
        if isinstance(label, (int, np.integer)):
            return int(label)
        if isinstance(label, str) and self.class_names and label in self.class_names:
            return self.class_names.index(label)
        raise SaliencyError(f"unknown detector class {label!r}" +
                            (f"; known: {', '.join(self.class_names[:20])}" if self.class_names else ""))

    def _convert(self, result) -> Detections:
        probs = objectness = None
        if isinstance(result, dict) or hasattr(result, "keys"):
            if "boxes" not in result:
                raise SaliencyError(f"detector output has keys {list(result.keys())}; expected boxes, scores, labels")
            boxes, scores = result["boxes"], result.get("scores")
            classes = result.get("labels", result.get("classes"))
            probs, objectness = result.get("probs"), result.get("objectness")
        elif isinstance(result, (tuple, list)) and len(result) == 3:
            boxes, scores, classes = result
        else:
            raise SaliencyError(f"detector returned {type(result).__name__}; expected (boxes, scores, classes) or a "
                                "dict with boxes/scores/labels")
        boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float64) if not isinstance(boxes, torch.Tensor)
                                else boxes.detach().cpu().double()).reshape(-1, 4).double()
        k = boxes.shape[0]
        scores = (torch.ones(k, dtype=torch.float64) if scores is None else
                  torch.as_tensor(np.asarray(scores if not isinstance(scores, torch.Tensor) else
                                             scores.detach().cpu(), dtype=np.float64)).reshape(-1))
        classes = (torch.zeros(k, dtype=torch.long) if classes is None else
                   torch.as_tensor(np.asarray(classes if not isinstance(classes, torch.Tensor) else
                                              classes.detach().cpu())).reshape(-1).long())
        if scores.shape[0] != k or classes.shape[0] != k:
            raise SaliencyError(f"detector returned {k} boxes but {scores.shape[0]} scores / {classes.shape[0]} classes")
        if probs is None:
            probs = self._expand(scores, classes)
        else:
            probs = torch.as_tensor(np.asarray(probs if not isinstance(probs, torch.Tensor) else
                                               probs.detach().cpu(), dtype=np.float64)).reshape(k, -1)
        objectness = (torch.ones(k, dtype=torch.float64) if objectness is None else
                      torch.as_tensor(np.asarray(objectness if not isinstance(objectness, torch.Tensor) else
                                                 objectness.detach().cpu(), dtype=np.float64)).reshape(-1))
        return Detections(boxes, scores, classes, probs, objectness)

    def _expand(self, scores: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """One score + class -> class vector: P[c] = score, the rest (1 - score)/(C - 1); a one-class
        detector (or scores outside [0,1], e.g. cascade weights) gets a one-hot vector."""
        c = self.num_classes or (int(classes.max()) + 1 if classes.numel() else 1)
        k = classes.shape[0]
        if classes.numel() and int(classes.max()) >= c:
            raise SaliencyError(f"detector class {int(classes.max())} >= num_classes {c}")
        onehot = torch.zeros(k, c, dtype=torch.float64)
        onehot[torch.arange(k), classes] = 1.0
        if c == 1 or k == 0 or bool(((scores < 0) | (scores > 1)).any()):
            return onehot
        rest = ((1 - scores) / (c - 1))[:, None].expand(k, c)
        return torch.where(onehot.bool(), scores[:, None].expand(k, c), rest)

    def detect(self, images: Sequence) -> list[Detections]:
        """Run the detector on a list of photos -> one `Detections` per photo."""
        arrays = [_as_photo(im) for im in images]
        raw = self.fn(arrays) if self.batched else [self.fn(a) for a in arrays]
        if len(raw) != len(arrays):
            raise SaliencyError(f"detector returned {len(raw)} results for {len(arrays)} images")
        self.calls += len(arrays)
        out = [self._convert(r) for r in raw]
        c = max((d.probs.shape[1] for d in out if len(d)), default=None)
        if self.num_classes is None and c is not None:
            self.num_classes = c
        return out

    __call__ = detect


def _opencv_cascade(name: str, scale_factor=1.1, min_neighbors=5, min_size=(24, 24)) -> Detector:
    if importlib.util.find_spec("cv2") is None:
        raise SaliencyError("OpenCV cascades need opencv: pip install 'opencv-python-headless<5'")
    import cv2

    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = None if folder is None else f"{folder}{name}.xml"
    import os

    if path is None or not os.path.exists(path):
        raise SaliencyError(f"OpenCV cascade {name!r} not found (cv2 {cv2.__version__} at {cv2.__file__}); OpenCV 5 "
                            "wheels dropped the Haar files: pip install 'opencv-python-headless<5' 'opencv-python<5'")
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise SaliencyError(f"OpenCV could not read the cascade file {path}")

    def detect(img: np.ndarray):
        gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        rects, _levels, weights = cascade.detectMultiScale3(gray, scaleFactor=scale_factor, minNeighbors=min_neighbors,
                                                            minSize=tuple(min_size), outputRejectLevels=True)
        rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
        return boxes, np.asarray(weights, dtype=np.float64).reshape(-1), np.zeros(len(boxes), dtype=np.int64)

    return Detector(detect, num_classes=1, class_names=[name], name=f"opencv:{name}")


def _skimage_lbp() -> Detector:
    from skimage import data as skdata
    from skimage.feature import Cascade

    cascade = Cascade(skdata.lbp_frontal_face_cascade_filename())

    def detect(img: np.ndarray):
        found = cascade.detect_multi_scale(img=img, scale_factor=1.2, step_ratio=1, min_size=(24, 24),
                                           max_size=(img.shape[0], img.shape[1]))
        boxes = np.array([[d["c"], d["r"], d["c"] + d["width"], d["r"] + d["height"]] for d in found],
                         dtype=np.float64).reshape(-1, 4)
        return boxes, np.ones(len(boxes)), np.zeros(len(boxes), dtype=np.int64)

    return Detector(detect, num_classes=1, class_names=["face"], name="skimage:lbp_frontal_face")


def _mtcnn() -> Detector:
    if importlib.util.find_spec("facenet_pytorch") is None:
        raise SaliencyError("mtcnn needs facenet-pytorch: pip install --no-deps facenet-pytorch==2.6.0")
    try:
        from facenet_pytorch import MTCNN
    except ImportError as err:  # facenet-pytorch installed --no-deps can miss e.g. requests
        raise SaliencyError(f"facenet-pytorch could not be imported ({err}); install the missing package") from None
    from PIL import Image

    net = MTCNN(keep_all=True, device="cpu")

    def detect(img: np.ndarray):
        boxes, probs = net.detect(Image.fromarray(img))
        if boxes is None:
            return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
        return {"boxes": boxes, "scores": probs, "labels": np.zeros(len(boxes), dtype=np.int64),
                "objectness": probs}

    return Detector(detect, num_classes=1, class_names=["face"], name="mtcnn")


def _torchvision_detector(spec: str, score_thresh: float = 0.01) -> Detector:
    import torchvision

    name, _, mode = spec.partition(":")
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise SaliencyError(f"unknown torchvision detection model {name!r}") from None
    kwargs = {}
    if mode == "random":
        kwargs = {"weights": None, "weights_backbone": None}
        labels = None
    else:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        kwargs = {"weights": weights}
        labels = weights.meta.get("categories")
    try:
        model = builder(**kwargs)
    except Exception as err:
        raise SaliencyError(f"could not load torchvision:{name} ({type(err).__name__}: {err}); use "
                            f"'torchvision:{name}:random' for random weights") from None
    model.eval()
    for attr in ("score_thresh", "box_score_thresh"):  # keep low-scoring proposals while masking
        for obj in (model, getattr(model, "roi_heads", None)):
            if obj is not None and hasattr(obj, attr):
                setattr(obj, attr, score_thresh)
    num_classes = len(labels) if labels else getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    num_classes = num_classes if isinstance(num_classes, int) else None
    if num_classes is None:
        pred = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
        num_classes = getattr(getattr(pred, "cls_score", None), "out_features", None) or 91

    @torch.inference_mode()
    def detect(images: list[np.ndarray]):
        tensors = [torch.from_numpy(np.array(im, copy=True)).permute(2, 0, 1).float() / 255.0 for im in images]
        return [{k: v for k, v in out.items()} for out in model(tensors)]

    det = Detector(detect, num_classes=num_classes, class_names=labels, batched=True, name=f"torchvision:{spec}")
    det.model = model
    return det


def load_detector(name: str) -> Detector:
    """`opencv:CASCADE`, `skimage:lbp_frontal_face`, `mtcnn` or `torchvision:NAME[:random]`."""
    if not isinstance(name, str):
        raise SaliencyError(f"detector name must be a string, got {type(name).__name__}")
    if name.startswith("opencv:"):
        return _opencv_cascade(name.split(":", 1)[1])
    if name in ("skimage:lbp_frontal_face", "skimage"):
        return _skimage_lbp()
    if name == "mtcnn":
        return _mtcnn()
    if name.startswith("torchvision:"):
        return _torchvision_detector(name.split(":", 1)[1])
    raise SaliencyError(f"unknown detector {name!r}; use opencv:CASCADE (e.g. opencv:haarcascade_frontalface_default), "
                        "skimage:lbp_frontal_face, mtcnn or torchvision:NAME[:random]")


# -------------------------------------------------------------------------------------- targets
class Box(Target):
    """A detection to explain: `Box(i)` (i-th detection of the clean photo, by decreasing score),
    `Box(label=c)` (best detection of class c), or `Box(box=(x1,y1,x2,y2), label=c)` (explicit)."""

    def __init__(self, index: int | None = None, box=None, label=None):
        if index is None and box is None and label is None:
            index = 0
        if index is not None and box is not None:
            raise SaliencyError("Box takes an index or an explicit box, not both")
        if index is not None and (not isinstance(index, (int, np.integer)) or index < 0):
            raise SaliencyError(f"Box index must be a non-negative integer, got {index!r}")
        self.index, self.box, self.label = index, box, label

    def __repr__(self):
        if self.box is not None:
            return f"Box(box={tuple(self.box)}, label={self.label!r})"
        return f"Box({self.index})" if self.label is None else f"Box(label={self.label!r})"

    def resolve(self, subject, logits):
        raise SaliencyError("a Box target explains a detector: sk.explain(detector, photo, 'drise', target=Box(...)) "
                            "with a detector from sk.load_detector / sk.Detector")

    def select(self, detector: Detector, clean: Detections) -> Detections:
        """The target detection vector (box, class vector, objectness) on the clean detections."""
        c = detector.num_classes or (clean.probs.shape[1] if len(clean) else 1)
        if self.box is not None:
            b = torch.as_tensor(self.box, dtype=torch.float64).reshape(-1)
            if b.numel() != 4 or not (b[2] > b[0] and b[3] > b[1]):
                raise SaliencyError(f"Box needs (x1, y1, x2, y2) with x2 > x1 and y2 > y1, got {self.box!r}")
            cls = 0 if self.label is None else detector.class_index(self.label)
            if cls >= c:
                raise SaliencyError(f"class {self.label!r} is beyond the detector's {c} classes")
            p = torch.zeros(1, c, dtype=torch.float64)
            p[0, cls] = 1.0
            return Detections(b[None], torch.ones(1, dtype=torch.float64), torch.tensor([cls]), p,
                              torch.ones(1, dtype=torch.float64))
        if len(clean) == 0:
            raise SaliencyError(f"{detector.name} found no objects in the photo: there is no detection to explain "
                                "(give an explicit Box(box=..., label=...) to explain a miss)")
        order = clean.scores.argsort(descending=True)
        if self.label is not None:
            cls = detector.class_index(self.label)
            order = order[clean.classes[order] == cls]
            if order.numel() == 0:
                raise SaliencyError(f"no detection of class {self.label!r} in the photo "
                                    f"({len(clean)} detections of classes {sorted(set(clean.classes.tolist()))})")
            i = int(order[0])
        else:
            if self.index >= len(clean):
                raise SaliencyError(f"Box({self.index}) but {detector.name} found {len(clean)} detection(s) "
                                    f"(indices 0..{len(clean) - 1})")
            i = int(order[self.index])
        return Detections(clean.boxes[i:i + 1], clean.scores[i:i + 1], clean.classes[i:i + 1],
                          clean.probs[i:i + 1], clean.objectness[i:i + 1])


class Boxes(Target):
    """The detections a detector is explained for: a list of `Box`, or None for every detection
    of the clean photo (by decreasing score). What `Detector.target_for` makes of a target."""

    def __init__(self, boxes: list | None):
        self.boxes = boxes

    def __repr__(self):
        return "Boxes(every detection)" if self.boxes is None else f"Boxes({self.boxes!r})"

    def resolve(self, detector, clean) -> "ResolvedBoxes":
        if not isinstance(detector, Detector):
            raise SaliencyError("a Box target explains a detector: sk.explain(detector, photo, 'drise', "
                                "target=Box(...)) with a detector from sk.load_detector / sk.Detector")
        (found,) = clean
        if self.boxes is None:
            if len(found) == 0:
                raise SaliencyError(f"{detector.name} found no objects in the photo: nothing to explain")
            boxes = [Box(i) for i in range(len(found))]
        else:
            boxes = self.boxes
        chosen = [b.select(detector, found) for b in boxes]
        tgt = Detections(*(torch.cat([getattr(c, f) for c in chosen])
                           for f in ("boxes", "scores", "classes", "probs", "objectness")))
        return ResolvedBoxes(detections=tgt, clean=found, every=self.boxes is None, names=detector.class_names)


@dataclass
class ResolvedBoxes:
    """The target detections of one photo; `score` rates a detector's detections of perturbed
    copies against them (D-RISE's weights)."""

    detections: Detections
    clean: Detections
    every: bool
    names: list | None = None

    def __len__(self):  # one photo, however many detections
        return 1

    def key(self):
        return ("boxes", tuple(map(tuple, self.detections.boxes.tolist())), tuple(self.detections.classes.tolist()))

    def score(self, found: list[Detections], rows=None, output=None) -> torch.Tensor:
        """`[k, T]`: for each of the k detections sets, max_j of the D-RISE similarity to each target."""
        out = torch.zeros(len(found), len(self.detections), dtype=torch.float64)
        for j, d in enumerate(found):
            sim = detection_similarity(self.detections, d)
            if sim.shape[1]:
                out[j] = sim.amax(1)
        return out

    def describe(self) -> list[dict]:
        d, names = self.detections, self.names
        return [{"kind": "box", "box": [float(v) for v in d.boxes[i]], "indices": [int(d.classes[i])],
                 "name": (names[int(d.classes[i])] if names and int(d.classes[i]) < len(names)
                          else f"class {int(d.classes[i])}"), "score": float(d.scores[i])}
                for i in range(len(d))]


# --------------------------------------------------------------------------------------- D-RISE
def drise_masks(n: int, size, cell: int = 16, p: float = 0.5, seed: int | None = 0,
                upsample: str = "bilinear", start: int = 0) -> torch.Tensor:
    """Masks `start..start+n-1` of the seeded sequence, `[n, H, W]` in [0,1].

    Each mask: an s x s binary grid (s = `cell` cells per side, kept with probability p), upsampled
    to `(s+1) * ceil(H/s)` x `(s+1) * ceil(W/s)` and cropped at a random shift. Mask i depends only
    on (seed, i), so chunking does not change the masks.
    """
    H, W = size
    ch, cw = math.ceil(H / cell), math.ceil(W / cell)
    out = torch.empty(n, H, W)
    for k in range(n):
        g = generator(None if seed is None else (int(seed) * 1_000_003 + start + k))
        grid = (torch.rand(1, 1, cell, cell, generator=g) < p).float()
        up = F.interpolate(grid, size=((cell + 1) * ch, (cell + 1) * cw), mode=upsample,
                           align_corners=False if upsample == "bilinear" else None)
        dy = int(torch.randint(0, ch, (1,), generator=g))
        dx = int(torch.randint(0, cw, (1,), generator=g))
        out[k] = up[0, 0, dy:dy + H, dx:dx + W]
    return out


@register
class DRISE(Method):
    """D-RISE on a `Detector`: the masked photos `M ⊙ I` go through the shared perturbation runner
    (`engine.perturbed_scores`: chunks, pass counts, progress), the detector's detections of each
    are scored against every target detection (`ResolvedBoxes.score`), and the masks are summed
    with those weights. One set of masked passes serves every target."""

    name = "drise"
    kinds = ("detector",)
    family = "detection"
    cost = "n_masks F (1000)"
    randomized = True
    defaults = {"n_masks": 1000, "cell": 16, "p": 0.5, "upsample": "bilinear", "center": False}
    description = "D-RISE: random masks weighted by detection similarity (Petsiuk et al. 2021); detectors only."

    @classmethod
    def wrong_subject(cls, kind: str) -> str:
        return ("drise explains object detectors: sk.explain(sk.load_detector(NAME) or sk.Detector(fn), "
                "photo, 'drise', target=sk.Box(i))")

    def run(self, ctx, target, layer, n_masks=1000, cell=16, p=0.5, upsample="bilinear", center=False):
        n_masks, cell = positive_int(n_masks, "n_masks"), positive_int(cell, "cell")
        if not 0 < p < 1:
            raise SaliencyError(f"p must be in (0, 1), got {p}")
        if upsample not in ("bilinear", "nearest"):
            raise SaliencyError(f"upsample must be 'bilinear' or 'nearest', got {upsample!r}")
        x = ctx.x  # [1, 3, H, W]: the photo's pixels as floats
        H, W = x.shape[-2:]
        T = len(target.detections)
        acc = torch.zeros(T, H * W, dtype=torch.float64)
        mask_sum = torch.zeros(H * W, dtype=torch.float64)
        pending = {}

        def masks(start, stop):
            m = drise_masks(stop - start, (H, W), cell, p, ctx.seed, upsample, start=start)
            pending[start] = m
            return torch.zeros(stop - start, dtype=torch.long), m[:, None]

        def accumulate(start, stop, found, weights):  # weights: [k, T] of this chunk (ResolvedBoxes.score)
            mflat = pending.pop(start).reshape(stop - start, -1).double()
            acc.add_(weights.t() @ mflat)
            mask_sum.add_(mflat.sum(0))

        weights = perturbed_scores(ctx.subject, x, torch.zeros_like(x), target, masks, n_masks,
                                   batch_size=ctx.batch_size or ctx.subject.chunk_rows, counter=ctx.counter,
                                   progress=ctx.progress, desc="drise", on_chunk=accumulate)
        if center:
            acc = acc - weights.mean(0)[:, None] * mask_sum[None]
        maps = (acc / (n_masks * p)).float().view(T, H, W)
        clean = target.clean
        return {"maps": maps, "signed": bool(center),
                "extras": {"boxes": target.detections.boxes.tolist(), "classes": target.detections.classes.tolist(),
                           "clean_boxes": clean.boxes.tolist(), "clean_scores": clean.scores.tolist(),
                           "weights": weights.float()}}


def drise(detector: Detector, photo, targets=None, n_masks: int = 1000, cell: int = 16, p: float = 0.5,
          seed: int | None = 0, batch_size: int = 16, upsample: str = "bilinear", center: bool = False,
          progress: bool = False):
    """D-RISE maps for one photo: one map per target detection (default: every clean detection);
    the same as `sk.explain(detector, photo, "drise", target=targets, ...)`.

    `targets`: None (all detections), a `Box`, or a list of `Box`. `center=True` subtracts the mean
    weight (the Microsoft implementation's variant). Returns an `Explanation` with maps
    `[T, H, W]` at photo size; `extras` holds the target boxes, classes, the clean detections and
    the per-mask weights.
    """
    if not isinstance(detector, Detector):
        raise SaliencyError(f"drise needs a Detector (sk.load_detector / sk.Detector), got {type(detector).__name__}")
    return explain(detector, photo, "drise", target=targets, seed=seed, batch_size=positive_int(batch_size, "batch_size"),
                   progress=progress, n_masks=n_masks, cell=cell, p=p, upsample=upsample, center=center)


# ------------------------------------------------------------------ gradient CAMs (torchvision)
def _auto_detector_layer(model, probe: torch.Tensor) -> str:
    """The last module of the backbone body (execution order) whose output is a spatial map."""
    root = "backbone.body" if hasattr(getattr(model, "backbone", None), "body") else "backbone"
    finished, handles = [], []
    for name, mod in model.named_modules():
        if name.startswith(root + "."):
            def hook(_m, _i, out, name=name):
                if isinstance(out, torch.Tensor) and out.dim() == 4 and min(out.shape[-2:]) > 1:
                    finished.append(name)
            handles.append(mod.register_forward_hook(this_thread_only(hook)))
    try:
        with torch.no_grad():
            model([probe])
    finally:
        for h in handles:
            h.remove()
    if not finished:
        raise SaliencyError("no spatial layer found in the detector's backbone; pass layer=NAME")
    return finished[-1]


def _require_torchvision_model(detector):
    model = getattr(detector, "model", None)
    if model is None or not hasattr(model, "transform"):
        raise SaliencyError("detector_gradcam needs a torchvision detection model (load_detector('torchvision:...')); "
                            "use drise for black-box detectors")
    return model


def detection_gradcam(detector: Detector, img: np.ndarray, tgt: Detections, layer: str = "auto",
                      min_iou: float = 0.5) -> dict:
    """Grad-CAM of the detection `tgt` (one box) on the uint8 photo `img`: one differentiable
    forward and one backward. Returns the map at photo size, the layer map, the layer, the score."""
    model = _require_torchvision_model(detector)
    H, W = img.shape[:2]
    x = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float() / 255.0
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        name = _auto_detector_layer(model, x) if layer == "auto" else layer
        modules = dict(model.named_modules())
        if name not in modules:
            raise SaliencyError(f"layer {name!r} not found in the detector")
        with torch.no_grad():
            batch, _ = model.transform([x])
        (rh, rw), (ph, pw) = batch.image_sizes[0], tuple(batch.tensors.shape[-2:])
        with torch.enable_grad(), LayerCapture({name: modules[name]}) as cap:
            out = model([x.clone().requires_grad_(True)])[0]
            A = cap.get(name)
            same = out["labels"] == tgt.classes[0]
            if not bool(same.any()):
                raise SaliencyError("the target detection is not among the detector's outputs")
            iou = box_iou(tgt.boxes, out["boxes"].detach())[0].masked_fill(~same, -1.0)
            j = int(iou.argmax())
            if float(iou[j]) < min_iou:
                raise SaliencyError(f"no output box matches the target (best IoU {float(iou[j]):.2f} < {min_iou})")
            score = out["scores"][j]
            score_value = float(score.detach())
            (G,) = torch.autograd.grad(score, A, allow_unused=True)
    finally:
        for m, was in training.items():
            m.training = was
    if G is None:
        raise SaliencyError(f"the detection score does not depend on layer {name!r}")
    A, G = A.detach().float(), G.float()
    cam = (G.mean((2, 3), keepdim=True) * A).sum(1).clamp_min(0)[0]  # [h, w] on the padded input
    h, w = cam.shape
    cam = cam[:max(1, round(h * rh / ph)), :max(1, round(w * rw / pw))]
    maps = F.interpolate(cam[None, None], size=(H, W), mode="bilinear", align_corners=False)[0]
    return {"maps": maps, "raw": cam[None].clone(), "layer": name, "signed": False,
            "extras": {"gradient_norm": float(G.norm()), "output_score": score_value}}


@register
class DetectorGradCAM(Method):
    """Grad-CAM on a torchvision detector: the score is the detection's post-NMS class score,
    found again in a differentiable forward as the output box of the same class with the highest
    IoU with the target (at least `min_iou`); the layer map (on the detector's resized, padded
    input) is cropped to the image part and upsampled to photo size."""

    name = "gradcam"
    kinds = ("detector",)
    family = "cam"
    cost = "2F+1B"
    uses_layer = True
    defaults = {"min_iou": 0.5}
    description = "Grad-CAM of one detection of a torchvision detector."

    def run(self, ctx, target, layer, min_iou=0.5):
        if not target.every and len(target.detections) != 1:
            raise SaliencyError("Grad-CAM on a detector explains one Box at a time")
        first = Detections(*(getattr(target.detections, f)[:1]
                             for f in ("boxes", "scores", "classes", "probs", "objectness")))
        img = ctx.x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        out = detection_gradcam(ctx.subject, img, first, layer=layer, min_iou=min_iou)
        ctx.counter.add(forward=1, backward=1)
        return out


def detector_gradcam(detector: Detector, photo, target: Box | None = None, layer: str = "auto",
                     min_iou: float = 0.5):
    """Grad-CAM of one detection of a torchvision detector (`load_detector("torchvision:...")`),
    the same as `sk.explain(detector, photo, "gradcam", target=target or Box(0))`. Returns an
    `Explanation` with one map."""
    _require_torchvision_model(detector)
    return explain(detector, photo, "gradcam", target=target or Box(0), layer=layer, min_iou=min_iou)


__all__ = ["Box", "Boxes", "Detector", "DRISE", "DetectorGradCAM", "detection_gradcam", "Detections", "load_detector", "drise", "drise_masks", "box_iou",
           "detection_similarity", "detector_gradcam"]
