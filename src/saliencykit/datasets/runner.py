"""`run()`: explain and score every image of a source, into a resumable run directory.

The plan is fixed by the configuration alone: the images in source order (shuffled with the seed
and cut to `limit` when asked), cut into batches of `batch` images and shards of whole batches.
Each batch is explained with one seed derived from the run's seed and the batch's number, so a
row never depends on where a run was interrupted, on how many DataLoader workers decoded the
images, or on which Ray actor computed it. What a batch does (`process_batch`) is the same code
locally and on Ray.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import torch

from ..engine import Progress
from ..errors import SaliencyError, positive_int
from .sources import Item, Source
from .store import RunDir, describe_difference, describe_input_difference, require_pyarrow

EXIT_OK = 0          # every image succeeded
EXIT_CRASHED = 1     # an unexpected error stopped the run (finished shards stay valid)
EXIT_REFUSED = 2     # bad arguments, or a run directory made with another configuration
EXIT_PARTIAL = 3     # the run finished, and some inputs have a row in the errors table
EXIT_INTERRUPTED = 130
MAP_CHOICES = ("layer", "input", "both", "none")
LAYER_MAP_SIDE = 56  # pixel-level maps kept at "layer" resolution are area-averaged to this side


# ------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    items: list[Item]
    batch: int
    shard_size: int

    @property
    def batches(self) -> int:
        return math.ceil(len(self.items) / self.batch)

    @property
    def shards(self) -> int:
        return math.ceil(len(self.items) / self.shard_size)

    def shard_batches(self, k: int) -> range:
        per = self.shard_size // self.batch
        return range(k * per, min((k + 1) * per, self.batches))

    def batch_positions(self, b: int) -> range:
        return range(b * self.batch, min((b + 1) * self.batch, len(self.items)))

    def shard_of_batch(self, b: int) -> int:
        return b // (self.shard_size // self.batch)

    def describe(self) -> dict:
        return {"images": len(self.items), "batch": self.batch, "shard_size": self.shard_size,
                "batches": self.batches, "shards": self.shards}


def make_plan(items: list[Item], batch: int, shard_size: int, limit=None, shuffle=False, seed=0) -> Plan:
    items = list(items)
    if shuffle:
        g = torch.Generator().manual_seed(int(seed))
        items = [items[i] for i in torch.randperm(len(items), generator=g).tolist()]
    if limit is not None:
        items = items[:positive_int(limit, "limit")]
    # shards hold whole batches, so batch boundaries never depend on the shard size
    shard_size = max(batch, (shard_size // batch) * batch)
    return Plan(items, batch, shard_size)


def batch_seed(seed: int, b: int) -> int:
    """The seed of batch `b`: a hash of the run's seed and the batch number (31 bits)."""
    return int(hashlib.sha256(f"{int(seed)}/{int(b)}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


# ------------------------------------------------------------------------------ decoding
class DecodeDataset(torch.utils.data.Dataset):
    """Plan position -> a decoded, preprocessed record; a failure is a record too (never raised),
    so one bad file cannot stop a DataLoader worker or the run."""

    def __init__(self, source: Source, items: list[Item], preprocess):
        self.source, self.items, self.preprocess = source, items, preprocess

    def __len__(self):
        return len(self.items)

    def __getitem__(self, pos: int) -> dict:
        item = self.items[pos]
        rec = {"pos": pos}
        if item.problem:
            rec.update(error=item.problem, stage="list")
            return rec
        try:
            d = self.source.decode(item)
            x = self.preprocess(d.image)
            mask = None
            if d.mask is not None:
                m = torch.from_numpy(d.mask.astype("float32"))[None, None]
                mask = torch.nn.functional.interpolate(m, size=tuple(x.shape[-2:]), mode="nearest")[0, 0] > 0.5
            rec.update(x=x, mode=d.mode, size=tuple(d.image.size), mask=mask, label=d.label)
        except SaliencyError as err:
            rec.update(error=str(err), stage="decode")
        except Exception as err:  # noqa: BLE001 - a dataset's own failure, recorded with its type
            rec.update(error=f"{type(err).__name__}: {err}", stage="decode")
        return rec


def decode_records(source, items, preprocess, positions, workers: int = 0):
    """Decoded records for `positions` (plan order), in that order, from `workers` processes."""
    ds = DecodeDataset(source, items, preprocess)
    if workers <= 0:
        for p in positions:
            yield ds[p]
        return
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=list(positions), num_workers=workers,
                                         prefetch_factor=4, worker_init_fn=_one_thread, persistent_workers=False)
    yield from loader


def _one_thread(_):
    torch.set_num_threads(1)   # decoding workers leave the cores to the model


# ------------------------------------------------------------------------------ one batch
@dataclass
class RunConfig:
    model: str
    methods: list
    metrics: list
    params: dict
    target: object          # None (top-1), "label", {"class": c}, {"contrast": a, "vs": b}, {"group": g}
    layer: str
    seed: int
    batch: int
    batch_size: int | None
    shard_size: int
    maps: str
    limit: int | None
    shuffle: bool
    random_baseline: bool
    amp: bool = False       # explain under autocast (`explain(amp=True)`); metrics stay float32

    def to_dict(self) -> dict:
        from dataclasses import asdict

        out = asdict(self)
        if not self.amp:   # a float32 run's manifest reads as before `amp` existed, so its resume still matches
            del out["amp"]
        return out


def resolve_target(cfg: RunConfig, label_indices):
    from ..targets import Class, Contrast, Group

    t = cfg.target
    if t is None:
        return None
    if t == "label":
        return Class(list(label_indices))
    if "class" in t:
        return Class(t["class"])
    if "contrast" in t:
        return Contrast(t["contrast"], vs=t["vs"])
    if "group" in t:
        return Group(t["group"])
    raise SaliencyError(f"unknown target {t!r}")


def label_index(subject, label):
    if label is None:
        return None
    n = len(subject.labels) if subject.labels else None
    if isinstance(label, int):
        return label if n is None or 0 <= label < n else None
    try:
        return subject.class_index(str(label))
    except SaliencyError:
        return None


def _split_params(cfg: RunConfig):
    method_params = {k: v for k, v in cfg.params.items() if k in cfg.methods}
    metric_params = {k: v for k, v in cfg.params.items() if k in cfg.metrics}
    return method_params, metric_params


def _layer_map(exp, b: int) -> torch.Tensor:
    if exp.raw is not None:
        return exp.raw[b]
    m = exp.maps[b]
    H, W = m.shape
    s = min(1.0, LAYER_MAP_SIDE / max(H, W))
    size = (max(1, round(H * s)), max(1, round(W * s)))
    return torch.nn.functional.adaptive_avg_pool2d(m[None, None], size)[0, 0]


def process_batch(subject, cfg: RunConfig, records: list[dict], items: list[Item], b: int, shard: int,
                  versions: str, has_labels: bool) -> dict:
    """Explain and score one batch of decoded records -> {"rows", "maps", "errors", "timing",
    "curves"}. Inputs that cannot be explained are error rows; the others go on."""
    errors, ok = [], []
    for rec in records:
        item = items[rec["pos"]]
        if "error" in rec:
            errors.append(_error(item, rec["stage"], rec["error"], shard))
            continue
        label = rec.get("label") if rec.get("label") is not None else item.label
        rec["label_value"], rec["label_index"] = label, label_index(subject, label)
        if label is None and has_labels:
            errors.append(_error(item, "label", "no label (the source gives labels for other images)", shard))
        if cfg.target == "label" and rec["label_index"] is None:
            why = "it has no label" if label is None else f"its label {label!r} is not a class of the model"
            errors.append(_error(item, "label", f"cannot explain the labelled class: {why}", shard))
            continue
        ok.append(rec)
    out = {"rows": [], "maps": [], "errors": errors, "timing": [], "curves": {}}
    if not ok:
        return out
    try:
        _explain_into(out, subject, cfg, ok, items, b, shard, versions)
    except SaliencyError as err:
        if len(ok) == 1:
            out["errors"].append(_error(items[ok[0]["pos"]], "explain", str(err), shard))
            return out
        # find the image that fails: each one alone (deterministic, so a resume does the same)
        for rec in ok:
            one = process_batch(subject, cfg, [rec], items, b, shard, versions, False)
            for key in ("rows", "maps", "errors", "timing"):
                out[key] += one[key]
            out["curves"].update(one["curves"])
        if not out["rows"] and len({e["reason"] for e in out["errors"] if e["stage"] == "explain"}) == 1:
            raise   # every image fails the same way: the configuration, not the images
    return out


def _error(item: Item, stage: str, reason: str, shard: int) -> dict:
    return {"image": item.id, "index": item.index, "path": item.path, "stage": stage, "reason": reason,
            "shard": shard}


def _explain_into(out, subject, cfg, ok, items, b, shard, versions):
    from .. import methods as method_registry
    from ..engine import forward_logits
    from ..metrics import evaluate

    seed = batch_seed(cfg.seed, b)
    x = torch.stack([r["x"] for r in ok]).to(subject.device)
    tgt = resolve_target(cfg, [r["label_index"] for r in ok])
    method_params, metric_params = _split_params(cfg)
    t0 = time.perf_counter()
    exps = method_registry.explain(subject, x, method=list(cfg.methods), target=tgt, layer=cfg.layer, seed=seed,
                                   batch_size=cfg.batch_size, params=method_params, amp=cfg.amp)
    ev = None
    if cfg.metrics:
        masks = None
        from ..metrics import get

        if any("masks" in get(m).needs for m in cfg.metrics):
            masks = torch.stack([r["mask"] if r.get("mask") is not None else torch.zeros(x.shape[-2:], dtype=torch.bool)
                                 for r in ok])
        ev = evaluate(subject, x, exps, metrics=list(cfg.metrics), target=tgt, seed=seed, masks=masks,
                      batch_size=cfg.batch_size, params=metric_params, random_baseline=cfg.random_baseline)
        logits = ev.logits
    else:
        with torch.no_grad(), subject.explaining():
            logits = forward_logits(subject, x, cfg.batch_size, None)
    compute = time.perf_counter() - t0      # the model's work: every pass of explain and evaluate
    probs = logits.float().softmax(-1).cpu()
    top = probs.argmax(-1)
    names = list(exps) + (["random"] if ev is not None and "random" in ev.methods and "random" not in exps else [])
    first = next(iter(exps.values()))
    B = len(ok)
    if ev is not None:
        for metric, per in ev.results.items():
            r = next(iter(per.values()))
            if r.curves:
                out["curves"][metric] = {"x": [float(v) for v in r.curves["x"].tolist()],
                                         "xlabel": r.curves.get("xlabel", ""), "ylabel": r.curves.get("ylabel", "")}
    for i, rec in enumerate(ok):
        item = items[rec["pos"]]
        t = first.target[i]
        t_index = int(t["indices"][0]) if len(t.get("indices", [])) == 1 else None
        t_prob = float(probs[i, t_index]) if t_index is not None and "vs_indices" not in t else None
        has_mask = rec.get("mask") is not None and bool(rec["mask"].any())
        for name in names:
            e = exps.get(name)
            row = {"image": item.id, "index": item.index,
                   "label": None if rec["label_value"] is None else str(rec["label_value"]),
                   "label_index": rec["label_index"], "method": name, "target": t.get("name"),
                   "target_index": t_index, "target_kind": t.get("kind"),
                   "prediction": subject.label(int(top[i])), "prediction_index": int(top[i]),
                   "probability": float(probs[i, top[i]]), "target_probability": t_prob, "mode": rec["mode"],
                   "width": int(rec["size"][0]), "height": int(rec["size"][1]), "seed": seed, "batch": b,
                   "shard": shard, "passes_forward": float(e.passes.get("forward", 0)) if e else 0.0,
                   "passes_backward": float(e.passes.get("backward", 0)) if e else 0.0, "versions": versions}
            if ev is not None:
                for metric, per in ev.results.items():
                    r = per.get(name)
                    v = float(r.scores[i]) if r is not None else float("nan")
                    if "masks" in _needs(metric) and not has_mask:
                        v = float("nan")   # no ground truth for this image: not scored
                    row[metric] = v
                    if r is not None and r.curves:
                        row[f"{metric}_curve"] = [float(y) for y in r.curves["y"][i].tolist()]
            out["rows"].append(row)
            metric_seconds = sum(ev.seconds.values()) / (B * len(names)) if ev is not None else 0.0
            out["timing"].append({"image": item.id, "index": item.index, "method": name,
                                  "seconds": (e.seconds / B) if e else 0.0, "metric_seconds": metric_seconds,
                                  "compute_seconds": compute / (B * len(names))})
            if e is None or cfg.maps == "none":
                continue
            for res in (("layer",) if cfg.maps == "layer" else ("input",) if cfg.maps == "input"
                        else ("layer", "input")):
                m = _layer_map(e, i) if res == "layer" else e.maps[i]
                out["maps"].append({"image": item.id, "index": item.index, "method": name, "target": t.get("name"),
                                    "resolution": res, "height": int(m.shape[0]), "width": int(m.shape[1]),
                                    "signed": bool(e.signed), "values": m.numpy()})


def _needs(metric: str):
    from ..metrics import get

    return get(metric).needs


# ------------------------------------------------------------------------------ the run
def build_config(model, methods, metrics, params=None, target=None, layer="auto", seed=0, batch=8,
                 batch_size=None, shard_size=64, maps="layer", limit=None, shuffle=False,
                 random_baseline=True, amp=False) -> RunConfig:
    from .. import methods as method_registry
    from ..metrics import get as get_metric

    methods = [methods] if isinstance(methods, str) else list(methods or [])
    metrics = [metrics] if isinstance(metrics, str) else list(metrics or [])
    if not methods:
        raise SaliencyError("a run needs at least one method (--method NAME)")
    methods = [method_registry.get(m).name for m in methods]   # unknown names fail before any work
    metrics = [get_metric(m).name for m in metrics]
    if len(set(methods)) != len(methods):
        raise SaliencyError(f"a method is named twice: {methods}")
    params = {k: dict(v) for k, v in (params or {}).items()}
    unknown = [k for k in params if k not in methods and k not in metrics]
    if unknown:
        raise SaliencyError(f"--param names {unknown[0]!r}, which is neither a --method nor a --metric of this run")
    if maps not in MAP_CHOICES:
        raise SaliencyError(f"maps must be one of {', '.join(MAP_CHOICES)}, got {maps!r}")
    if seed is None:
        import secrets

        seed = secrets.randbelow(2**31)   # fresh entropy, recorded in the manifest so the run can be repeated
    if isinstance(target, (int, str)) and target != "label":
        target = {"class": target}
    return RunConfig(model=str(model), methods=methods, metrics=metrics, params=params, target=target,
                     layer=str(layer), seed=int(seed), batch=positive_int(batch, "batch"),
                     batch_size=None if batch_size is None else positive_int(batch_size, "batch_size"),
                     shard_size=positive_int(shard_size, "shard_size"), maps=maps,
                     limit=None if limit is None else positive_int(limit, "limit"), shuffle=bool(shuffle),
                     random_baseline=bool(random_baseline), amp=bool(amp))


def input_hashes(source: Source, items: list[Item], progress: bool = False) -> tuple[dict, dict]:
    """id -> content hash of every input, and id -> the id of an earlier input with the same content."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item):
        if item.problem:
            return "unreadable"
        try:
            return source.content_hash(item)
        except Exception as err:  # noqa: BLE001 - unreadable now; the decode step records why
            return f"unreadable: {type(err).__name__}"

    from ..engine import with_progress

    with ThreadPoolExecutor(max_workers=4) as pool:   # hashing reads files; it releases the GIL
        it = with_progress(pool.map(one, items), "hashing inputs", enabled=progress, total=len(items), unit="img")
        hashes = dict(zip((i.id for i in items), it))
    first, dup = {}, {}
    for item in items:
        h = hashes[item.id]
        if h.startswith("unreadable") or h == "missing":
            continue
        if h in first:
            dup[item.id] = first[h]
        else:
            first[h] = item.id
    return hashes, dup


def prepare(source, out, cfg: RunConfig, force: bool = False, progress: bool = False):
    """Open or create the run directory for `cfg` over `source`: -> (RunDir, manifest, plan).
    An existing run with another configuration or other inputs is refused (or removed with force)."""
    from dataclasses import replace

    from ..explanation import package_versions

    require_pyarrow()
    from ..files import check_writable_dir

    rd = RunDir(out)
    check_writable_dir(rd.root, "the run")       # a file, or a folder that takes no files: before any work
    old = rd.read_manifest() if rd.root.is_dir() else None
    if rd.root.is_dir() and old is None and any(rd.root.iterdir()):
        raise SaliencyError(f"{rd.root} is not empty and holds no saliencykit run; give a new or empty directory")
    items = source.items()
    hashes, dup = input_hashes(source, items, progress)
    items = [replace(it, problem=f"duplicate of {dup[it.id]} (same content)") if it.id in dup and not it.problem
             else it for it in items]
    plan = make_plan(items, cfg.batch, cfg.shard_size, cfg.limit, cfg.shuffle, cfg.seed)
    planned = {it.id: hashes[it.id] for it in plan.items}
    config = {**cfg.to_dict(), "source": source.describe()}
    if old is not None:
        diff = describe_difference(old.get("config", {}), config)
        diff += describe_input_difference(old.get("inputs", {}), planned)
        if diff and not force:
            raise SaliencyError(f"{rd.root} holds a run with another configuration:\n  " + "\n  ".join(diff) +
                                "\nrerun with --force to start over, or choose another --out")
        if diff:
            rd.remove()
            old = None
    rd.check_writable(_estimate_bytes(cfg, plan))
    if old is None:
        manifest = {"format": 1, "config": config, "inputs": planned, "plan": plan.describe(),
                    "versions": package_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "curves": {}}
        rd.write_manifest(manifest)
    else:
        manifest = old
    rd.clean_temporaries()
    return rd, manifest, plan


def _estimate_bytes(cfg: RunConfig, plan: Plan) -> int:
    rows = len(plan.items) * (len(cfg.methods) + 1)
    per_map = {"none": 0, "layer": 2 * LAYER_MAP_SIDE ** 2, "input": 2 * 224 ** 2,
               "both": 2 * (LAYER_MAP_SIDE ** 2 + 224 ** 2)}[cfg.maps]
    return rows * (600 + 40 * len(cfg.metrics)) + len(plan.items) * len(cfg.methods) * per_map // 2


def shard_tables(result: dict, cfg: RunConfig, manifest: dict) -> dict:
    from .store import error_schema, map_schema, row_schema, table, timing_schema

    key = {name: i for i, name in enumerate(cfg.methods + ["random"])}
    rows = sorted(result["rows"], key=lambda r: (r["index"], key.get(r["method"], 99)))
    timing = sorted(result["timing"], key=lambda r: (r["index"], key.get(r["method"], 99)))
    maps = sorted(result["maps"], key=lambda r: (r["index"], key.get(r["method"], 99), r["resolution"]))
    errors = sorted(result["errors"], key=lambda r: (r["index"], r["stage"]))
    schema = row_schema(cfg.metrics, sorted(manifest.get("curves", {})), manifest["versions"])
    tables = {"rows": table(rows, schema), "errors": table(errors, error_schema()),
              "timing": table(timing, timing_schema())}
    if cfg.maps != "none":
        tables["maps"] = table(maps, map_schema())
    return tables


PARTS_MODELS = {"parts_cnn": "cnn", "parts_vit": "vit"}


def load_subject(model, device=None):
    """A Subject by name (`models.load_model`, plus `parts_cnn`/`parts_vit`, the parts models),
    or the Subject itself."""
    from ..models import load_model
    from ..subject import Subject

    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SaliencyError(f"--device {device}: no CUDA device is available here (torch "
                            f"{torch.__version__}); leave --device out to run on the CPU")
    if isinstance(model, Subject):
        if device is not None:
            model.model.to(device)
        return model
    if model in PARTS_MODELS:
        from ..benchmarks.parts.models import load_parts_model

        subject = load_parts_model(PARTS_MODELS[model])
        if device is not None:
            subject.model.to(device)
        return subject
    return load_model(model, device=device)


def run_local(src, rd, manifest, plan, cfg, subject=None, workers=None, threads=None, progress=True, device=None):
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(positive_int(threads, "threads"))
    try:
        _run_local(src, rd, manifest, plan, cfg, subject, workers, progress, device)
    finally:
        torch.set_num_threads(before)


def _run_local(src, rd, manifest, plan, cfg, subject, workers, progress, device):
    import json

    subject = load_subject(subject if subject is not None else cfg.model, device)
    done = rd.done_shards()
    pending = [k for k in range(plan.shards) if k not in done]
    if not pending:
        return
    positions = [p for k in pending for b in plan.shard_batches(k) for p in plan.batch_positions(b)]
    workers = min(2, torch.get_num_threads()) if workers is None else int(workers)
    versions = json.dumps(manifest["versions"], sort_keys=True)
    collector = ShardCollector(rd, manifest, plan, cfg, pending)
    records = []
    with Progress(len(positions), "run", enabled=progress, leave=True, unit="img") as bar:
        for rec in decode_records(src, plan.items, subject._preprocess, positions, workers):
            records.append(rec)
            b = rec["pos"] // plan.batch
            if rec["pos"] != plan.batch_positions(b)[-1]:
                continue
            k = plan.shard_of_batch(b)
            collector.add(b, k, process_batch(subject, cfg, records, plan.items, b, k, versions, src.has_labels))
            bar.step(len(records))
            records = []
            if bar.bar is not None:
                bar.bar.set_postfix(shards=f"{collector.done}/{plan.shards}", errors=collector.errors)


class ShardCollector:
    """Gathers the batches of each pending shard as they finish (in any order) and writes a shard
    as soon as its last batch is in: the one bookkeeping of local and Ray runs."""

    def __init__(self, rd, manifest, plan, cfg, pending):
        self.rd, self.manifest, self.plan, self.cfg = rd, manifest, plan, cfg
        self.waiting = {k: set(plan.shard_batches(k)) for k in pending}
        self.results = {k: {"rows": [], "maps": [], "errors": [], "timing": []} for k in pending}
        self.done = plan.shards - len(pending)
        self.errors = 0

    def add(self, b: int, k: int, res: dict):
        acc = self.results[k]
        for key in acc:
            acc[key] += res[key]
        self.errors += len(res["errors"])
        _record_curves(self.rd, self.manifest, res["curves"])
        self.waiting[k].discard(b)
        if not self.waiting[k]:
            self.rd.write_shard(k, shard_tables(self.results.pop(k), self.cfg, self.manifest))
            self.done += 1


def _record_curves(rd, manifest, curves: dict):
    new = {k: v for k, v in curves.items() if k not in manifest.setdefault("curves", {})}
    if new:
        manifest["curves"].update(new)
        rd.write_manifest(manifest)


__all__ = ["build_config", "prepare", "make_plan", "process_batch", "batch_seed", "RunConfig", "Plan",
           "EXIT_OK", "EXIT_CRASHED", "EXIT_REFUSED", "EXIT_PARTIAL", "EXIT_INTERRUPTED", "MAP_CHOICES"]
