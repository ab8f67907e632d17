"""Moved to `saliencykit.tasks.detection`; this path works for this release, with a DeprecationWarning."""
from ._moved import alias

alias(__name__, "saliencykit.tasks.detection")
