"""Comparing `Subject.state_fingerprint()` snapshots in the tests that check a model is left as found."""
import torch


def assert_same_state(a: dict, b: dict) -> None:
    """Every entry equal: the same keys, tensors exactly, lists element by element (a gradient
    present on one side and None on the other differs), the rest by `==`."""
    assert a.keys() == b.keys()
    for key in a:
        va, vb = a[key], b[key]
        if isinstance(va, list):
            assert len(va) == len(vb), key
            for u, w in zip(va, vb):
                if isinstance(u, torch.Tensor) and isinstance(w, torch.Tensor):
                    assert torch.equal(u, w), key
                else:  # None (no gradient), flags, names
                    assert type(u) is type(w) and u == w, key
        else:
            assert va == vb, key
