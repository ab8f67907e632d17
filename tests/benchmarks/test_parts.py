"""The procedural parts benchmark: generator, shipped models, FunnyBirds protocol, CLI.

The models are the shipped weights (no training here); the protocol runs on small test sets."""
import time

import numpy as np
import pytest
import torch

from saliencykit.benchmarks.parts import leaderboard as B
from saliencykit.benchmarks.parts import dataset as P
from saliencykit.errors import SaliencyError
from saliencykit.benchmarks.parts.models import load_parts_model


# ------------------------------------------------------------------------------ generator
def test_same_seed_same_images_other_seed_other_images():
    a = P.generate(6, seed=3)
    b = P.generate(6, seed=3)
    c = P.generate(6, seed=4)
    # exact equality: rendering is a pure function of the seed
    assert np.array_equal(a.images, b.images) and np.array_equal(a.part_maps, b.part_maps)
    assert np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)


def test_rerender_without_removal_is_bit_exact():
    batch = P.generate(4, seed=11, size=96)
    for i, sc in enumerate(batch.scenes):
        img, pm = P.render(sc)
        assert np.array_equal(img, batch.images[i]) and np.array_equal(pm, batch.part_maps[i])


def test_removing_a_part_changes_only_that_parts_pixels():
    batch = P.generate(8, seed=5)
    for i, sc in enumerate(batch.scenes):
        for part in P.PART_TYPES:
            region = np.isin(batch.part_maps[i], P.PART_IDS[part])
            img, pm = P.render(sc, removed=(part,))
            changed = (img != batch.images[i]).any(-1)
            # nothing outside the part's own pixels may change, in the image or the part map
            assert not (changed & ~region).any(), (i, part)
            assert np.array_equal(pm[~region], batch.part_maps[i][~region])
            assert not np.isin(pm, P.PART_IDS[part]).any()
            # and the part's pixels do change (a distractor of the same colour beneath may hide a
            # few pixels, hence 90 % rather than all)
            if region.sum() > 0:
                assert changed[region].mean() > 0.9, (i, part, changed[region].mean())


def test_masks_match_what_is_drawn():
    batch = P.generate(12, seed=8)
    table = P.class_table()
    for i in range(len(batch)):
        img, pm = batch.images[i], batch.part_maps[i]
        variants = dict(zip(P.PART_TYPES, table[batch.labels[i]]))
        for part in P.PART_TYPES:
            colour = P.PART_COLOURS[part][variants[part] % 2]
            m = np.isin(pm, P.PART_IDS[part])
            # every pixel labelled as the part has the part's colour; the label covers all such
            # pixels of the bird (no unlabelled part pixel on the body)
            assert (img[m] == colour).all(), (i, part)
        assert (img[pm == P.BODY_ID] == P.BODY_COLOUR).all()
        canvas = img[pm == 0]
        assert (canvas == canvas[0]).all()                       # one flat canvas colour
        bg = img[pm >= P.BG_BASE]
        assert all(tuple(c) in P.BG_COLOURS for c in np.unique(bg.reshape(-1, 3), axis=0))
    # every part type is visible in most images (anchors keep parts inside the canvas)
    visible = np.stack([batch.part_masks()[p].any((1, 2)) for p in P.PART_TYPES])
    assert visible.mean() > 0.95


def test_class_table_and_minimal_sufficient_sets():
    table = P.class_table(10)
    assert len({tuple(r) for r in table}) == 10
    diffs = (table[:, None] != table[None]).sum(-1) + 2 * np.eye(10, dtype=int)
    assert diffs.min() >= 2
    for c in range(10):
        sets = B.minimal_sufficient_sets(table, c)
        assert sets
        for s in sets:
            # sufficient: no other class has the same variants on s ...
            same = (np.delete(table, c, 0)[:, list(s)] == table[c, list(s)]).all(1)
            assert not same.any()
            # ... and minimal: dropping any part makes it insufficient
            for j in s:
                rest = [k for k in s if k != j]
                if rest:
                    assert (np.delete(table, c, 0)[:, rest] == table[c, rest]).all(1).any()


def test_generator_is_vectorised_fast():
    # the budget is >= 500 images/s at 128x128 on an idle 2-core machine; the assertion leaves
    # a 10x margin for a loaded test machine while still catching per-pixel Python drawing
    P.generate(5, seed=0, size=128)
    t = time.perf_counter()
    P.generate(100, seed=1, size=128)
    assert 100 / (time.perf_counter() - t) > 50


def test_bad_generator_input():
    with pytest.raises(SaliencyError, match="unknown part"):
        P.render(P.make_scenes(1)[0], removed=("tentacle",))
    with pytest.raises(SaliencyError, match="n must be"):
        P.generate(0)
    with pytest.raises(SaliencyError, match="class_id"):
        P.render(P.Scene(class_id=99, seed=0))


# ------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def cnn():
    return load_parts_model("cnn")


@pytest.fixture(scope="module")
def vit():
    return load_parts_model("vit")


