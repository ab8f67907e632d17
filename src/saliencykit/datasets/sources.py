"""Image sources: where the images of a run come from, in a fixed order, each with an id, an
optional label and optional ground truth (a box or a mask), and a content hash.

    folder      a directory, searched recursively; `root/<class>/<image>` (an ImageFolder
                layout) gives each image its folder's name as label
    list        a .csv or .jsonl file with a `path` column (relative to the list's directory) and
                optional `label`, `box` ("x0,y0,x1,y1" in pixels) and `mask` (an image file) columns
    torchvision any map-style dataset object returning (image, label) pairs
    hf          a Hugging Face `datasets` split: `hf:DIR` (saved with `save_to_disk`) or
                `hf:NAME[@split]` (from the hub, where a network is available)
    parts       the procedural parts dataset with its part masks as ground truth: `parts[:N]`
    bundled     the photos shipped with the package, with their hand-drawn boxes

`open_source(spec)` turns a command-line string (or a dataset object) into a `Source`. Sources
only list and decode; they never run a model, so the same source object is handed to DataLoader
workers and to Ray actors.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SaliencyError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Item:
    """One entry of a source. `index` is its position in the source's order; `id` names it in
    every table (the path relative to the source root, or the dataset's id)."""

    index: int
    id: str
    label: object = None          # a class name (str) or a class index (int), None when unknown
    path: str | None = None       # the file, for file-based sources
    box: tuple | None = None      # (x0, y0, x1, y1) in the image's pixels
    mask: str | None = None       # a mask image file (non-zero = object)
    problem: str | None = None    # known before decoding (not an image file, a missing label, ...)


@dataclass
class Decoded:
    """A decoded image: RGB PIL image, the mode it was stored in, and its ground-truth mask as a
    bool array at the image's size (or None)."""

    image: object
    mode: str
    mask: np.ndarray | None = None
    label: object = None          # a label only the decoded sample knows (dataset objects)


class Source:
    kind = ""
    has_labels = False
    has_masks = False

    def items(self) -> list[Item]:
        raise NotImplementedError

    def decode(self, item: Item) -> Decoded:
        raise NotImplementedError

    def content_hash(self, item: Item) -> str:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind}

    def __repr__(self):
        return f"{type(self).__name__}({self.describe()})"


