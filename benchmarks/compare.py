"""saliencykit beside Captum, pytorch-grad-cam, torchcam and Quantus: same process, model, images,
targets and settings; timings interleaved (A B A B ...) after a warm-up, median of the repeats.

For each model (bundled EfficientNet-Lite0, torchvision resnet50 with random weights; 224x224) and
batch size (1, 8) and every method an anchor also implements it writes: ms per image for
saliencykit and each anchor, our ratio to the fastest anchor, the pass-count floor (the passes our
method reports x the measured cost of one forward / forward+backward per image at the best batch
size) and our ratio to it, the peak extra resident memory of each call, and the Pearson
correlation of our map with each anchor's (per image, averaged) so a speed-up is never bought by
computing something else. Then: all gradient-CAM variants of one layer in one call against one
Grad-CAM; the metric rows against Quantus (from `benchmarks/metrics.py`); RSS over 1,000
consecutive `explain` calls; and the cost of single levers (channels_last, inference_mode).

    python benchmarks/compare.py [--repeats 5] [--device cuda] [--methods a,b] [--batches 1,8]
                                 [--skip sharing ...] [--out benchmarks/results.md]

`--methods`, `--models`, `--batches`, `--heavy-models` and `--skip` pick the rows (a row filter for
quick runs); `--device cuda` runs every library on the GPU (`benchmarks/gpu.sh`).
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from methods import AT_BATCH, best_pass_costs, rss_mb  # noqa: E402

import saliencykit as sk  # noqa: E402
from saliencykit.methods.perturbation import grid_segments  # noqa: E402

warnings.filterwarnings("ignore")

GRAD_CAMS = ["gradcam", "gradcam_pp", "xgradcam", "layercam", "hirescam"]


# ---------------------------------------------------------------- measuring
def _hwm_reset():
    """Reset the kernel's peak-RSS mark of this process (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _hwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(calls: dict, repeats: int, n_images: int, warmup: bool = True) -> dict:
    """calls: label -> fn() returning [B,H,W] maps. One warm-up each (unless `warmup` is False: rows
    of thousands of passes, run after lighter rows on the same model), then `repeats` rounds in
    which every label runs once, in rotating order (A B C, B C A, ...), so drift hits all alike."""
    out = {k: {"times": [], "cpu": [], "peak": 0.0, "maps": None} for k in calls}
    labels = list(calls)
    if warmup:
        for k in labels:
            out[k]["maps"] = calls[k]()
    for r in range(repeats):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        for k in order:
            gc.collect()
            base = rss_mb()
            ok = _hwm_reset()
            t, c = time.perf_counter(), time.process_time()
            maps = calls[k]()
            _sync()
            out[k]["cpu"].append(time.process_time() - c)
            if out[k]["maps"] is None:
                out[k]["maps"] = maps
            out[k]["times"].append(time.perf_counter() - t)
            if ok:
                out[k]["peak"] = max(out[k]["peak"], _hwm_mb() - base)
    for k in labels:
        out[k]["ms"] = 1000 * statistics.median(out[k]["times"]) / n_images
        out[k]["cpu_ms"] = 1000 * statistics.median(out[k]["cpu"]) / n_images
    return out


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the Pearson correlation of two [B,H,W] maps (b resized to a)."""
    a = torch.as_tensor(a).detach().float().cpu()
    b = torch.as_tensor(b).detach().float().cpu()
    if b.dim() == 4:
        b = b[:, 0]
    if b.shape[-2:] != a.shape[-2:]:
        b = F.interpolate(b[:, None], size=a.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return float(r.mean())


def reduce(attr: torch.Tensor, mode: str) -> torch.Tensor:
    return sk.engine.reduce_channels(attr.detach().float(), mode)


# ---------------------------------------------------------------- anchors
def anchors_for(subject, x, y, layer_name, layer_module, method: str) -> dict:
    """label -> fn() returning the anchor's [B,H,W] map for `method`, or {} when none implements it."""
    model = subject.model
    targets = [int(c) for c in y]
    A = {}

    @contextmanager
    def explaining():
        with subject.explaining():
            yield

    # Captum ------------------------------------------------------------
    try:
        import captum.attr as ca
    except ImportError:
        ca = None
    if ca is not None:
        simple = {"saliency": (ca.Saliency, "max_abs", {"abs": False}),
                  "gradxinput": (ca.InputXGradient, "sum", {}),
                  "guided_backprop": (ca.GuidedBackprop, "max_abs", {}),
                  "deconvnet": (ca.Deconvolution, "max_abs", {})}
        if method in simple:
            cls, red, kw = simple[method]

            def run(cls=cls, red=red, kw=kw):
                with explaining():
                    return reduce(cls(model).attribute(x.clone().requires_grad_(True), target=targets, **kw), red)
            A["captum"] = run
        elif method == "integrated_gradients":
            def run():
                with explaining():
                    a = ca.IntegratedGradients(model).attribute(
                        x, baselines=subject.black(x), target=targets, n_steps=50, method="gausslegendre",
                        internal_batch_size=32)
                return reduce(a, "sum")
            A["captum"] = run
        elif method == "smoothgrad":
            sd = float(0.15 * (x.max() - x.min()))

            def run():
                with explaining():
                    a = ca.NoiseTunnel(ca.Saliency(model)).attribute(
                        x, nt_type="smoothgrad", nt_samples=25, stdevs=sd, target=targets,
                        nt_samples_batch_size=32, abs=False)
                return reduce(a, "max_abs")
            A["captum"] = run
        elif method == "gradcam":
            def run():
                with explaining():
                    a = ca.LayerGradCam(model, layer_module).attribute(x, target=targets, relu_attributions=True)
                return a[:, 0].detach()
            A["captum"] = run
        elif method in ("kernelshap", "lime"):
            seg = grid_segments(x.shape[-2], x.shape[-1], 7)  # the superpixels both libraries get
            fm = seg.view(1, 1, *seg.shape).expand(x.shape[0], 1, *seg.shape)

            def run():
                with explaining():
                    if method == "kernelshap":
                        explainer = ca.KernelShap(model)
                    else:  # the same surrogate family as ours (ridge, alpha 1) so the maps are comparable
                        from captum._utils.models.linear_model import SkLearnRidge

                        explainer = ca.Lime(model, interpretable_model=SkLearnRidge(alpha=1.0))
                    a = explainer.attribute(x, baselines=0.0, target=targets, feature_mask=fm, n_samples=1000,
                                            perturbations_per_eval=32)
                return reduce(a, "mean")
            A["captum"] = run
        elif method == "occlusion":
            def run():
                with explaining():
                    a = ca.Occlusion(model).attribute(x, sliding_window_shapes=(3, 15, 15), strides=(3, 8, 8),
                                                      baselines=0.0, target=targets, perturbations_per_eval=32)
                return reduce(a, "mean")
            A["captum"] = run

    # pytorch-grad-cam ----------------------------------------------------
    try:
        import pytorch_grad_cam as pg
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        pg = None
    gc_cls = {"gradcam": "GradCAM", "gradcam_pp": "GradCAMPlusPlus", "xgradcam": "XGradCAM",
              "layercam": "LayerCAM", "hirescam": "HiResCAM", "scorecam": "ScoreCAM", "eigencam": "EigenCAM"}
    if pg is not None and method in gc_cls:
        cls = getattr(pg, gc_cls[method])

        def run(cls=cls):
            with explaining(), cls(model=model, target_layers=[layer_module]) as cam:
                cam.batch_size = 32
                return torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets]))
        A["pytorch-grad-cam"] = run

    # torchcam ------------------------------------------------------------
    try:
        import torchcam.methods as tc
    except ImportError:
        tc = None
    tc_cls = {"gradcam": "GradCAM", "gradcam_pp": "GradCAMpp", "xgradcam": "XGradCAM", "layercam": "LayerCAM",
              "scorecam": "ScoreCAM", "smooth_gradcam_pp": "SmoothGradCAMpp"}
    if tc is not None and method in tc_cls:
        cls = getattr(tc, tc_cls[method])

        def run(cls=cls):
            with explaining():
                kw = {"batch_size": 32} if method == "scorecam" else {}
                if method == "smooth_gradcam_pp":   # our defaults: 10 copies, noise sd 0.15 x the input range
                    kw = {"num_samples": 10, "std": float(0.15 * (x.max() - x.min()))}
                ext = cls(model, target_layer=layer_name, input_shape=tuple(x.shape[1:]), **kw)
                try:
                    if method == "scorecam":
                        with torch.no_grad():
                            model(x)
                        maps = ext(class_idx=targets)
                    else:
                        scores = model(x)
                        maps = ext(class_idx=targets, scores=scores)
                finally:
                    ext.remove_hooks()
            return maps[0].detach()
        A["torchcam"] = run
    return A


