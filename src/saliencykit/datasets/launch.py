"""`run()`: the one entry point of a dataset run, locally (`runner.run_local`) or on Ray
(`ray_runner.run_on_ray`); both share the plan, the batch code and the shard writer."""
from __future__ import annotations

from ..errors import SaliencyError
from .runner import build_config, prepare, run_local
from .sources import open_source
from .store import load_run


def run(source, model="efficientnet_lite0", method="gradcam", metric=(), out="run", params=None, target=None,
        layer="auto", seed=0, batch=8, batch_size=None, shard_size=64, maps="layer", limit=None,
        shuffle=False, random_baseline=True, force=False, workers=None, threads=None, ray=None,
        progress=True, device=None, amp=False):
    """Explain and score every image of `source` into the run directory `out`; returns the `Run`
    (`load_run(out)`). A rerun with the same arguments resumes; see docs/datasets.md. `amp=True`
    explains under autocast (bfloat16 on a CPU, float16 on CUDA; recorded in the manifest, the
    metrics stay float32); see docs/performance.md, "Mixed precision", for its error."""
    from ..subject import Subject

    subject = model if isinstance(model, Subject) else None
    cfg = build_config(subject.name if subject is not None else model, method, metric, params, target, layer,
                       seed, batch, batch_size, shard_size, maps, limit, shuffle, random_baseline, amp)
    src = open_source(source)
    if cfg.target == "label" and not src.has_labels:
        raise SaliencyError(f"--target label explains each image's labelled class, but this {src.kind} source has "
                            "no labels (an ImageFolder layout, a list with a label column, or a labelled dataset "
                            "has them)")
    rd, manifest, plan = prepare(src, out, cfg, force=force, progress=progress)
    stats = {}
    if ray is not None and ray is not False:
        from .ray_runner import run_on_ray

        stats = run_on_ray(src, rd, manifest, plan, cfg, subject=subject, address=None if ray is True else ray,
                           threads=threads, progress=progress, device=device)
    else:
        run_local(src, rd, manifest, plan, cfg, subject=subject, workers=workers, threads=threads,
                  progress=progress, device=device)
    result = load_run(rd.root)
    result.stats = stats   # Ray: peak memory per actor, Ray's start-up seconds
    return result


__all__ = ["run"]