def _sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_bytes(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.hexdigest()


def decode_image(src, where: str) -> tuple:
    """Open a path or a file-like object once: (RGB PIL image via `images.load_image`, the mode it
    was stored in). Any decoder failure is a SaliencyError naming `where`."""
    from PIL import Image

    from ..images import load_image

    try:
        with Image.open(src) as im:
            mode = im.mode
            im.load()            # truncated data surfaces only while decoding
            img = im.copy()
    except Exception as err:  # noqa: BLE001 - any decoder failure is the file's problem
        raise SaliencyError(f"{where} is not a readable image ({type(err).__name__}: {err})") from None
    return load_image(img), mode


def decode_file(path, mask_path=None, box=None) -> Decoded:
    """Decode an image file as RGB (`images.load_image`) and read its ground truth."""
    p = Path(path)
    if p.is_file() and p.stat().st_size == 0:
        raise SaliencyError(f"{p} is an empty file (0 bytes)")
    image, mode = decode_image(p, str(p))
    return Decoded(image, mode, _ground_truth(image.size, mask_path, box))


def _ground_truth(size, mask_path=None, box=None) -> np.ndarray | None:
    """[H,W] bool object mask at the image's `size` = (width, height) from a mask file or a box."""
    if mask_path is None and box is None:
        return None
    from PIL import Image

    w, h = size
    mask = np.zeros((h, w), dtype=bool)
    if mask_path is not None:
        try:
            with Image.open(mask_path) as im:
                m = np.asarray(im.convert("L")) > 0
        except Exception as err:  # noqa: BLE001
            raise SaliencyError(f"mask {mask_path} cannot be read ({type(err).__name__}: {err})") from None
        if m.shape != (h, w):
            raise SaliencyError(f"mask {mask_path} is {m.shape[1]}x{m.shape[0]}, the image is {w}x{h}")
        mask |= m
    if box is not None:
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise SaliencyError(f"box {list(box)} is empty or outside the {w}x{h} image")
        mask[int(round(y0)):max(int(round(y1)), int(round(y0)) + 1),
             int(round(x0)):max(int(round(x1)), int(round(x0)) + 1)] = True
    return mask


# ------------------------------------------------------------------------------------ files
class FolderSource(Source):
    """Every file under `root` (recursive, hidden files skipped), sorted by relative path. Files
    without an image extension are listed with a problem, so the run's errors table names them.
    When every image sits one folder below the root, the folder names are the labels."""

    kind = "folder"

    def __init__(self, root, labels: bool | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise SaliencyError(f"{root} is not a directory")
        files = sorted(p for p in self.root.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.root).parts))
        if not files:
            raise SaliencyError(f"{root} contains no files")
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        layout = bool(images) and all(len(p.relative_to(self.root).parts) == 2 for p in images)
        self.has_labels = layout if labels is None else bool(labels)
        if labels and not layout:
            raise SaliencyError(f"{root} is not an ImageFolder layout (root/<class>/<image>), so it has no labels")
        self._items = []
        for i, p in enumerate(files):
            rel = p.relative_to(self.root).as_posix()
            problem = None if p.suffix.lower() in IMAGE_EXTENSIONS else \
                f"not an image file (extension {p.suffix or 'none'!r})"
            label = p.parent.name if self.has_labels and len(p.relative_to(self.root).parts) == 2 else None
            self._items.append(Item(i, rel, label, str(p), problem=problem))

    def items(self):
        return list(self._items)

    def decode(self, item):
        return decode_file(item.path)

    def content_hash(self, item):
        return _sha256_file(item.path)

    def describe(self):
        return {"kind": self.kind, "root": str(self.root.resolve()), "labels": self.has_labels}


class ListSource(Source):
    """A .csv or .jsonl list of images: `path` (required), `label`, `box`, `mask` (optional)."""

    kind = "list"

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise SaliencyError(f"list file not found: {path}")
        base = self.path.parent
        records = self._read()
        if not records:
            raise SaliencyError(f"{path} lists no images")
        self.has_labels = any(r.get("label") not in (None, "") for r in records)
        self.has_masks = any(r.get("box") not in (None, "") or r.get("mask") not in (None, "") for r in records)
        self._items = []
        for i, r in enumerate(records):
            rel = str(r["path"])
            full = Path(rel) if Path(rel).is_absolute() else base / rel
            label = r.get("label")
            label = None if label in (None, "") else (int(label) if isinstance(label, str) and label.isdigit() else label)
            box = _parse_box(r.get("box"), self.path, i)
            mask = r.get("mask") or None
            if mask is not None and not Path(mask).is_absolute():
                mask = str(base / mask)
            self._items.append(Item(i, rel, label, str(full), box, mask))

    def _read(self) -> list[dict]:
        text = self.path.read_text()
        if self.path.suffix.lower() == ".jsonl":
            out = []
            for n, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SaliencyError(f"{self.path}:{n}: not valid JSON ({err.msg})") from None
                if not isinstance(rec, dict) or "path" not in rec:
                    raise SaliencyError(f"{self.path}:{n}: each line must be an object with a 'path'")
                out.append(rec)
            return out
        if self.path.suffix.lower() == ".csv":
            reader = csv.DictReader(io.StringIO(text))
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise SaliencyError(f"{self.path}: the CSV needs a 'path' column (got {reader.fieldnames})")
            return list(reader)
        raise SaliencyError(f"{self.path}: a list of images must be a .csv or .jsonl file")

    def items(self):
        return list(self._items)

    def decode(self, item):
        if not Path(item.path).exists():
            raise SaliencyError(f"{item.path} does not exist")
        return decode_file(item.path, item.mask, item.box)

    def content_hash(self, item):
        if not Path(item.path).is_file():
            return "missing"
        parts = [_sha256_file(item.path), repr(item.label), repr(item.box)]
        if item.mask and Path(item.mask).is_file():
            parts.append(_sha256_file(item.mask))
        return _sha256_bytes(*parts)

    def describe(self):
        return {"kind": self.kind, "path": str(self.path.resolve())}


