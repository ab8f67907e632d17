"""What calls from several threads share on one model, and how they keep out of each other's way:
a forward hook acts only on the forwards of the thread that put it there (`this_thread_only`), a
setting changed for a call is shared and restored by the last call to leave (`shared_setting`),
and a method that changes the weights for a moment has the model to itself (`model_lock`)."""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Callable


def this_thread_only(hook: Callable) -> Callable:
    """`hook` made to act only on forwards run by the thread that made it (else it does nothing).

    Hooks go on the shared model, so while one thread's call has them, another thread's call on
    the same model would run them too: its activations would land in this call's capture, or its
    output be rewritten by this call's rule. Every hook a call puts on a model is wrapped in this.
    A model that runs its own forward in other threads (`nn.DataParallel` over several GPUs) is
    not reached by such hooks: a layer capture then says the layer was not called.
    """
    import torch

    owner = threading.get_ident()

    # run as plain Python even inside a torch.compile'd model (the compiler cannot trace the thread
    # check, and a hook traced into a compiled graph would act in every thread)
    @torch.compiler.disable
    def hook_of_owner(*args, **kwargs):
        if threading.get_ident() != owner:
            return None
        return hook(*args, **kwargs)

    return hook_of_owner


def forward_at(model, layer: str, x, replace: Callable | None = None):
    """Run `model(x)` and return `(output, what layer `layer` gave)`; with `replace(out) -> new`,
    the layer's output is replaced by `new` for the rest of the forward. The hook acts only on this
    thread's forward and is removed in `finally`."""
    module = dict(model.named_modules())[layer]
    seen = []

    def hook(_module, _inputs, out):
        seen.append(out)
        return None if replace is None else replace(out)

    handle = module.register_forward_hook(this_thread_only(hook))
    try:
        out = model(x)
    finally:
        handle.remove()
    if not seen:
        from .errors import SaliencyError

        raise SaliencyError(f"layer {layer!r} was not called by this forward")
    return out, seen[-1]


def forward_replacing(model, layer: str, x, new):
    """`model(x)` with the output of `layer` replaced by the tensor `new` at the one call of the
    layer whose output has `new`'s shape (a module called more than once per forward, like
    EfficientNet's shared `_swish`, is replaced only where its output is the map `new` stands for);
    refused when not exactly one call has that shape. Returns the model's output."""
    want = tuple(new.shape[1:])
    calls = []

    def replace(out):
        calls.append(tuple(out.shape[1:]) if hasattr(out, "shape") else type(out).__name__)
        return new.to(out.dtype) if calls[-1] == want else None

    out, _ = forward_at(model, layer, x, replace)
    if sum(c == want for c in calls) != 1:
        from .errors import SaliencyError

        raise SaliencyError(f"layer {layer!r} gave {calls} in one forward; the replacing map is {want}, which "
                            "must be the output of exactly one call: pick a layer the model calls once")
    return out


_MISSING = object()
_SETTINGS_LOCK = threading.Lock()
# (id(obj), attribute) -> [obj, calls holding it, what the first call found, whether that was the
# instance's own attribute]: overlapping calls share one setting, the last to leave restores it
_SETTINGS: dict = {}


