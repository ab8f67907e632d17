"""What the commands share: photo arguments, target and model options, progress bars."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from ..errors import SaliencyError


def progress(iterable, quiet: bool, desc: str, total=None, unit: str = "it"):
    """A bar on stderr that stays when done; its rate leaves out the first step's warm-up."""
    from ..engine import with_progress

    return with_progress(iterable, desc, enabled=not quiet, total=total, leave=True, unit=unit)


def add_threads_arg(p):
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: the cores; 1 is faster while another job runs)")


# the commands that compute for a while as soon as they start (a server waits; listings are instant)
BUSY_COMMANDS = ("explain", "demo", "evaluate", "report", "run", "concepts", "benchmark")


def apply_threads(args) -> None:
    """Set PyTorch's thread count from --threads; with none given on a busy machine (load average
    above the core count) say so once, since two jobs that each spin every core slow each other
    down many times over."""
    import os

    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise SaliencyError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
        return
    if getattr(args, "command", None) not in BUSY_COMMANDS or getattr(args, "quiet", False) or \
            not hasattr(os, "getloadavg"):
        return
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load > cores:
        print(f"saliencykit: this machine is busy (load average {load:.1f} on {cores} cores); "
              "if this runs slowly, try --threads 1", file=sys.stderr)


def training_out(args, example: str) -> Path:
    """The checked `--out` weights file of a training command (`--threads` checked too): a file
    that can be written, not a directory; raises before any training starts."""
    from ..files import check_writable_file

    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise SaliencyError(f"--out {out} is a directory; give a file name such as {out / example}")
    check_writable_file(out, "the weights")
    if args.threads is not None and args.threads < 1:
        raise SaliencyError(f"--threads must be >= 1, got {args.threads}")
    return out


def photo_source(spec: str):
    """A path, or the name of a bundled photo."""
    from .. import data

    if Path(spec).exists():
        return spec, Path(spec).stem
    if spec in data.names():
        return data.image(spec), spec
    raise SaliencyError(f"no such file or bundled photo: {spec!r} (bundled: {', '.join(data.names())})")


def photo_sources(specs, quiet: bool = False) -> list:
    """Every photo the arguments name, as (path or decoded image, unique name): an image file, a
    bundled photo name, or any source `saliencykit run` reads (a folder, a .csv/.jsonl list,
    parts:N, hf:DIR, bundled). A file of a folder or list that cannot be read is skipped with a
    line on stderr naming it; no readable photo at all is an error."""
    from ..datasets.sources import open_source

    out, skipped = [], []
    for spec in specs:
        p = Path(spec)
        many = p.is_dir() or (p.is_file() and p.suffix.lower() in (".csv", ".jsonl")) or \
            (not p.exists() and (":" in str(spec) or spec == "bundled"))
        if not many:
            out.append(photo_source(spec))   # an image file, a bundled photo name, or the error naming both
            continue
        source = open_source(spec)
        for item in source.items():
            if item.problem:
                skipped.append(f"{item.id}: {item.problem}")
                continue
            try:
                out.append((source.decode(item).image, _name(item.id)))
            except SaliencyError as err:
                skipped.append(f"{item.id}: {err}")
    if skipped:   # said even with --quiet: these inputs are not in the results
        print(f"skipped {len(skipped)} input(s) that cannot be explained:", file=sys.stderr)
        for line in skipped[:10]:
            print(f"  {line}", file=sys.stderr)
    if not out:
        raise SaliencyError("no readable photo in " + ", ".join(map(str, specs)))
    if len(out) > 50 and not quiet:
        print(f"{len(out)} photos: for many images `saliencykit run` is resumable and writes one table",
              file=sys.stderr)
    return out


def _name(item_id: str) -> str:
    stem = item_id.rsplit(".", 1)[0] if "." in item_id.rsplit("/", 1)[-1] else item_id
    return stem.replace("/", "_").replace("\\", "_")


def target_from_args(args):
    from ..targets import Class, Contrast, Group

    chosen = [a for a in (args.target, args.contrast, args.group) if a is not None]
    if len(chosen) > 1:
        raise SaliencyError("give only one of --target, --contrast/--vs, --group")
    if args.contrast is not None or args.vs is not None:
        if args.contrast is None or args.vs is None:
            raise SaliencyError("--contrast A needs --vs B (and the other way round)")
        return Contrast(_label(args.contrast), vs=_label(args.vs))
    if args.group is not None:
        return Group(args.group if "," not in args.group else [_label(s) for s in args.group.split(",")])
    if args.target is not None:
        return Class(_label(args.target))
    return None


ARRAY_SUFFIXES = (".npy", ".csv")   # inputs read as tensors (a series [C,T] or [T], a volume, features)


def is_array_file(path) -> bool:
    """An input read as a tensor: a `.npy`, or a `.csv` of numbers only (a series). A `.csv` with
    words in it (a header, photo paths) is a list of photos, a source like a folder."""
    import numpy as np

    p = Path(str(path))
    suffix = p.suffix.lower()
    if suffix not in ARRAY_SUFFIXES:
        return False
    if suffix == ".npy" or not p.is_file():
        return True        # a missing file is said missing by whoever reads it
    try:
        np.loadtxt(p, delimiter=",", ndmin=2)
    except ValueError:
        return False
    return True