def _parse_box(value, path, row):
    if value in (None, ""):
        return None
    if isinstance(value, str):
        value = value.replace(";", ",").split(",")
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise SaliencyError(f"{path}: row {row + 1}: box must be four numbers x0,y0,x1,y1, got {value!r}") from None
    if len(box) != 4:
        raise SaliencyError(f"{path}: row {row + 1}: box must be four numbers x0,y0,x1,y1, got {value!r}")
    return box


# ------------------------------------------------------------------------------ datasets
class TorchvisionSource(Source):
    """A map-style dataset whose items are (image, label) pairs (a torchvision dataset, or any
    `torch.utils.data.Dataset` like it). Ids are the indices; labels are the dataset's class
    names when it has `classes`, else the integers."""

    kind = "torchvision"
    has_labels = True

    def __init__(self, dataset, name: str | None = None):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise SaliencyError(f"{type(dataset).__name__} is not a map-style dataset (needs __len__ and __getitem__)")
        self.dataset = dataset
        self.name = name or type(dataset).__name__
        self.classes = list(getattr(dataset, "classes", []) or [])
        n = len(dataset)
        if n == 0:
            raise SaliencyError(f"dataset {self.name} is empty")
        width = len(str(n - 1))
        targets = getattr(dataset, "targets", None)   # torchvision's labels, known without decoding
        labels = [self._label(t) for t in targets] if targets is not None and len(targets) == n else [None] * n
        self._items = [Item(i, f"{self.name}/{i:0{width}d}", labels[i]) for i in range(n)]

    def items(self):
        return list(self._items)

    def _sample(self, item):
        sample = self.dataset[item.index]
        if isinstance(sample, (tuple, list)) and len(sample) >= 2:
            return sample[0], sample[1]
        return sample, None

    def _label(self, raw):
        if raw is None:
            return None
        try:
            k = int(raw)
        except (TypeError, ValueError):
            return str(raw)
        return self.classes[k] if 0 <= k < len(self.classes) else k

    def decode(self, item):
        image, label = self._sample(item)
        out = _decode_object(image, f"{self.name}[{item.index}]")
        out.label = self._label(label)
        return out

    def content_hash(self, item):
        image, label = self._sample(item)
        arr = np.asarray(_decode_object(image, item.id).image)
        return _sha256_bytes(arr.tobytes(), arr.shape, repr(label))

    def describe(self):
        return {"kind": self.kind, "name": self.name, "length": len(self._items), "classes": len(self.classes)}


def _decode_object(obj, where: str) -> Decoded:
    """A PIL image, array or [C,H,W] tensor from a dataset, as RGB."""
    from PIL import Image

    from ..images import load_image

    mode = getattr(obj, "mode", None)
    if hasattr(obj, "numpy") and hasattr(obj, "dim"):  # a tensor [C,H,W] in [0,1] or uint8
        arr = obj.detach().cpu().numpy()
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4):
            arr = np.moveaxis(arr, 0, -1)
        obj, mode = arr, f"tensor {obj.dtype}"
    elif isinstance(obj, np.ndarray):
        mode = f"array {obj.dtype}"
    elif not isinstance(obj, Image.Image):
        raise SaliencyError(f"{where} is a {type(obj).__name__}, not an image")
    return Decoded(load_image(obj), str(mode))


