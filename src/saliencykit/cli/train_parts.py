"""`saliencykit train-parts --arch cnn|vit --out weights.pt --seed N`: train a parts-dataset model.

Seeded: the same seed and thread count (`--threads`, default 1) reproduce the weights bit for bit
on the same machine. Prints the held-out accuracy on freshly generated test images.
"""
from __future__ import annotations

from .common import training_out


def cmd_train_parts(args):
    import numpy as np
    import torch

    from ..benchmarks.parts import models as parts_models
    from ..benchmarks.parts import dataset as parts

    out = training_out(args, "parts_cnn.pt")
    model, info = parts_models.train(args.arch, seed=args.seed, threads=args.threads, n_train=args.n_train,
                                     epochs=args.epochs, log=None if args.quiet else print)
    test = parts.generate(args.test_n, seed=999)
    with torch.inference_mode():
        pred = model(parts.to_tensor(test.images)).argmax(1).numpy()
    info["heldout_accuracy"] = float(np.mean(pred == test.labels))
    info["heldout_n"] = args.test_n
    parts_models.save(model, info, out)
    print(f"{args.arch}: held-out accuracy {info['heldout_accuracy']:.3f} on {args.test_n} images; "
          f"trained in {info['seconds']:.0f}s; wrote {out}")


def register(subparsers):
    p = subparsers.add_parser("train-parts", help="train the small CNN or ViT of the parts benchmark")
    p.add_argument("--arch", choices=["cnn", "vit"], default="cnn")
    p.add_argument("--out", required=True, help="output weights file (.pt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the result depends on it; default 1)")
    p.add_argument("--n-train", type=int, default=None, help="training images (default: the recipe's)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the recipe's)")
    p.add_argument("--test-n", type=int, default=300, help="held-out images for the accuracy printed")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train_parts)