def load_array(path, layout: str):
    """A `.npy` or `.csv` file as a batch of one in `layout`: the array holds one example, with or
    without its channel axis (a series `[C,T]` or `[T]`; a `.csv` is a `[T]` column or row, or `C`
    rows of `T` values)."""
    import numpy as np
    import torch

    from ..subject import LAYOUTS

    if not Path(path).is_file():
        raise SaliencyError(f"no such file: {str(path)!r}")
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False) if path.suffix.lower() == ".npy" else \
            np.loadtxt(path, delimiter=",", ndmin=2)
    except (OSError, ValueError) as err:
        raise SaliencyError(f"{path} cannot be read as a {path.suffix} array: {str(err).splitlines()[0][:160]}") from None
    if path.suffix.lower() == ".csv" and 1 in arr.shape:
        arr = arr.reshape(-1)                        # one row or one column: a single channel
    if not np.issubdtype(arr.dtype, np.number):
        raise SaliencyError(f"{path} holds {arr.dtype} values, not numbers")
    axes = LAYOUTS[layout][0]
    if arr.ndim == len(axes) - 1 and "C" in axes:
        arr = np.expand_dims(arr, axes.index("C"))   # no channel axis: one channel
    if arr.ndim != len(axes):
        raise SaliencyError(f"{path} has shape {arr.shape}; a {layout} example is [{','.join(axes)}]"
                            + (f" or [{','.join(a for a in axes if a != 'C')}]" if "C" in axes else ""))
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]


def load_region_mask(path, size_hw, photo_size_wh=None):
    """A PNG mask (nonzero = inside) at the model's input size `(H, W)`, or at the photo's size
    (resized to the input size by nearest neighbour, as the photo is resized), as a bool [H, W]."""
    import numpy as np
    import torch
    from PIL import Image

    if not Path(path).is_file():
        raise SaliencyError(f"--region {path}: no such file")
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError) as err:
        raise SaliencyError(f"--region {path}: not an image ({err})") from None
    h, w = size_hw
    if img.size != (w, h):
        if photo_size_wh is None or img.size != tuple(photo_size_wh):
            raise SaliencyError(f"--region {path} is {img.size[0]}x{img.size[1]}; it must be at the model's input "
                                f"size {w}x{h}" + (f" or the photo's {photo_size_wh[0]}x{photo_size_wh[1]}"
                                                    if photo_size_wh else ""))
        img = img.resize((w, h), Image.NEAREST)
    mask = torch.from_numpy(np.asarray(img.convert("L")) > 0)
    if not mask.any():
        raise SaliencyError(f"--region {path} is empty: no nonzero pixel")
    return mask


def region_target(kind: str, label, mask):
    """The target of `--region`: a Region of class `label` (None: the class predicted most often
    inside), or for `kind` "output" / "change" an OutputRegion (image-to-image models)."""
    from ..targets import OutputRegion, Region

    if kind == "class":
        return Region(mask, label=None if label is None else _label(label))
    if label is not None:
        raise SaliencyError(f"--region-of {kind} sums the output over the region: it takes no --target")
    return OutputRegion(mask, change=kind == "change")


def _label(s: str):
    s = s.strip()
    return int(s) if s.isdigit() else s


def add_model_args(p, method_params: bool = True):
    p.add_argument("--model", default="efficientnet_lite0", help="model name (see `saliencykit models`)")
    p.add_argument("--target", help="class label or index to explain (default: the top-1 class)")
    p.add_argument("--contrast", help="explain why this class ...")
    p.add_argument("--vs", help="... and not this one")
    p.add_argument("--group", help="a named class group (dog, cat, bird, ...) or comma-separated classes")
    p.add_argument("--layer", default="auto", help="layer for CAM methods (name, or auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    if method_params and "--param" not in p._option_string_actions:  # a command with its own --param keeps it
        p.add_argument("--param", action="append", help="method parameter METHOD.NAME=VALUE, e.g. "
                                                        "integrated_gradients.steps=200")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_dense_args(p):
    """`explain`'s options for inputs that are not photos and outputs that are not class scores."""
    p.add_argument("--region", metavar="MASK.png", help="explain a region of a dense output (segmentation, "
                                                        "image-to-image): a PNG at the input or photo size, "
                                                        "nonzero = inside; with --target the class")
    p.add_argument("--region-of", choices=("class", "output", "change"), default="class",
                   help="with --region: the class's logit summed over it (default), the output summed over it "
                        "('output', image-to-image models) or its change against the clean output ('change')")
    p.add_argument("--layout", choices=("BCHW", "BCT", "BCDHW", "BF"), default=None,
                   help="the input's axes; .npy/.csv inputs are series (BCT) unless told otherwise")


def parse_params(items, what: str = "METHOD") -> dict:
    """`--param` values: `deletion.step=448` -> {"deletion": {"step": 448}} (values parsed as JSON
    when possible); `what` names the part before the dot in the error."""
    out: dict = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise SaliencyError(f"--param expects {what}.NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        owner, name = key.split(".", 1)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(owner, {})[name] = parsed
    return out


def unique_stems(stems):
    seen, out = {}, []
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}_{seen[s]}")
    return out


# in the order `saliencykit --help` lists them
COMMANDS = ("explain", "catalog", "evaluate", "report", "run", "concepts", "serve", "benchmark", "train_parts", "train_small")


def command_modules():
    return [importlib.import_module(f"{__package__}.{name}") for name in COMMANDS]


def demo_steps():
    """What later features (the report, ...) add to `saliencykit demo`, in command order."""
    return [mod.demo_step for mod in command_modules() if hasattr(mod, "demo_step")]
