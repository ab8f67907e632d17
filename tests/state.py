"""Comparing `Subject.state_fingerprint()` snapshots in the tests that check a model is left as found."""
import torch


def assert_same_state(a: dict, b: dict) -> None:
    """Every entry equal: tensors exactly, lists element by element, the rest by `==`."""
    assert a.keys() == b.keys()
    for key in a:
        va, vb = a[key], b[key]
        if isinstance(va, list):
            assert len(va) == len(vb), key
            for u, w in zip(va, vb):
                assert (torch.equal(u, w) if isinstance(u, torch.Tensor) else u == w), key
        else:
            assert va == vb, key