# ---------------------------------------------------------------- sections
def method_rows(subject, x, methods, repeats, fcost, fbcost, lines, warmup=True, only=None):
    y = subject.forward(x).argmax(1)
    with subject.explaining():
        layer_name, layer_module = subject.find_layer("auto", x)
    calls_per_forward = []
    h = layer_module.register_forward_hook(lambda *a: calls_per_forward.append(1))
    try:
        with torch.no_grad():
            subject.forward(x[:1])
    finally:
        h.remove()
    if len(calls_per_forward) > 1:
        lines.append(f"| (layer `{layer_name}` runs {len(calls_per_forward)} times per forward; pytorch-grad-cam "
                     "pairs the activation of its first call with the gradient of its last, so its layer maps "
                     "differ on this model) | | | | | | | | |")
    for m in methods:
        anchors = anchors_for(subject, x, y, layer_name, layer_module, m)
        if not anchors:
            continue
        seg = grid_segments(x.shape[-2], x.shape[-1], 7)  # the superpixels both libraries get
        params = {"occlusion": {"output": "logit"},
                  "kernelshap": {"segments": seg, "baseline": torch.zeros(1), "n_samples": 1000, "output": "logit"},
                  "lime": {"segments": seg, "baseline": torch.zeros(1), "n_samples": 1000, "output": "logit"},
                  }.get(m, {})
        exp_box = {}

        def ours(m=m, params=params):
            e = sk.explain(subject, x, method=m, target=y.tolist(), params={m: params} if params else None)
            exp_box["e"] = e
            return e.maps
        if only:
            anchors = {k: v for k, v in anchors.items() if k in only}
        calls = {"saliencykit": ours, **anchors}
        try:
            res = measure(calls, repeats, x.shape[0], warmup=warmup)
        except Exception as err:  # keep the table going; the row says what broke
            lines.append(f"| {m} | error: {type(err).__name__}: {str(err)[:120]} | | | | | | |")
            print(lines[-1], flush=True)
            continue
        passes = exp_box["e"].passes
        f, b = passes["forward"], passes["backward"]
        forms = sorted({p.form for p in sk.inference.plans(subject).values()} - {"eager"})
        form_txt = f" ({', '.join(forms)} form)" if forms and b == 0 and f > 100 else ""
        floor = 1000 * (b * fbcost + max(f - b, 0) * fcost)
        ours_ms = res["saliencykit"]["ms"]
        # a method of one forward(+backward) makes one model call of the request's rows: the
        # floor that call can reach is the pass cost at that batch, not at the best one
        at = AT_BATCH.get(subject.name, {}).get(x.shape[0])
        batch_txt = ""
        if at is not None and f <= 1 and at[1] * 1000 > fbcost * 1000 * 1.02:
            batch_floor = 1000 * (b * at[1] + max(f - b, 0) * at[0])
            batch_txt = f" ({ours_ms / batch_floor:.2f} of the floor at batch {x.shape[0]})"
        anc = {k: v for k, v in res.items() if k != "saliencykit"}
        fastest = min(anc, key=lambda k: anc[k]["ms"])
        anchor_txt = "; ".join(f"{k} {v['ms']:.1f}" for k, v in anc.items())
        mem_txt = f"{res['saliencykit']['peak']:.0f} / " + "; ".join(f"{v['peak']:.0f}" for v in anc.values())
        r_txt = "; ".join(f"{k} {pearson(res['saliencykit']['maps'], v['maps']):.3f}" for k, v in anc.items())
        lines.append(f"| {m} | {ours_ms:.1f} | {anchor_txt} | {anc[fastest]['ms'] / ours_ms:.2f}x ({fastest}; CPU time "
                     f"{anc[fastest]['cpu_ms'] / res['saliencykit']['cpu_ms']:.2f}x) | "
                     f"{f:g}/{b:g}{form_txt} | {floor:.1f} | {ours_ms / floor:.2f}{batch_txt} | {mem_txt} | {r_txt} |")
        print(lines[-1], flush=True)


