"""Dataset-scale runs: image sources (folders, CSV/JSONL lists, torchvision and Hugging Face
datasets, the parts dataset, the bundled photos), resumable runs to Parquet tables and stored
maps, locally or on a Ray cluster, and their summaries with confidence intervals.

This room may import the core, methods, metrics, tasks and benchmarks; present and cli build on
it. See docs/datasets.md.
"""
from .launch import run  # noqa: F401
from .runner import (EXIT_CRASHED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, EXIT_REFUSED,  # noqa: F401
                     RunConfig)
from .sources import (BundledSource, FolderSource, HFSource, Item, ListSource, PartsSource, Source,  # noqa: F401
                      TorchvisionSource, open_source)
from .store import Run, load_run  # noqa: F401
from . import summary  # noqa: F401
from .summary import summarize  # noqa: F401

__all__ = ["run", "load_run", "summarize", "summary", "Run", "RunConfig", "open_source", "Source", "Item", "FolderSource", "ListSource",
           "TorchvisionSource", "HFSource", "PartsSource", "BundledSource", "EXIT_OK", "EXIT_CRASHED",
           "EXIT_REFUSED", "EXIT_PARTIAL", "EXIT_INTERRUPTED"]
