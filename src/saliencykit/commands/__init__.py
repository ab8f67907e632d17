"""CLI sub-commands beyond the core ones. Each module may define `register(subparsers)` to add a
command and `demo_step(out_dir, summary, args)` to add to what `saliencykit demo` writes."""
