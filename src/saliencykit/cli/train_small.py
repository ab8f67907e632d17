"""`saliencykit train-small NAME --out weights.pt --seed N`: retrain a small shipped model.

NAME is one of `series_cnn` (1-D CNN on the planted-motif series), `denoiser` (RGB denoiser on the
bundled photos), `volume_seg` (3-D U-Net on procedural volumes). Seeded: the same seed and thread
count (`--threads`, default 1) reproduce the shipped weights bit for bit on the same machine.
Prints the held-out score (accuracy, PSNR gain or Dice) and the training time.
"""
from __future__ import annotations

import importlib
from .common import training_out

#: model name -> the module with its `train(seed, threads, n_train, epochs, log)` and `evaluate(model)`
TRAINERS = {"series_cnn": "saliencykit.benchmarks.series.models",
            "denoiser": "saliencykit.benchmarks.denoise",
            "volume_seg": "saliencykit.benchmarks.volumes.models"}


def cmd_train_small(args):
    from ..models import small

    out = training_out(args, f"{args.name}.pt")
    trainer = importlib.import_module(TRAINERS[args.name])
    model, info = trainer.train(seed=args.seed, threads=args.threads, n_train=args.n_train, epochs=args.epochs,
                                log=None if args.quiet else print)
    info.update(trainer.evaluate(model))
    small.save(model, info, out)
    held = ", ".join(f"{k} {v:.4g}" for k, v in info.items() if k.startswith("heldout") and isinstance(v, float))
    print(f"{args.name}: {held}; trained in {info['seconds']:.0f}s; wrote {out}")


def register(subparsers):
    p = subparsers.add_parser("train-small", help="retrain a small shipped model (series_cnn, denoiser, volume_seg)")
    p.add_argument("name", choices=sorted(TRAINERS))
    p.add_argument("--out", required=True, help="output weights file (.pt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the result depends on it; default 1)")
    p.add_argument("--n-train", type=int, default=None, help="training examples (default: the recipe's)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the recipe's)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train_small)