def cam_sharing(subject, x, repeats, lines):
    y = subject.forward(x).argmax(1).tolist()
    calls = {"gradcam alone": lambda: sk.explain(subject, x, "gradcam", target=y).maps,
             "all 5 variants": lambda: sk.explain(subject, x, GRAD_CAMS, target=y)["gradcam"].maps}
    res = measure(calls, repeats, x.shape[0])
    a, b = res["gradcam alone"]["ms"], res["all 5 variants"]["ms"]
    cpu = res["all 5 variants"]["cpu_ms"] / res["gradcam alone"]["cpu_ms"]
    lines.append(f"| {subject.name} | {x.shape[0]} | {a:.1f} | {b:.1f} | {b / a:.2f}x (CPU time {cpu:.2f}x) |")
    print(lines[-1], flush=True)


def memory_flat(subject, x, n, lines):
    y = subject.forward(x).argmax(1).tolist()
    sk.explain(subject, x, "gradcam", target=y)
    gc.collect()
    start = rss_mb()
    mid = None
    for i in range(n):
        sk.explain(subject, x, "gradcam", target=y)
        if i == min(9, n - 1):
            mid = rss_mb()
    gc.collect()
    end = rss_mb()
    lines.append(f"{n} consecutive `explain(..., 'gradcam')` calls on {subject.name}, batch {x.shape[0]}: "
                 f"RSS {start:.0f} MB at start, {mid:.0f} MB after {min(10, n)}, {end:.0f} MB at end "
                 f"({end - start:+.1f} MB).")
    print(lines[-1], flush=True)


