"""The run directory: what `saliencykit run` writes, and `load_run` to read it back.

    RUN/manifest.json           the whole configuration, the versions, a content hash per input
    RUN/rows/shard-00000.parquet    one row per (image, method, target): prediction, target, label,
                                    one column per metric (named as the metric), passes, seed
    RUN/errors/shard-00000.parquet  one row per input that failed: image, path, stage, reason
    RUN/maps/shard-00000.parquet    the maps as float16 (layer resolution, and/or input resolution)
    RUN/timing/shard-00000.parquet  seconds per row: the method's own (`seconds`), its share of the
                                    metrics (`metric_seconds`) and of the batch's whole explain +
                                    evaluate wall time (`compute_seconds`); kept apart so the rows
                                    are byte-identical between two runs of the same command

A shard is committed by its rows file: maps, errors and timing are written first, each through a
temporary file and a rename, and the rows file last. A shard without a rows file is not done and
is recomputed on resume; a shard with one is never rewritten.

Why Parquet shards for the maps rather than a separate array store: a shard's maps are written
and committed exactly like its rows (one temporary file, one rename), so a crash can never leave
maps that disagree with the table; float16 halves the size; a map is found by filtering on
`image`/`method` like any row, with pyarrow's row-group statistics doing the skipping.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SaliencyError
from ..files import atomic_write

FORMAT = 1
PARTS = ("maps", "errors", "timing", "rows")   # write order: rows last commits the shard


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.parquet"


def require_pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise SaliencyError("dataset runs write Parquet through pyarrow: pip install pyarrow") from None


# ------------------------------------------------------------------------------ schemas
def row_schema(metrics, curve_metrics, versions: dict):
    import pyarrow as pa

    fields = [("image", pa.string()), ("index", pa.int64()), ("label", pa.string()), ("label_index", pa.int64()),
              ("method", pa.string()), ("target", pa.string()), ("target_index", pa.int64()),
              ("target_kind", pa.string()), ("prediction", pa.string()), ("prediction_index", pa.int64()),
              ("probability", pa.float64()), ("target_probability", pa.float64()), ("mode", pa.string()),
              ("width", pa.int32()), ("height", pa.int32()), ("seed", pa.int64()), ("batch", pa.int32()),
              ("shard", pa.int32()), ("passes_forward", pa.float64()), ("passes_backward", pa.float64())]
    fields += [(m, pa.float64()) for m in metrics]
    fields += [(f"{m}_curve", pa.list_(pa.float32())) for m in curve_metrics]
    fields += [("versions", pa.dictionary(pa.int32(), pa.string()))]
    return pa.schema(fields, metadata={"saliencykit.versions": json.dumps(versions, sort_keys=True)})


def error_schema():
    import pyarrow as pa

    return pa.schema([("image", pa.string()), ("index", pa.int64()), ("path", pa.string()), ("stage", pa.string()),
                      ("reason", pa.string()), ("shard", pa.int32())])


def map_schema():
    import pyarrow as pa

    return pa.schema([("image", pa.string()), ("index", pa.int64()), ("method", pa.string()),
                      ("target", pa.string()), ("resolution", pa.string()), ("height", pa.int32()),
                      ("width", pa.int32()), ("signed", pa.bool_()), ("values", pa.list_(pa.float16()))])


def timing_schema():
    import pyarrow as pa

    return pa.schema([("image", pa.string()), ("index", pa.int64()), ("method", pa.string()),
                      ("seconds", pa.float64()), ("metric_seconds", pa.float64()),
                      ("compute_seconds", pa.float64())])


def table(records: list[dict], schema):
    import pyarrow as pa

    cols = {}
    for f in schema:
        values = [r.get(f.name) for r in records]
        if f.name == "versions":
            cols[f.name] = pa.array(values, pa.string()).dictionary_encode().cast(f.type)
        elif pa.types.is_list(f.type) and pa.types.is_float16(f.type.value_type):
            cols[f.name] = _half_lists(values)
        else:
            cols[f.name] = pa.array(values, f.type)
    return pa.Table.from_arrays(list(cols.values()), schema=schema)


def _half_lists(values):
    import pyarrow as pa

    arrays = [np.asarray(v, dtype=np.float16).ravel() for v in values]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([a.size for a in arrays]) if arrays else []
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.float16)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.float16()))


# ------------------------------------------------------------------------------ the directory
class RunDir:
    """Paths and shard bookkeeping of one run directory."""

    def __init__(self, root):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def part(self, part: str, k: int) -> Path:
        return self.root / part / shard_name(k)

    def done_shards(self) -> set[int]:
        d = self.root / "rows"
        if not d.is_dir():
            return set()
        return {int(p.stem.split("-")[1]) for p in d.glob("shard-*.parquet")}

    def read_manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SaliencyError(f"{self.manifest_path} is damaged ({err}); start over with --force") from None

    def write_manifest(self, manifest: dict):
        text = json.dumps(manifest, indent=1, sort_keys=True)
        atomic_write(self.manifest_path, lambda p: Path(p).write_text(text))

    def clean_temporaries(self):
        """Remove what a killed run left behind: temporary files that were never renamed."""
        for part in PARTS:
            d = self.root / part
            if d.is_dir():
                for p in d.glob(".tmp-*"):
                    p.unlink(missing_ok=True)

    def check_writable(self, needed_bytes: int = 0):
        """The folder can be made and written (`files.check_writable_dir`); the free space covers
        an estimate of what the run writes."""
        import shutil

        from ..files import check_writable_dir

        check_writable_dir(self.root, "the run")
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if needed_bytes and free < needed_bytes:
            raise SaliencyError(f"{self.root} has {free / 1e6:.0f} MB free; this run needs about "
                                f"{needed_bytes / 1e6:.0f} MB (maps included): free space, choose another --out, "
                                "or store fewer maps (--maps none)")

    def write_shard(self, k: int, tables: dict):
        """Write one shard's tables, rows last (the commit)."""
        import pyarrow.parquet as pq

        for part in PARTS:
            if part not in tables:
                continue
            t = tables[part]
            try:
                atomic_write(self.part(part, k), lambda p, t=t: pq.write_table(t, p, compression="zstd"))
            except OSError as err:
                done = len(self.done_shards())
                raise SaliencyError(f"writing {part}/{shard_name(k)} failed: {err.strerror or err}. The {done} "
                                    "finished shard(s) are intact; fix the cause and rerun the same command to "
                                    "resume") from None

    def remove(self):
        """Delete what a run wrote (the manifest and the shard folders), nothing else."""
        import shutil

        for part in PARTS:
            shutil.rmtree(self.root / part, ignore_errors=True)
        for name in ("manifest.json", "summary.html"):
            (self.root / name).unlink(missing_ok=True)


