"""saliencykit: explain PyTorch vision models with saliency maps, measure how faithful the maps
are, and say in plain words what they show.

The rooms (docs/architecture.md), lowest first: the core (subject, targets, explanation, engine,
inference, models, data), methods and metrics, tasks (CLIP, detection, similarity), datasets (runs
over many images: `run`, `load_run`) and concepts and benchmarks, present (pictures, words, report, app), cli.
"""
from .version import __version__  # noqa: F401

from . import data, engine, inference, methods, metrics  # noqa: E402
from .errors import SaliencyError  # noqa: E402
from .explanation import Explanation  # noqa: E402
from .methods import explain  # noqa: E402
from .metrics import evaluate  # noqa: E402
from .subject import Subject, load_image  # noqa: E402
from .targets import Class, Contrast, Group, OutputRegion, Pixel, Region, Target, TopK  # noqa: E402
from .tasks.similarity import Similarity  # noqa: E402
from .tasks.clip import CLIPSubject, Text, load_clip  # noqa: E402
from .tasks import grad_eclip  # noqa: E402, F401  (registers the grad_eclip method)
from .tasks.detection import Box, Detector, drise, load_detector  # noqa: E402
from .present import viz  # noqa: E402
from .present.verbalize import Verbalization, verbalize  # noqa: E402
from .models import available_models, load_model  # noqa: E402
from . import datasets  # noqa: E402
from . import concepts  # noqa: E402
from .concepts import Concept  # noqa: E402
from .concepts.counterfactual import counterfactual  # noqa: E402
from .datasets import load_run, run  # noqa: E402

__all__ = ["load_model", "explain", "evaluate", "verbalize", "Verbalization", "Subject", "Explanation", "Target",
           "Class", "Contrast", "Group", "TopK", "Region", "Pixel", "OutputRegion", "SaliencyError", "methods", "metrics", "data", "viz",
           "available_models", "load_image", "Similarity", "Text", "CLIPSubject", "load_clip", "Box", "Detector",
           "drise", "load_detector", "datasets", "run", "load_run", "concepts", "Concept", "counterfactual", "__version__"]
