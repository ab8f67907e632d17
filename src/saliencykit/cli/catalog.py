"""`saliencykit methods` and `saliencykit models`: what can be asked for by name."""
from __future__ import annotations

import json


def cmd_methods(args):
    from ..methods import available

    rows = available()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'method':24} {'family':13} {'cost/image':12} notes")
    for name, info in rows.items():
        notes = ", ".join(n for n, flag in (("signed", info["signed"]), ("seeded", info["randomized"]),
                                             ("layer", info["uses_layer"]), ("experimental", info["experimental"]))
                          if flag)
        print(f"{name:24} {info['family']:13} {info['cost']:12} {notes}")


def cmd_models(args):
    from ..models import available_models

    from ..datasets.runner import PARTS_MODELS

    for name, desc in available_models().items():
        print(f"{name:28} {desc}")
    for name, arch in PARTS_MODELS.items():
        print(f"{name:28} the parts-benchmark {arch.upper()} (64 px, shipped weights; with the parts:N source)")


def register(sub):
    p = sub.add_parser("methods", help="list every method with its family and cost")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("models", help="list the model names that load_model understands")
    p.set_defaults(func=cmd_models)
