"""saliencykit: explain PyTorch vision models with saliency maps, measure how faithful the maps
are, and say in plain words what they show."""
__version__ = "0.1.0"

from . import data, engine, inference, methods, metrics, viz  # noqa: E402
from .errors import SaliencyError  # noqa: E402
from .explanation import Explanation  # noqa: E402
from .methods import explain  # noqa: E402
from .metrics import evaluate  # noqa: E402
from .model import Subject, load_image  # noqa: E402
from .targets import Class, Contrast, Group, Target, TopK  # noqa: E402
from .verbalize import Verbalization, verbalize  # noqa: E402
from .similarity import Similarity  # noqa: E402
from .clip import CLIPSubject, Text, load_clip  # noqa: E402
from .detection import Box, Detector, drise, load_detector  # noqa: E402
from .zoo import available_models, load_model  # noqa: E402

__all__ = ["load_model", "explain", "evaluate", "verbalize", "Verbalization", "Subject", "Explanation", "Target",
           "Class", "Contrast", "Group", "TopK", "SaliencyError", "methods", "metrics", "data", "viz",
           "available_models", "load_image", "Similarity", "Text", "CLIPSubject", "load_clip", "Box", "Detector",
           "drise", "load_detector", "__version__"]
