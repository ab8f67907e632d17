"""Attribution methods: `available()` lists them; `explain()` runs one or several.

One module per family; importing this package imports them all, which registers every method
(`base.register`). Methods that only run on one kind of subject live with that task
(`tasks.clip`: Grad-ECLIP; `tasks.detection`: D-RISE) and register themselves the same way.
"""
from .base import REGISTRY, Context, Method, available, explain, get, register
from . import baseline, cam, contralsp, crp, domains, gradient, paths, perturbation, propagation, region, transformer  # noqa: F401, E402

__all__ = ["available", "explain", "get", "register", "Method", "Context", "REGISTRY"]