def levers(subject, x, repeats, lines):
    """Cost of one forward per image under: grad enabled, no_grad, inference_mode, channels_last."""
    model = subject.model
    xb = x.expand(8, -1, -1, -1).contiguous()
    xcl = xb.contiguous(memory_format=torch.channels_last)

    def fwd(ctx, inp):
        def run():
            with subject.explaining(), ctx():
                model(inp)
        return run

    def fwd_cl():
        with subject.explaining():
            model.to(memory_format=torch.channels_last)
            try:
                with torch.inference_mode():
                    model(xcl)
            finally:
                model.to(memory_format=torch.contiguous_format)

    def fb(inp):
        def run():
            with subject.explaining():
                xi = inp.clone().requires_grad_(True)
                torch.autograd.grad(model(xi)[:, 0].sum(), xi)
        return run

    def fb_cl():
        with subject.explaining():
            model.to(memory_format=torch.channels_last)
            try:
                xi = xcl.clone().requires_grad_(True)
                torch.autograd.grad(model(xi)[:, 0].sum(), xi)
            finally:
                model.to(memory_format=torch.contiguous_format)

    def fwd_1thread():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with subject.explaining(), torch.inference_mode():
                model(xb)
        finally:
            torch.set_num_threads(n)

    def fb_cl_input():
        with subject.explaining():
            xi = xcl.clone(memory_format=torch.preserve_format).requires_grad_(True)
            torch.autograd.grad(model(xi)[:, 0].sum(), xi)

    built = {}

    def fwd_traced(form):  # the traced forms `saliencykit.inference` may pick for forward-only runs
        def run():
            with subject.explaining(), torch.inference_mode():
                if form not in built:
                    built[form], why = sk.inference.build(form, model, xb)
                    if built[form] is None:
                        raise RuntimeError(why)
                built[form](xb)
        return run

    calls = {"forward, grad enabled": fwd(torch.enable_grad, xb),
             "forward, inference_mode, frozen trace (torch.jit freeze + optimize_for_inference)": fwd_traced("frozen"),
             "forward, inference_mode, channels_last input only": fwd(torch.inference_mode, xcl),
             "forward+backward, channels_last input only": fb_cl_input,
             "forward, inference_mode, 1 thread": fwd_1thread, "forward, no_grad": fwd(torch.no_grad, xb),
             "forward, inference_mode": fwd(torch.inference_mode, xb),
             "forward, inference_mode, channels_last model and input": fwd_cl,
             "forward+backward": fb(xb), "forward+backward, channels_last model and input": fb_cl}
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is not None:
        calls["forward, ONNX Runtime (CPU provider, from the same trace)"] = fwd_traced("onnxruntime")
    res = measure(calls, repeats, 8)
    for k, v in res.items():
        lines.append(f"| {subject.name} | {k} | {v['ms']:.1f} | {v['cpu_ms']:.1f} | {v['peak']:.0f} |")
        print(lines[-1], flush=True)


