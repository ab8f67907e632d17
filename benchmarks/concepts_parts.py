"""Ground truth for concept extraction on the parts dataset, for CRAFT and ACE banks of the shipped
parts CNN at a few layers, each against a random non-negative bank of the same size, on held-out
images:

1. best-match IoU of concept maps with the five part types (each map cut at the part's own area,
   `concepts.bank.best_match_iou`), on complete birds;
2. the concept metrics of `concepts.metrics.score_bank` on birds with parts left out (each
   part type missing with probability ~0.4, so existence can be judged): location (the concept
   map peaks in its part), coverage (share of the parts some concept is matched to), existence
   (CEM: the 3 most important concepts of an image are there), existence AUROC, and global
   importance (CGIM: Spearman of the concepts' importance per part with the true drop of the
   class score when the part is removed, measured by re-rendering). Importance = the drop when
   the concept is removed from the layer (`concepts.removal_effect`).

    python benchmarks/concepts_parts.py [--concepts 8] [--fit 60] [--test 40]
"""
import argparse
import time

import numpy as np
import torch

import saliencykit as sk
from saliencykit.benchmarks.parts import dataset as parts
from saliencykit.concepts.bank import best_match_iou, concept_maps
from saliencykit.concepts.metrics import random_bank, removal_effect, score_bank
from saliencykit.datasets.runner import load_subject

LAYERS = (("features.6", 0.3), ("features.10", 0.3), ("features.14", 0.5))


def part_effects(subject, scenes, x, cls):
    """[n, 5] drop of each image's class score when each part type is removed (re-rendered)."""
    n = len(scenes)
    with torch.no_grad():
        clean = subject.forward(x)[torch.arange(n), cls]
        out = np.zeros((n, len(parts.PART_TYPES)))
        for j, p in enumerate(parts.PART_TYPES):
            xr = parts.to_tensor(parts.render_many(scenes, (p,)).images)
            out[:, j] = (clean - subject.forward(xr)[torch.arange(n), cls]).numpy()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--concepts", type=int, default=8)
    ap.add_argument("--fit", type=int, default=60)
    ap.add_argument("--test", type=int, default=40)
    args = ap.parse_args(argv)
    t0 = time.time()
    subject = load_subject("parts_cnn")
    fit = parts.to_tensor(parts.generate(args.fit, seed=5).images)
    whole = parts.generate(args.test, seed=11)
    whole_masks = whole.part_masks()
    x_whole = parts.to_tensor(whole.images)
    scenes = parts.make_scenes(args.test, seed=9, omit_prob=0.6)
    gapped = parts.render_many(scenes)
    x_gap = parts.to_tensor(gapped.images)
    with torch.no_grad():
        cls = subject.forward(x_gap).argmax(1)
    effect = part_effects(subject, scenes, x_gap, cls)
    rows = []
    for layer, crop in LAYERS:
        bank = sk.concepts.extract(subject, fit, layer=layer, n_concepts=args.concepts, seed=0, crop=crop,
                                   crops_per_image=16)
        ace = sk.concepts.extract(subject, fit, layer=layer, method="ace", n_concepts=args.concepts, seed=0,
                                  tcav_runs=0)
        for name, b in (("CRAFT", bank), ("ACE", ace), ("random", random_bank(bank, seed=0))):
            ious = best_match_iou(concept_maps(subject, b, x_whole).maps, whole_masks)
            imp = removal_effect(subject, b, x_gap, target=cls.tolist()).drop.clamp(min=0)
            sc = score_bank(subject, b, x_gap, gapped.part_masks(), importance=imp, part_effect=effect, top=3)
            rows.append((layer, name, np.mean([v[0] for v in ious.values()]), sc, b.reconstruction_error))
    print(f"parts CNN, {args.concepts} concepts fitted on {args.fit} images; IoU on {args.test} whole birds, "
          f"the metrics on {args.test} birds with parts left out ({time.time() - t0:.0f} s)\n")
    print("| layer | bank | best-match IoU | location | coverage | existence (CEM) | existence AUROC | "
          "global importance (CGIM) | NMF (ACE: k-means) error |\n|---|---|" + "---|" * 7)
    for layer, name, iou, sc, err in rows:
        d = sc.to_dict()
        cells = [f"{iou:.3f}"] + [("–" if d[k] is None else f"{d[k]:.3f}") for k in
                                  ("location_mean", "coverage", "existence", "existence_auc_mean", "global_importance")]
        print(f"| {layer} | {name} | " + " | ".join(cells) + f" | {f'{err:.3f}' if name != 'random' else ''} |")


if __name__ == "__main__":
    main()
