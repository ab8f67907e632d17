"""Command line: `saliencykit explain | methods | models | demo | evaluate | report | run |
summarize | serve | benchmark | train-parts | train-small`. One module per command (or pair of commands); each defines
`register(subparsers)`, and may define `demo_step(out_dir, summary, args)` to add to what
`saliencykit demo` writes. `common` holds what they share."""
from __future__ import annotations

import argparse
import sys

from ..errors import SaliencyError
from .common import add_model_args, add_threads_arg, apply_threads, command_modules, photo_source, target_from_args  # noqa: F401
from .explain import DEMO_METHODS, run_explain  # noqa: F401

class _Parser(argparse.ArgumentParser):
    """Usage mistakes end like every other failure: one `saliencykit: error: ...` line, code 2."""

    def error(self, message):
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        see = f"saliencykit {command} --help" if command else "saliencykit --help"
        self.exit(2, f"saliencykit: error: {message} (see {see})\n")


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = _Parser(prog="saliencykit", description="Explain PyTorch vision models with saliency maps.")
    parser.add_argument("--version", action="version", version=f"saliencykit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in command_modules():
        mod.register(sub)
    for p in sub.choices.values():  # every command takes --threads (train-parts has its own default)
        if not any("--threads" in a.option_strings for a in p._actions):
            add_threads_arg(p)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"saliencykit: error: {message}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    """Run one command. Every failure is one `saliencykit: error: ...` line on stderr and a non-zero
    code: 2 for a bad request (SaliencyError, a usage mistake), 130 for Ctrl-C, 1 for anything else
    (its type and first line; SALIENCYKIT_TRACEBACK=1 shows the traceback too)."""
    import os

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        apply_threads(args)
        code = args.func(args)
    except SaliencyError as err:
        return _fail(str(err), 2)
    except KeyboardInterrupt:
        return _fail("interrupted (Ctrl-C); nothing was written for the unfinished work", 130)
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001  the one place where every other failure becomes one line
        if os.environ.get("SALIENCYKIT_TRACEBACK", "").strip() not in ("", "0"):
            raise
        first = str(err).splitlines()[0] if str(err) else ""
        return _fail(f"{type(err).__name__}: {first} (SALIENCYKIT_TRACEBACK=1 shows where)", 1)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