def metric_rows(args, lines):
    import metrics as bm

    t0 = time.perf_counter()
    rows = bm.main(["--images", str(args.metric_images), "--threads", str(args.threads), "--device", args.device])
    lines += ["| metric | library | wall s / image | CPU s / image | note |", "|---|---|---:|---:|---|"]
    for metric, lib, sec, note, cpu in rows:
        fmt = (lambda v: f"{v:.2f}x") if lib.startswith("ratio") else (lambda v: f"{v:.2f}")
        lines.append(f"| {metric} | {lib} | {fmt(sec)} | {fmt(cpu)} | {note} |")
    by = {(m, lib): s for m, lib, s, _, _ in rows}
    ms = "max-sensitivity, 10 samples"
    if (ms, "quantus") in by and (ms, "saliencykit") in by:
        lines.append(f"| {ms} | ratio quantus/ours | {by[(ms, 'quantus')] / by[(ms, 'saliencykit')]:.2f}x | | |")
    rd = "ROAD MoRF, 9 levels"
    for lib in ("quantus", "pytorch-grad-cam"):
        if (rd, lib) in by and (rd, "saliencykit") in by and by[(rd, lib)] == by[(rd, lib)]:
            lines.append(f"| {rd} | ratio {lib}/ours | {by[(rd, lib)] / by[(rd, 'saliencykit')]:.2f}x | | |")
    lines.append(f"\n(metric section: {time.perf_counter() - t0:.0f} s)")


