"""`saliencykit serve [--host 127.0.0.1] [--port 7860]`: the web app."""
from __future__ import annotations


def register(subparsers):
    p = subparsers.add_parser("serve", help="run the web app (pick or upload a photo, compare methods)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", action="append",
                   help="model the app offers (repeat for several; default efficientnet_lite0 and mobilenet_v2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args):
    from ..present.app import App, serve
    from ..errors import SaliencyError
    from ..models import available_models

    if not 0 <= args.port <= 65535:
        raise SaliencyError(f"--port must be in 0..65535, got {args.port}")
    if args.model:
        known = available_models()
        for m in args.model:
            if m not in known and ":" not in m:
                raise SaliencyError(f"unknown model {m!r} (see `saliencykit models`)")
    serve(host=args.host, port=args.port, app=App(models=args.model, seed=args.seed), quiet=args.quiet)
