"""Command line: `saliencykit explain | methods | models | demo | evaluate | report | run |
summarize | serve | benchmark | train-parts`. One module per command (or pair of commands); each defines
`register(subparsers)`, and may define `demo_step(out_dir, summary, args)` to add to what
`saliencykit demo` writes. `common` holds what they share."""
from __future__ import annotations

import argparse
import sys

from ..errors import SaliencyError
from .common import add_model_args, command_modules, photo_source, target_from_args  # noqa: F401
from .explain import DEMO_METHODS, run_explain  # noqa: F401

def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = argparse.ArgumentParser(prog="saliencykit", description="Explain PyTorch vision models with saliency maps.")
    parser.add_argument("--version", action="version", version=f"saliencykit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in command_modules():
        mod.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except SaliencyError as err:
        print(f"saliencykit: error: {err}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
