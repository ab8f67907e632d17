"""Ground truth for concept extraction on the parts dataset: for each layer of the shipped parts
CNN, the best-match IoU of CRAFT concept maps with the five part types (each map cut at the
part's own area, `concepts.bank.best_match_iou`), against a random non-negative bank of the same
size, on held-out images:

    python benchmarks/concepts_parts.py [--concepts 8] [--fit 60] [--test 20]
"""
import argparse

import numpy as np
import torch

import saliencykit as sk
from saliencykit.benchmarks.parts import dataset as parts
from saliencykit.concepts.bank import ConceptBank, best_match_iou, concept_maps
from saliencykit.datasets.runner import load_subject


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--concepts", type=int, default=8)
    ap.add_argument("--fit", type=int, default=60)
    ap.add_argument("--test", type=int, default=20)
    args = ap.parse_args(argv)
    subject = load_subject("parts_cnn")
    batch = parts.generate(args.fit + args.test, seed=5)
    x = parts.to_tensor(batch.images)
    test = x[args.fit:]
    masks = {p: m[args.fit:] for p, m in batch.part_masks().items()}
    print("| layer | bank | " + " | ".join(parts.PART_TYPES) + " | mean | NMF error |\n|---|---|" + "---|" * 7)
    for layer in ("features.9", "features.14"):
        bank = sk.concepts.extract(subject, x[:args.fit], layer=layer, n_concepts=args.concepts, seed=0)
        rnd = ConceptBank(torch.rand(bank.basis.shape, generator=torch.Generator().manual_seed(0)), layer)
        for name, b, err in (("CRAFT", bank, f"{bank.reconstruction_error:.3f}"), ("random", rnd, "")):
            ious = best_match_iou(concept_maps(subject, b, test).maps, masks)
            cells = " | ".join(f"{ious[p][0]:.3f}" for p in parts.PART_TYPES)
            print(f"| {layer} | {name} | {cells} | {np.mean([v[0] for v in ious.values()]):.3f} | {err} |")


if __name__ == "__main__":
    main()
