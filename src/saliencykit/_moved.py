"""Old module paths, kept for this release: each one is a module that re-exports everything of
its new home and says once, with a DeprecationWarning, where that is."""
from __future__ import annotations

import importlib
import sys
import types
import warnings


class _MovedModule(types.ModuleType):
    """An old module whose name is also a function of the package (`saliencykit.verbalize`):
    importing the old path rebinds `saliencykit.verbalize` to the module, so it stays callable."""

    def __call__(self, *args, **kwargs):
        return self.__dict__["_moved_call"](*args, **kwargs)


def alias(old: str, new: str, call: str | None = None) -> None:
    warnings.warn(f"{old} has moved to {new}; import from {new} (or from saliencykit itself). "
                  f"The old path goes away in the next release.", DeprecationWarning, stacklevel=3)
    target = importlib.import_module(new)
    module = sys.modules[old]
    module.__dict__.update({k: v for k, v in vars(target).items()
                            if k not in ("__name__", "__file__", "__spec__", "__loader__", "__package__",
                                         "__path__", "__cached__", "__builtins__")})
    if call is not None:
        module.__dict__["_moved_call"] = getattr(target, call)
        module.__class__ = _MovedModule
