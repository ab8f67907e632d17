"""The same run on a Ray cluster (the `ray` extra): Ray Data hands out the plan's batches, an
actor pool holds one model per actor (`map_batches` with `concurrency` actors, each with
`threads` CPUs, or one GPU with `device="cuda"`), every actor reads and decodes its own images
from the source and runs `process_batch`, the code a local run uses, and the driver writes the
shards exactly as a local run does. So the rows are the same bytes as a local run with the same
`threads`, and the resume rules are the same (the shards that were in flight are recomputed).

Pointing it at an existing cluster: `saliencykit run ... --ray ray://HEAD:10001` (or `--ray auto`
on a node of the cluster). Every node needs saliencykit with the same versions installed and must
see the source (a shared filesystem or the same paths); the run directory is written by the
driver only.
"""
from __future__ import annotations

import json
import logging
import os
import pickle

from ..errors import SaliencyError


def require_ray():
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise SaliencyError("--ray needs Ray Data: pip install 'saliencykit[ray]'") from None


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # kilobytes on Linux


class BatchActor:
    """One model per actor; a call explains one batch of the plan."""

    def __init__(self, source, items, cfg, model, threads, device, versions, has_labels, batch):
        import torch

        from .runner import load_subject

        torch.set_num_threads(int(threads))
        self.source, self.items, self.cfg = source, items, cfg
        self.versions, self.has_labels, self.batch = versions, has_labels, batch
        self.subject = load_subject(model, device)

    def __call__(self, rows):
        from .runner import DecodeDataset, process_batch

        decode = DecodeDataset(self.source, self.items, self.subject._preprocess)
        out = {"batch": [], "shard": [], "payload": []}
        for b, k in zip(rows["batch"], rows["shard"]):
            b, k = int(b), int(k)
            start = b * self.batch
            records = [decode[p] for p in range(start, min(start + self.batch, len(self.items)))]
            res = process_batch(self.subject, self.cfg, records, self.items, b, k, self.versions, self.has_labels)
            res["actor"] = {"pid": os.getpid(), "peak_rss_mb": _peak_rss_mb()}
            out["batch"].append(b)
            out["shard"].append(k)
            out["payload"].append(pickle.dumps(res, protocol=5))
        return out


def run_on_ray(src, rd, manifest, plan, cfg, subject=None, address=None, threads=None, progress=True,
               device=None, actors=None):
    require_ray()
    import ray
    import ray.data

    from ..engine import Progress
    from .runner import ShardCollector

    """Compute the pending shards on Ray; returns what the actors reported: peak memory per actor
    (MB) and the seconds Ray took to start."""
    import time

    done = rd.done_shards()
    pending = [k for k in range(plan.shards) if k not in done]
    stats = {"actors": {}, "ray_start_seconds": 0.0}
    if not pending:
        return stats
    threads = int(threads or 1)
    t0 = time.perf_counter()
    started = False
    if not ray.is_initialized():
        logging.getLogger("ray").setLevel(logging.WARNING)
        kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        try:
            ray.init(address=address, **kwargs)
        except Exception as err:  # noqa: BLE001 - no cluster there, or a bad address
            raise SaliencyError(f"cannot start or reach Ray at {address or 'a new local cluster'}: {err}") from None
        started = True
    stats["ray_start_seconds"] = time.perf_counter() - t0
    try:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        descs = [{"batch": b, "shard": k} for k in pending for b in plan.shard_batches(k)]
        cpus = int(ray.cluster_resources().get("CPU", 1))
        gpu = device is not None and str(device).startswith("cuda")
        n_actors = actors or max(1, min(len(descs), (int(ray.cluster_resources().get("GPU", 0)) if gpu
                                                      else cpus // threads) or 1))
        versions = json.dumps(manifest["versions"], sort_keys=True)
        ds = ray.data.from_items(descs, override_num_blocks=len(descs))
        results = ds.map_batches(
            BatchActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=n_actors),
            num_cpus=0 if gpu else threads,
            num_gpus=1 if gpu else 0,
            fn_constructor_kwargs={"source": src, "items": plan.items, "cfg": cfg,
                                   "model": subject if subject is not None else cfg.model, "threads": threads,
                                   "device": device, "versions": versions, "has_labels": src.has_labels,
                                   "batch": plan.batch})
        collector = ShardCollector(rd, manifest, plan, cfg, pending)
        total = sum(len(plan.batch_positions(d["batch"])) for d in descs)
        with Progress(total, f"run on Ray ({n_actors} actors)", enabled=progress, leave=True, unit="img") as bar:
            for row in results.iter_rows():
                b, k = int(row["batch"]), int(row["shard"])
                res = pickle.loads(row["payload"])
                actor = res.pop("actor", None)
                if actor:
                    stats["actors"][actor["pid"]] = max(stats["actors"].get(actor["pid"], 0.0), actor["peak_rss_mb"])
                collector.add(b, k, res)
                bar.step(len(plan.batch_positions(b)))
    finally:
        if started:
            ray.shutdown()
    return stats


__all__ = ["run_on_ray", "BatchActor", "require_ray"]