# ---------------------------------------------------------------- main
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def versions() -> str:
    out = []
    for mod, name in [("captum", "captum"), ("pytorch_grad_cam", "grad-cam"), ("torchcam", "torchcam"),
                      ("quantus", "quantus")]:
        try:
            from importlib.metadata import version
            out.append(f"{name} {version(name if name != 'grad-cam' else 'grad-cam')}")
        except Exception:
            out.append(f"{name} absent")
    return ", ".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="efficientnet_lite0,resnet50")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--methods", default="saliency,gradxinput,guided_backprop,integrated_gradients,"
                    "smoothgrad,gradcam,gradcam_pp,xgradcam,layercam,hirescam,eigencam,smooth_gradcam_pp,occlusion,kernelshap,"
                    "lime,scorecam")
    ap.add_argument("--resnet50-methods", default="saliency,guided_backprop,gradcam,gradcam_pp,layercam,eigencam,"
                    "smooth_gradcam_pp,scorecam",
                    help="resnet50 runs only these (cost)")
    ap.add_argument("--batch8-repeats", type=int, default=3)
    ap.add_argument("--batch8-methods", default="saliency,gradcam,eigencam",
                    help="batch 8 runs only these (cost); '' for the same as batch 1")
    ap.add_argument("--heavy-repeats", type=int, default=1,
                    help="repeats for thousand-pass rows (Score-CAM, occlusion, KernelSHAP, LIME)")
    ap.add_argument("--heavy-anchors", default="captum,pytorch-grad-cam,torchcam")
    ap.add_argument("--heavy-models", default="efficientnet_lite0,resnet50",
                    help="models on which the thousand-pass rows run")
    ap.add_argument("--metric-images", type=int, default=1)
    ap.add_argument("--explain-calls", type=int, default=1000)
    ap.add_argument("--skip", action="append", default=[], help="methods, sharing, metrics, memory, levers")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where every library runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    lines = ["# saliencykit beside Captum, pytorch-grad-cam, torchcam and Quantus", "",
             f"Machine: {machine()}; {args.threads} threads (`torch.set_num_threads`)"
             + (f"; device {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else "") + ".  ",
             f"Anchors: {versions()}.  ",
             "Reproduce: `python benchmarks/compare.py " + " ".join(argv or sys.argv[1:]) + "`"
             + (" (`make bench`)." if argv is None and sys.argv[1:] == ["--out", "benchmarks/results.md"] else "."),
             "", f"Load average (1/5/15 min) at start: {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}. "
             "Timings are medians; within a row all libraries run interleaved in rotating order after one "
             "warm-up call each, so machine drift hits them alike.", ""]
    heavy = {"scorecam", "occlusion", "kernelshap", "lime"}

    def dump():  # after every section, so an interrupted run still leaves what it measured
        if args.out:
            with open(args.out, "w") as fh:
                fh.write("\n".join(lines) + "\n\n(run in progress or interrupted)\n")
    subjects = {}

    def subject_of(model_name):
        if model_name not in subjects:
            torch.manual_seed(0)  # the random-weight resnet50 is the same model in every run
            subjects[model_name] = sk.load_model("efficientnet_lite0" if model_name == "efficientnet_lite0"
                                                 else f"torchvision:{model_name}:random", device=args.device)
        return subjects[model_name]

    costs = {}

    def methods_section(B, heavy_rows):
        for model_name in args.models.split(","):
            subject = subject_of(model_name)
            x = subject.preprocess([sk.data.image(n) for n in (sk.data.PHOTOS * 8)[:B]])
            if model_name not in costs:
                costs[model_name] = best_pass_costs(subject, x[:1])
            fcost, fbcost = costs[model_name]
            ms = args.methods.split(",")
            if model_name == "resnet50" and args.resnet50_methods:
                ms = [m for m in ms if m in args.resnet50_methods.split(",")]
            if B > 1 and args.batch8_methods:
                ms = [m for m in ms if m in args.batch8_methods.split(",")]
            if heavy_rows:
                ms = [m for m in ms if m in heavy] if model_name in args.heavy_models.split(",") else []
            else:
                ms = [m for m in ms if m not in heavy]
            if not ms:
                continue
            reps = args.heavy_repeats if heavy_rows else (args.repeats if B == 1 else args.batch8_repeats)
            lines.extend([f"## {model_name}, batch {B}" + (", thousand-pass methods" if heavy_rows else ""), "",
                          f"One forward {1000 * fcost:.1f} ms, one forward+backward {1000 * fbcost:.1f} ms per "
                          "image at the best batch size (of 1, 4, 6, 8, 16, 32). Load average now "
                          f"{os.getloadavg()[0]:.2f}. Median of {reps}"
                          + (f", no warm-up call; anchors: {args.heavy_anchors}." if heavy_rows else "."), "",
                          "| method | ours ms/img | anchors ms/img | fastest anchor / ours | passes F/B | "
                          "floor ms | ours / floor | peak extra MB ours / anchors | Pearson with ours |",
                          "|---|---:|---|---:|---:|---:|---:|---|---|"])
            if heavy_rows:
                method_rows(subject, x, ms, reps, fcost, fbcost, lines, warmup=False,
                            only=args.heavy_anchors.split(","))
            else:
                method_rows(subject, x, ms, reps, fcost, fbcost, lines)
            lines.append("")
            dump()

    batches = [int(b) for b in args.batches.split(",") if b]
    if "methods" not in args.skip and 1 in batches:
        methods_section(1, False)
    if "sharing" not in args.skip:
        lines += ["## All gradient-CAM variants of one layer in one call (" + ", ".join(GRAD_CAMS) + ")", "",
                  "| model | batch | Grad-CAM alone ms/img | all 5 ms/img | ratio |", "|---|---:|---:|---:|---:|"]
        for model_name in args.models.split(","):
            subject = subject_of(model_name)
            x = subject.preprocess([sk.data.image(n) for n in (sk.data.PHOTOS * 8)[:8]])
            cam_sharing(subject, x, args.batch8_repeats, lines)
        lines.append("")
    dump()
    if "levers" not in args.skip:
        lines += ["## Levers: one pass per image, batch 8", "",
                  "| model | variant | ms/img | CPU ms/img | peak extra MB |", "|---|---|---:|---:|---:|"]
        for model_name in args.models.split(","):
            subject = subject_of(model_name)
            x = subject.preprocess(sk.data.image("chelsea"))
            levers(subject, x, args.batch8_repeats, lines)
        lines.append("")
    dump()
    if "metrics" not in args.skip:
        lines += ["## Metrics against Quantus (EfficientNet-Lite0, from `benchmarks/metrics.py`)", ""]
        metric_rows(args, lines)
        lines.append("")
    dump()
    if "memory" not in args.skip:
        lines += ["## Memory over consecutive calls", ""]
        subject = sk.load_model("efficientnet_lite0", device=args.device)
        x = subject.preprocess(sk.data.image("chelsea"))
        memory_flat(subject, x, args.explain_calls, lines)
        lines.append("")
    dump()
    if "methods" not in args.skip:
        for B in [b for b in batches if b != 1]:
            methods_section(B, False)
        if 1 in batches:
            methods_section(1, True)
    load1 = os.getloadavg()
    lines.append(f"Load average at end: {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f}; "
                 f"whole run {time.perf_counter() - t_start:.0f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
