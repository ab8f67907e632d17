"""Moved to `saliencykit.tasks.clip`; this path works for this release, with a DeprecationWarning."""
from ._moved import alias

alias(__name__, "saliencykit.tasks.clip")