def describe_difference(old: dict, new: dict, prefix: str = "") -> list[str]:
    """What differs between two configurations, one line per key."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def describe_input_difference(old: dict, new: dict, show: int = 3) -> list[str]:
    out = []
    changed = [k for k in new if k in old and old[k] != new[k]]
    added = [k for k in new if k not in old]
    removed = [k for k in old if k not in new]
    for what, keys in (("changed content", changed), ("new", added), ("gone", removed)):
        if keys:
            more = f" and {len(keys) - show} more" if len(keys) > show else ""
            out.append(f"{len(keys)} input(s) {what}: {', '.join(keys[:show])}{more}")
    return out


# ------------------------------------------------------------------------------ reading
@dataclass
class Run:
    """A run read back: `rows` and `errors` are pandas DataFrames (`rows` with the `seconds` of
    each row joined in), `manifest` the configuration; `maps(...)` reads stored maps."""

    root: Path
    manifest: dict
    rows: object
    errors: object
    stats: dict = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def metrics(self) -> list[str]:
        return list(self.config["metrics"])

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(self.rows["method"])) if len(self.rows) else list(self.config["methods"])

    @property
    def complete(self) -> bool:
        return len(RunDir(self.root).done_shards()) == self.manifest["plan"]["shards"]

    def maps(self, image: str | None = None, method: str | None = None, resolution: str | None = None):
        """Stored maps as a DataFrame (`image`, `method`, `target`, `resolution`, `map` as a
        float32 array [H,W]), filtered by image, method and resolution ("layer" or "input")."""
        import pyarrow.compute as pc
        import pyarrow.dataset as pds

        d = self.root / "maps"
        files = sorted(d.glob("shard-*.parquet")) if d.is_dir() else []
        if not files:
            raise SaliencyError(f"{self.root} stores no maps (the run used --maps none)")
        ds = pds.dataset([str(f) for f in files], format="parquet")
        cond = None
        for col, value in (("image", image), ("method", method), ("resolution", resolution)):
            if value is not None:
                c = pc.field(col) == value
                cond = c if cond is None else cond & c
        t = ds.to_table(filter=cond)
        df = t.drop(["values"]).to_pandas()
        values = t.column("values").to_pylist()
        df["map"] = [np.asarray(v, np.float32).reshape(h, w) for v, h, w in zip(values, df["height"], df["width"])]
        return df

    def __repr__(self):
        return (f"Run({self.root}, rows={len(self.rows)}, errors={len(self.errors)}, "
                f"methods={self.methods}, metrics={self.metrics})")


def _read_parts(root: Path, part: str, schema):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = root / part
    files = sorted(d.glob("shard-*.parquet")) if d.is_dir() else []
    done = RunDir(root).done_shards()
    tables = [pq.read_table(f) for f in files if int(f.stem.split("-")[1]) in done]
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables, promote_options="default")


def load_run(path) -> Run:
    """Read a run directory (complete or not: the finished shards)."""
    require_pyarrow()
    root = Path(path)
    rd = RunDir(root)
    manifest = rd.read_manifest()
    if manifest is None:
        raise SaliencyError(f"{root} is not a saliencykit run (no manifest.json)")
    cfg = manifest["config"]
    rows = _read_parts(root, "rows", row_schema(cfg["metrics"], manifest.get("curve_metrics", []), {}))
    rows = rows.to_pandas()
    if "versions" in rows:
        rows["versions"] = rows["versions"].astype(str)
    timing = _read_parts(root, "timing", timing_schema()).to_pandas()
    if len(rows) and len(timing):
        rows = rows.merge(timing[["index", "method", "seconds", "metric_seconds", "compute_seconds"]],
                          on=["index", "method"],
                          how="left")
    errors = _read_parts(root, "errors", error_schema()).to_pandas()
    return Run(root, manifest, rows, errors)