class HFSource(Source):
    """A Hugging Face `datasets` split with an image column (and a label column if present).

    `DIR`: a dataset saved with `save_to_disk` (a DatasetDict needs `split`); `NAME`: loaded with
    `datasets.load_dataset(NAME, split=split)`, which needs a network or the local cache."""

    kind = "hf"
    has_labels = False

    def __init__(self, name_or_dir: str, split: str | None = None, image_column: str | None = None,
                 label_column: str | None = None):
        try:
            import datasets as hfds
        except ImportError:
            raise SaliencyError("Hugging Face sources need the `datasets` package: pip install 'saliencykit[hf]'") \
                from None
        self.spec, self.split = str(name_or_dir), split
        if Path(name_or_dir).exists():
            ds = hfds.load_from_disk(str(name_or_dir))
        else:
            try:
                ds = hfds.load_dataset(str(name_or_dir), split=split or "train")
            except Exception as err:  # noqa: BLE001 - network, missing dataset, bad split
                raise SaliencyError(f"cannot load Hugging Face dataset {name_or_dir!r}: {err}") from None
        if isinstance(ds, hfds.DatasetDict):
            if split is None:
                raise SaliencyError(f"{name_or_dir} holds the splits {list(ds)}: name one as hf:{name_or_dir}@SPLIT")
            if split not in ds:
                raise SaliencyError(f"{name_or_dir} has no split {split!r}; it has {list(ds)}")
            ds = ds[split]
        features = ds.features
        images = [k for k, f in features.items() if type(f).__name__ == "Image"]
        self.image_column = image_column or (images[0] if images else None)
        if self.image_column not in features:
            raise SaliencyError(f"dataset has no image column (columns: {list(features)}); pass image_column=...")
        labels = [k for k, f in features.items() if type(f).__name__ == "ClassLabel"]
        self.label_column = label_column or (labels[0] if labels else ("label" if "label" in features else None))
        self.names = list(getattr(features.get(self.label_column), "names", []) or []) if self.label_column else []
        self.has_labels = self.label_column is not None
        # read the stored bytes, not decoded images: hashing and the worker's decode use them
        if type(features[self.image_column]).__name__ == "Image":
            ds = ds.cast_column(self.image_column, hfds.Image(decode=False))
        self.dataset = ds
        ids = ds["id"] if "id" in features else None
        n = len(ds)
        if n == 0:
            raise SaliencyError(f"{name_or_dir} is empty")
        width = len(str(n - 1))
        self._items = []
        label_values = ds[self.label_column] if self.label_column else [None] * n
        for i in range(n):
            label = label_values[i]
            if isinstance(label, int) and 0 <= label < len(self.names):
                label = self.names[label]
            self._items.append(Item(i, str(ids[i]) if ids is not None else f"{i:0{width}d}", label))

    def items(self):
        return list(self._items)

    def _raw(self, item):
        value = self.dataset[item.index][self.image_column]
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            if value.get("path"):
                return Path(value["path"]).read_bytes()
            raise SaliencyError(f"row {item.index} has no image bytes or path")
        return value

    def decode(self, item):
        raw = self._raw(item)
        if isinstance(raw, bytes):
            if not raw:
                raise SaliencyError(f"row {item.index}: the image is empty (0 bytes)")
            return Decoded(*decode_image(io.BytesIO(raw), f"row {item.index}"))
        return _decode_object(raw, f"row {item.index}")

    def content_hash(self, item):
        raw = self._raw(item)
        data = raw if isinstance(raw, bytes) else np.asarray(raw).tobytes()
        return _sha256_bytes(data, repr(item.label))

    def describe(self):
        return {"kind": self.kind, "dataset": self.spec, "split": self.split, "image_column": self.image_column,
                "label_column": self.label_column, "length": len(self._items)}