@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_shipped_models_reach_95_percent(arch, request):
    subject = request.getfixturevalue(arch)
    test = P.generate(300, seed=4242)                            # unseen seed: a fresh held-out set
    with torch.inference_mode():
        pred = subject.forward(P.to_tensor(test.images)).argmax(1).numpy()
    assert (pred == test.labels).mean() >= 0.95


@pytest.fixture(scope="module")
def bench(cnn):
    return B.PartsBench(cnn, n=30, seed=31)


def test_relevant_parts_matter_far_more_than_clutter(bench):
    # a part whose variant is unique to the class (a one-part sufficient set) vs a background
    # object: removing the first must cost the class logit much more (ground truth is real)
    rel, irr = [], []
    for i, c in enumerate(bench.labels):
        if not bench.correct[i]:
            continue
        singles = [s[0] for s in B.minimal_sufficient_sets(bench.table, int(c)) if len(s) == 1]
        rel += [bench.part_drop[i, j] for j in singles]
        irr += list(bench.bg_drop[i])
    assert len(rel) > 10 and len(irr) > 10
    assert np.mean(rel) > 5 * max(np.mean(np.abs(irr)), 1e-3)
    assert bench.background_independence() > 0.9


def test_protocol_model_free_facts(bench):
    # a map on the background only (kept clear of a 2-px halo around the parts): no
    # part is ever important -> CSDC = 0 and SD has no ranking (NaN images skipped); it marks the
    # distractors, so it is more distracted than the oracle, which marks only parts
    pm = bench.part_maps
    near_part = torch.nn.functional.max_pool2d(((pm >= 1) & (pm <= 8)).float()[:, None], 5, 1, 2)[:, 0] > 0
    bg = (pm >= P.BG_BASE) & ~near_part
    res = bench.score(lambda idx, cls: bg[np.asarray(idx)].float(), contrast=False)
    assert res["csdc"] == 0.0 and res["sd_images"] == 0
    assert res["d"] < bench.score(bench.oracle_maps, contrast=False)["d"]
    with pytest.raises(SaliencyError, match="shape"):
        bench.score(lambda idx, cls: torch.zeros(len(idx), 8, 8))


def test_random_near_chance_oracle_best(bench):
    rnd = bench.score(B.random_maps(bench, seed=0))
    orc = bench.score(bench.oracle_maps)
    edge = bench.score(B.edge_maps(bench))
    # random ranks parts at random: Spearman ~ 0 -> SD ~ 0.5; the pairwise class check is a coin
    # flip -> TS ~ 0.5 (few images, so a wide band)
    assert abs(rnd["correctness"] - 0.5) < 0.12
    assert abs(rnd["contrastivity"] - 0.5) < 0.3
    # the oracle's part importances are the true single-deletion effects (no dilation at 64 px),
    # so SD = 1 up to float rounding, and it tops every aggregate
    assert bench.dilation == 0 and orc["correctness"] > 0.999
    assert orc["mean"] > rnd["mean"] + 0.1 and orc["mean"] > edge["mean"]
    assert orc["contrastivity"] >= rnd["contrastivity"]


@pytest.mark.parametrize("method,params", [
    ("gradxinput", {}),
    ("integrated_gradients", {"steps": 8}),
    ("gradcam", {}),
    ("rise", {"n_masks": 300, "cell": 8, "output": "logit"}),   # scored mean-centred, see CENTERED
])
def test_methods_beat_random_on_the_cnn(bench, method, params):
    rnd = bench.score(B.random_maps(bench, seed=0))
    res = bench.score(B.method_maps(bench, method, seed=0, params=params))
    # mean of completeness, correctness, contrastivity: a real attribution beats noise
    assert res["mean"] > rnd["mean"] + 0.03, (res, rnd)
    assert res["correctness"] > rnd["correctness"]


# ------------------------------------------------------------------------------ CLI
def test_benchmark_command_writes_leaderboard(tmp_path, bench):
    import csv

    from saliencykit.cli.benchmark import run_benchmark

    rows = run_benchmark("cnn", ["gradxinput"], tmp_path, n=30, quiet=True, bench=bench)
    names = [r["method"] for r in rows]
    assert set(names) == {"random", "edge", "oracle", "gradxinput"}
    for f in ("leaderboard.csv", "leaderboard.md", "leaderboard.json", "examples.png"):
        assert (tmp_path / f).stat().st_size > 0
    with open(tmp_path / "leaderboard.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["method"] for r in table] == names
    means = [float(r["mean"]) for r in table]
    assert means == sorted(means, reverse=True)
    with pytest.raises(SaliencyError, match="unknown method"):
        run_benchmark("cnn", ["nosuchmethod"], tmp_path / "x", n=4, quiet=True)
    assert not (tmp_path / "x").exists()


def test_bad_model_input(tmp_path):
    with pytest.raises(SaliencyError, match="architecture"):
        load_parts_model("resnet")
    with pytest.raises(SaliencyError, match="no weights"):
        load_parts_model("cnn", tmp_path / "missing.pt")
