"""`saliencykit concepts SOURCE... --model M [--class C] --n-concepts K --out DIR`: a concept bank
of one class, its atlas, its summaries and sentences, as an HTML page and files in DIR."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import SaliencyError


OWN_FILES = ("bank", "atlas.png", "summaries.png", "concepts.json", "index.html")


def register(subparsers):
    from .common import add_threads_arg

    p = subparsers.add_parser("concepts", help="what the model sees in a class: a concept bank, its atlas and words")
    p.add_argument("sources", nargs="+", help="image files, bundled photo names, or sources: a folder, a .csv/.jsonl "
                                              "list, parts:N, hf:DIR, bundled")
    p.add_argument("--model", default="efficientnet_lite0", help="model name (see `saliencykit models`)")
    p.add_argument("--class", dest="cls", help="class label or index (default: the class most images are predicted as)")
    p.add_argument("--n-concepts", type=int, default=8, help="concepts in the bank (default 8)")
    p.add_argument("--layer", default="auto", help="layer to find concepts at (default: the CAM layer)")
    p.add_argument("--method", default="craft", help="concept extractor (default craft)")
    p.add_argument("--summaries", type=int, default=4, help="class summaries to cluster (0: none; default 4)")
    p.add_argument("--importance-images", type=int, default=16,
                   help="images whose concept removals give the importance (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", required=True, help="output directory (made; must be empty or new)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_threads_arg(p)
    p.set_defaults(func=cmd_concepts)


def _known_regions(specs, n_read: int, chosen):
    """{region: [n,H,W] bool} for the chosen images when the one source given knows its images'
    regions (`parts:N`), else None."""
    import numpy as np

    from ..datasets.sources import open_source

    if len(specs) != 1:
        return None
    try:
        src = open_source(specs[0])
    except SaliencyError:
        return None
    if not hasattr(src, "region_masks"):
        return None
    items = src.items()
    if len(items) != n_read:
        return None
    per = [src.region_masks(items[int(i)]) for i in chosen]
    return {name: np.stack([p[name] for p in per]) for name in per[0]}


def _say(args, text):
    if not args.quiet:
        print(text, file=sys.stderr)


def cmd_concepts(args):
    import torch

    from ..version import __version__
    from ..concepts import extract, removal_effect, summarize_class
    from ..concepts.bank import concept_maps
    from ..datasets.runner import load_subject
    from ..files import atomic_dir, check_writable_dir
    from ..present.atlas import concept_atlas, summary_figure, verbalize_concepts
    from ..present.report import render_concepts_page, write
    from ..present.viz import save_png
    from .common import _label, photo_sources

    if args.n_concepts < 1:
        raise SaliencyError(f"--n-concepts must be at least 1, got {args.n_concepts}")
    if args.importance_images < 1:
        raise SaliencyError(f"--importance-images must be at least 1, got {args.importance_images}")
    out = Path(args.out)
    check_writable_dir(out, "the concepts output")
    if out.is_dir() and any(p.name not in OWN_FILES for p in out.iterdir()):
        raise SaliencyError(f"--out {out} holds other files: give a new or empty folder (or one an earlier "
                            "`saliencykit concepts` wrote, which is replaced)")
    sources = photo_sources(args.sources, args.quiet)
    subject = load_subject(args.model)
    t0 = time.time()
    x_all = subject.preprocess([src for src, _ in sources])
    names = [stem for _, stem in sources]
    with torch.no_grad(), subject.explaining():
        pred = torch.cat([subject.forward(x_all[s:s + args.batch_size]).argmax(1)
                          for s in range(0, x_all.shape[0], args.batch_size)]).cpu()
    n_classes = len(subject.labels) if subject.labels else int(pred.max()) + 1
    if args.cls is None:
        c = int(torch.bincount(pred).argmax())
    else:
        c = subject.class_index(_label(args.cls), n_classes)
    chosen = torch.nonzero(pred == c).flatten()
    class_name = subject.labels[c] if subject.labels else f"class {c}"
    if len(chosen) == 0:
        counts = torch.bincount(pred, minlength=n_classes)
        common = ", ".join(f"{subject.labels[i] if subject.labels else i} ({int(counts[i])})"
                           for i in torch.argsort(counts, descending=True)[:3].tolist())
        raise SaliencyError(f"none of the {len(pred)} images is predicted as {class_name}; the most predicted "
                            f"classes are {common}: give images of the class or another --class")
    x = x_all[chosen]
    _say(args, f"{len(chosen)} of {len(pred)} images are predicted as {class_name}; extracting "
               f"{args.n_concepts} concepts ({args.method})")
    bank = extract(subject, x, layer=args.layer, method=args.method, n_concepts=args.n_concepts, seed=args.seed,
                   batch_size=args.batch_size)
    m = min(args.importance_images, x.shape[0])
    _say(args, f"{bank}; measuring each concept's removal on {m} images")
    rem = removal_effect(subject, bank, x[:m], target=c, batch_size=args.batch_size)
    drop = rem.drop.mean(0)
    importance = drop.clamp(min=0)
    cm = concept_maps(subject, bank, x, args.batch_size)       # once: the atlas, the scores and the words read it
    coef = cm.coefficients[:m].mean(0)
    notes = list(bank.extras.get("warnings", []))
    regions = _known_regions(args.sources, len(sources), chosen)
    parts = scores = None
    if regions is not None:
        from ..concepts import score_bank

        scores = score_bank(subject, bank, x, regions, batch_size=args.batch_size, maps=cm)
        parts = scores.part
        notes.append("concepts are named by the region of the source's ground truth their maps sit on most "
                     f"(lift >= 2): {', '.join(f'{j}: {p}' for j, p in enumerate(parts) if p)}")
    atlas = concept_atlas(subject, bank, x, importance=importance, removal=drop, parts=parts, maps=cm)
    summaries = summ = None
    n_sum = min(args.summaries, x.shape[0])
    if n_sum >= 2:
        _say(args, f"clustering the Grad-CAM regions of {x.shape[0]} images into {n_sum} summaries")
        summ = summarize_class(subject, x, target=c, n_summaries=n_sum, seed=args.seed, batch_size=args.batch_size)
        summaries = summary_figure(summ, subject)
    elif args.summaries:
        notes.append(f"no class summaries: {x.shape[0]} image(s) of the class, at least 2 are needed")
    words = []
    for i in range(min(3, m)):
        v = verbalize_concepts(subject, bank, x[:m], i, removal=rem, class_name=class_name, parts=parts, maps=cm)
        words.append({"name": names[int(chosen[i])], "text": v.text, "facts": v.facts})
    concepts = [{"concept": j, "importance": float(importance[j]), "removal": float(-drop[j]),
                 "coefficient": float(coef[j]), "part": parts[j] if parts else None} for j in torch.argsort(importance, descending=True, stable=True).tolist()]
    meta = {"title": f"What {args.model} sees in {class_name}", "model": args.model, "class_name": class_name,
            "class": c, "images": int(x.shape[0]), "read": int(x_all.shape[0]), "method": bank.method,
            "n_concepts": bank.n_concepts, "layer": bank.layer, "seed": bank.seed, "importance_images": m,
            "removal_passes": bank.n_concepts + 1, "reconstruction_error": bank.reconstruction_error,
            "crops": bank.extras.get("crops"), "summary_method": "Grad-CAM", "keep": summ.keep if summ else 0.2,
            "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "version": __version__,
            "seconds": round(time.time() - t0, 2)}
    html = render_concepts_page(meta, concepts, words, atlas, summaries, notes)
    record = {"meta": meta, "concepts": concepts, "words": words, "bank": bank.metadata(),
              "ground_truth": scores.to_dict() if scores else None,
              "summaries": summ.to_dict() if summ else None,
              "images": [names[int(i)] for i in chosen]}

    def fill(tmp):
        bank.save(tmp / "bank")
        save_png(atlas, tmp / "atlas.png")
        if summaries is not None:
            save_png(summaries, tmp / "summaries.png")
        (tmp / "concepts.json").write_text(json.dumps(record, indent=2, default=float))
        write(tmp / "index.html", html)

    atomic_dir(out, fill, OWN_FILES, "a concepts page")     # the folder whole or not at all
    _say(args, f"wrote {out / 'index.html'} (atlas.png, concepts.json, bank/) in {time.time() - t0:.1f} s")


__all__ = ["register", "cmd_concepts"]
