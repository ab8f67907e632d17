"""The shared engine: chunks sized to a memory budget, results independent of the chunking."""
import torch

import saliencykit as sk
from saliencykit import engine


def test_auto_batch_follows_the_memory_budget(tiny, monkeypatch):
    total, largest = engine.row_cost_bytes(tiny, (1, 3, 32, 32))
    # tiny: conv1 8x32x32 + act1 + conv2 16x16x16 + act2 + pool + fc, float32
    assert largest == 8 * 32 * 32 * 4 and total >= 2 * largest
    monkeypatch.setenv("SALIENCYKIT_MEMORY_MB", str(5 * 2 * total / 2**20))
    assert engine.auto_batch(tiny, (1, 3, 32, 32), grad=True) == 5
    monkeypatch.setenv("SALIENCYKIT_MEMORY_MB", "100000")
    assert engine.auto_batch(tiny, (1, 3, 32, 32), grad=True) == engine.DEFAULT_BATCH  # capped


def test_cpu_chunks_stay_cache_sized(tiny, monkeypatch):
    # on a CPU a chunk's largest layer output is kept near CPU_CHUNK_BYTES (measured: Lite0 at 224 px
    # runs 1.6-1.9x slower per image in chunks of 32 than of 6-8); the memory budget still applies
    total, largest = engine.row_cost_bytes(tiny, (1, 3, 32, 32))
    monkeypatch.setenv("SALIENCYKIT_MEMORY_MB", "100000")
    monkeypatch.setattr(engine, "CPU_CHUNK_BYTES", 3 * largest)
    assert engine.auto_batch(tiny, (1, 3, 32, 32), grad=False) == 3
    monkeypatch.setenv("SALIENCYKIT_MEMORY_MB", str(2 * 2 * total / 2**20))
    assert engine.auto_batch(tiny, (1, 3, 32, 32), grad=True) == 2


def test_small_budget_gives_the_same_maps_in_more_chunks(tiny, monkeypatch):
    x = torch.randn(2, 3, 32, 32)
    ref = sk.explain(tiny, x, method=["integrated_gradients", "occlusion"], params={
        "integrated_gradients": {"steps": 8}, "occlusion": {"patch": 8, "stride": 8}})
    total, _ = engine.row_cost_bytes(tiny, (1, 3, 32, 32))
    monkeypatch.setenv("SALIENCYKIT_MEMORY_MB", str(3 * 2 * total / 2**20))  # 3 rows per chunk
    small = sk.explain(tiny, x, method=["integrated_gradients", "occlusion"], params={
        "integrated_gradients": {"steps": 8}, "occlusion": {"patch": 8, "stride": 8}})
    for name in ref:
        assert torch.allclose(ref[name].maps, small[name].maps, atol=1e-6), name
    # 16 interpolants in chunks of 3 -> 6 backward calls (vs 1)
    assert small["integrated_gradients"].passes["model_calls"] > ref["integrated_gradients"].passes["model_calls"]


def test_spans_are_the_fewest_even_chunks():
    # every row once, in order; no chunk above the cap; as few chunks as the cap allows; sizes
    # differ by at most one (8 rows at 6 per chunk: 4 + 4, not 6 + 2, whose 2-row call costs
    # nearly a full call on a CPU)
    assert engine.spans(8, 6) == [(0, 4), (4, 8)]
    assert engine.spans(5, 32) == [(0, 5)]
    assert engine.spans(0, 4) == []
    for n in range(0, 60):
        for most in (1, 2, 3, 6, 7, 32):
            sp = engine.spans(n, most)
            sizes = [b - a for a, b in sp]
            assert [r for a, b in sp for r in range(a, b)] == list(range(n)), (n, most)
            assert all(0 < k <= most for k in sizes), (n, most)
            assert len(sp) == -(-n // most), (n, most)
            assert not sizes or max(sizes) - min(sizes) <= 1, (n, most)


def test_progress_rate_leaves_out_the_warm_up_step():
    # a 1 s first step then 0.05 s steps: the rate shown is about 20/s (steps after the first
    # only), where counting the first step would give about 3/s; before a second step there is
    # no estimate at all. Tolerance: sleep overshoots a few ms per step on a loaded machine.
    import time

    from saliencykit.engine import Progress

    with Progress(6, "t") as bar:
        time.sleep(1.0)
        bar.step()
        assert bar.bar.format_dict["rate"] == 0  # tqdm shows "?" for 0
        for _ in range(5):
            time.sleep(0.05)
            bar.step()
        rate = bar.bar.format_dict["rate"]
        assert 10 < rate < 21, rate
        assert bar.bar.format_dict["elapsed"] >= 1.2  # the elapsed time stays the whole time
