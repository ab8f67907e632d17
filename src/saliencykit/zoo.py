"""Moved to `saliencykit.models`; this path works for this release, with a DeprecationWarning."""
from ._moved import alias

alias(__name__, "saliencykit.models")