# ------------------------------------------------------------------------------ bundled
class PartsSource(Source):
    """`n` procedural parts images (64x64) with labels and the bird (body and every part) as the
    ground-truth object mask; rendering is deterministic, nothing is read from disk."""

    kind = "parts"
    has_labels = True
    has_masks = True

    def __init__(self, n: int = 500, seed: int = 0):
        from ..benchmarks.parts import dataset as parts
        from ..errors import positive_int

        self.n, self.seed = positive_int(n, "n"), int(seed)
        self.scenes = parts.make_scenes(self.n, seed=self.seed)
        self.names = parts.labels()
        width = len(str(self.n - 1))
        self._items = [Item(i, f"parts/{i:0{width}d}", self.names[sc.class_id]) for i, sc in enumerate(self.scenes)]

    def items(self):
        return list(self._items)

    def _render(self, item):
        from ..benchmarks.parts import dataset as parts

        return parts.render(self.scenes[item.index])

    def decode(self, item):
        from PIL import Image

        img, pmap = self._render(item)
        return Decoded(Image.fromarray(img), "RGB", (pmap > 0) & (pmap < 100))

    def region_masks(self, item) -> dict:
        """The image's named regions (each part type, body, background objects, canvas) as [H,W]
        bool masks: what concepts are matched against (`concepts.score_bank`)."""
        from ..benchmarks.parts import dataset as parts

        return parts.named_regions(self._render(item)[1])

    def content_hash(self, item):
        img, pmap = self._render(item)
        return _sha256_bytes(img.tobytes(), pmap.tobytes(), repr(item.label))

    def describe(self):
        return {"kind": self.kind, "n": self.n, "seed": self.seed}


class BundledSource(Source):
    """The photos shipped with the package (`saliencykit.data`), with their hand-drawn boxes."""

    kind = "bundled"
    has_masks = True

    def __init__(self, names=None):
        from .. import data

        self.photo_names = list(names or data.names())
        unknown = [n for n in self.photo_names if n not in data.names()]
        if unknown:
            raise SaliencyError(f"no bundled photo {unknown[0]!r} (bundled: {', '.join(data.names())})")
        self._items = [Item(i, n) for i, n in enumerate(self.photo_names)]

    def items(self):
        return list(self._items)

    def decode(self, item):
        from .. import data
        from ..images import load_image

        img = load_image(data.image(item.id))
        boxes = data.boxes().get(item.id, [])
        mask = None
        for b in boxes:
            m = _ground_truth(img.size, box=b["box"])
            mask = m if mask is None else mask | m
        return Decoded(img, "RGB", mask)

    def content_hash(self, item):
        arr = np.asarray(self.decode(item).image)
        return _sha256_bytes(arr.tobytes())

    def describe(self):
        return {"kind": self.kind, "names": self.photo_names}


# ------------------------------------------------------------------------------ by name
def open_source(spec, **kwargs) -> Source:
    """A `Source` from a command-line string or an object: a directory, a .csv/.jsonl list,
    `hf:DIR_OR_NAME[@split]`, `parts[:N]`, `bundled` (or `bundled:chelsea,coffee`), a `Source`,
    or a map-style dataset object (torchvision)."""
    if isinstance(spec, Source):
        return spec
    if not isinstance(spec, (str, Path)):
        return TorchvisionSource(spec, **kwargs)
    s = str(spec)
    if s.startswith("hf:"):
        name, _, split = s[3:].partition("@")
        return HFSource(name, split or None, **kwargs)
    if s == "parts" or s.startswith("parts:"):
        n = s.split(":", 1)[1] if ":" in s else "500"
        if not n.isdigit():
            raise SaliencyError(f"parts source takes a count: parts:500, got {s!r}")
        return PartsSource(int(n), **kwargs)
    if s == "bundled" or s.startswith("bundled:"):
        return BundledSource(s.split(":", 1)[1].split(",") if ":" in s else None)
    p = Path(s)
    if p.is_dir():
        return FolderSource(p, **kwargs)
    if p.is_file() and p.suffix.lower() in (".csv", ".jsonl"):
        return ListSource(p)
    if p.is_file():
        raise SaliencyError(f"{s} is a file, not a source: give a directory, a .csv/.jsonl list, hf:..., parts:N "
                            "or bundled")
    raise SaliencyError(f"no such directory or list file: {s!r} (sources: DIR, LIST.csv, LIST.jsonl, hf:DIR_OR_NAME"
                        "[@split], parts:N, bundled)")


__all__ = ["Item", "Decoded", "Source", "FolderSource", "ListSource", "TorchvisionSource", "HFSource",
           "PartsSource", "BundledSource", "open_source", "decode_file", "IMAGE_EXTENSIONS"]