class GradientMask:
    """While active, a forward hook on `layer` of `model` (this thread's forwards only) that keeps
    the layer's output value but multiplies the gradient flowing back through it by
    `mask_fn(output)` (none without a mask_fn), and keeps the output tensor (`out`, so the gradient
    arriving at the layer can be asked for) and the mask (`mask`). CRP's conditioning."""

    def __init__(self, model, layer: str, mask_fn: Callable | None = None):
        import torch

        self._torch = torch
        self.module = dict(model.named_modules())[layer]
        self.layer, self.mask_fn = layer, mask_fn
        self.out = self.mask = None
        self.handle = None

    def hook(self, _module, _inputs, out):
        torch = self._torch
        if not isinstance(out, torch.Tensor):
            from .errors import SaliencyError

            raise SaliencyError(f"layer {self.layer!r} does not output a tensor; condition on another layer")
        self.mask = torch.ones((), dtype=out.dtype, device=out.device)
        if self.mask_fn is not None:
            self.mask = self.mask_fn(out.detach()).to(out)
            out = out.detach() + (out - out.detach()) * self.mask     # the same value; the gradient times the mask
        self.out = out
        return out

    def __enter__(self):
        self.handle = self.module.register_forward_hook(this_thread_only(self.hook))
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def shared_setting(obj, attr: str, value) -> Callable[[], None]:
    """Set `obj.attr = value` for the duration of a call; returns the undo.

    Calls that overlap (several threads explaining with one model) and set the same attribute
    share the setting: the first sets it (later ones keep the first's value, so every caller must
    ask for the same one), the last to undo restores what the first found, so no call is left
    running under a setting another one has already undone.
    """
    key = (id(obj), attr)
    with _SETTINGS_LOCK:
        entry = _SETTINGS.get(key)
        if entry is None:
            own = attr in getattr(obj, "__dict__", {})
            entry = _SETTINGS[key] = [obj, 0, getattr(obj, attr, _MISSING), own]
            setattr(obj, attr, value)
        entry[1] += 1
    done = []

    def undo():
        if done:
            return
        done.append(True)
        with _SETTINGS_LOCK:
            entry[1] -= 1
            if entry[1]:
                return
            del _SETTINGS[key]
            _obj, _n, found, own = entry
            if not own and attr in getattr(obj, "__dict__", {}):
                del obj.__dict__[attr]  # the class's attribute shows again
            elif found is not _MISSING:
                setattr(obj, attr, found)

    return undo


class ModelLock:
    """Shared or exclusive use of one model by the calls of several threads.

    Explaining takes it shared: calls that only read the weights run side by side. A method that
    changes the weights for a moment (LRP merging batch norm into the convolutions, NormGrad's
    step) takes it exclusive, so no other call runs a forward on the changed weights. A thread
    that holds it already passes through (nested calls: a metric re-explaining); one holding it
    shared that asks for it exclusive waits until it is the only user.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._held: dict[int, list] = {}   # thread id -> [depth, exclusive]
        self._writer: int | None = None
        self._writers_waiting = 0
        self._upgrading: int | None = None

    def acquire(self, exclusive: bool) -> None:
        me = threading.get_ident()
        with self._cond:
            held = self._held.get(me)
            if held is not None:
                held[0] += 1
                if exclusive and not held[1]:
                    self._upgrade(me, held)
                return
            if exclusive:
                self._writers_waiting += 1
                try:
                    self._cond.wait_for(lambda: self._writer is None and not self._held)
                finally:
                    self._writers_waiting -= 1
                self._writer = me
            else:
                self._cond.wait_for(lambda: self._writer is None and not self._writers_waiting)
            self._held[me] = [1, exclusive]

    def _upgrade(self, me, held) -> None:
        from .errors import SaliencyError

        if self._upgrading is not None:
            held[0] -= 1
            raise SaliencyError("two threads asked at once to change the weights of one model they were both "
                                "explaining; run methods that change the model (LRP, NormGrad) through explain()")
        self._upgrading = me
        try:
            self._cond.wait_for(lambda: set(self._held) == {me})
        finally:
            self._upgrading = None
        self._writer = me
        held[1] = True

    def release(self) -> None:
        me = threading.get_ident()
        with self._cond:
            held = self._held[me]
            held[0] -= 1
            if held[0] == 0:
                del self._held[me]
                if self._writer == me:
                    self._writer = None
                self._cond.notify_all()

    @contextlib.contextmanager
    def __call__(self, exclusive: bool = False):
        self.acquire(exclusive)
        try:
            yield
        finally:
            self.release()


_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def model_lock(model) -> ModelLock:
    """The one `ModelLock` of `model` (made on first use)."""
    with _LOCKS_LOCK:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = ModelLock()
        return lock
