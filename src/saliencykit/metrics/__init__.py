"""Evaluation metrics for saliency maps and `evaluate()`, which runs several of them over several
explanations of the same inputs and collects one table.

    ev = evaluate(subject, x, {"gradcam": e1, "random": e2}, metrics=["deletion", "insertion"])
    ev.table()            # one row per (image, method), one column per metric
    ev.to_csv("scores.csv"); ev.plot_curves("curves.png")

`available()` lists the registered metrics with their direction (which way is better), what
they need (re-running the method, object masks, a second class, a model copy) and their cost.
"""
from __future__ import annotations

from .base import (EvalContext, Metric, MetricResult, available, get, make_substrate, rank_maps,  # noqa: F401
                   register)
from .evaluate import EvaluationResult, Table, evaluate  # noqa: F401

# importing the metric families registers them
from . import (complexity, contrastive, faithfulness, localisation, pic, randomisation, road,  # noqa: F401, E402
               sensitivity)

__all__ = ["available", "get", "evaluate", "EvaluationResult", "Table", "Metric", "MetricResult", "register",
           "EvalContext"]
