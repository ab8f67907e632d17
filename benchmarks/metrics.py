"""Speed of saliencykit's metrics against Quantus and pytorch-grad-cam, same model and settings.

    python benchmarks/metrics.py --images 2 --threads 2 [--device cuda]

Rows: deletion + insertion at 224 steps (224 px per step on 224x224), max-sensitivity
(10 samples, r = 0.02, plain-gradient explainer shared by both libraries), infidelity at the same
number of model evaluations (160 per image; Quantus perturbs black patches, ours noisy baselines),
ROAD most-relevant-first at 10..90 %. Each library gets the same model, images, maps and target classes; seconds per image
are wall-clock after one warm-up image. Quantus has no insertion metric; its pixel flipping
counts channel elements per step and requires the step to divide H*W, so its deletion runs at
224 elements per step (= 672 steps for a 3-channel map, reported as such). torchcam has no
deletion/insertion metric (only average drop / increase in confidence), so it is not compared.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

warnings.filterwarnings("ignore")


CPU_TIMES: list = []


def _timed(fn):
    """Wall seconds (returned) and process CPU seconds (kept in CPU_TIMES: less sensitive to other
    load on a shared machine)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    CPU_TIMES.append(time.process_time() - c0)
    return time.perf_counter() - t0, out


def main(argv=None):
    import saliencykit as sk
    from saliencykit.metrics import evaluate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per chunk (default: the engine's auto size; large chunks are slower on a CPU)")
    p.add_argument("--skip", action="append", default=[],
                   help="skip a row: deletion, sensitivity, infidelity, road")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    subject = sk.load_model(args.model, device=args.device)
    names = (sk.data.PHOTOS * 4)[: args.images]
    x = subject.preprocess([sk.data.image(n) for n in names]).to(args.device)
    B = x.shape[0]
    exps = sk.explain(subject, x, ["gradcam", "saliency"])
    y = subject.forward(x).argmax(1)
    maps = exps["gradcam"].maps
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"model {args.model}, {B} images 224x224, {dev}\n")
    print("| metric | library | wall s / image | CPU s / image | note |")
    print("|---|---|---|---|---|", flush=True)

    class Rows(list):
        def append(self, row):
            super().append(row)
            metric, lib, sec, note, cpu = row
            fmt = (lambda v: f"{v:.2f}x") if lib.startswith("ratio") else (lambda v: f"{v:.2f}")
            print(f"| {metric} | {lib} | {fmt(sec)} | {fmt(cpu)} | {note} |", flush=True)

    rows = Rows()

    def ours(metrics, params, e="gradcam"):
        return evaluate(subject, x, {e: exps[e]}, metrics=metrics, params=params, random_baseline=False,
                        batch_size=args.batch_size, target=y.tolist())

    try:
        import quantus
    except ImportError:
        quantus = None
    xn, yn = x.detach().cpu().numpy(), y.cpu().numpy()
    qkw = dict(model=subject.model, x_batch=xn, y_batch=yn, device=args.device)

    if "deletion" not in args.skip:
        t_sk, _ = _timed(lambda: ours(["deletion", "insertion"], {"deletion": {"step": 224}, "insertion": {"step": 224}}))
        t_del, _ = _timed(lambda: ours(["deletion"], {"deletion": {"step": 224}}))
        rows.append(("deletion + insertion, 224 steps", "saliencykit", t_sk / B, "2 x 223 + 3 shared passes",
                     CPU_TIMES[-2] / B))
        rows.append(("deletion, 224 steps", "saliencykit", t_del / B, "223 + 2 shared passes", CPU_TIMES[-1] / B))
        if quantus is not None:
            a = maps[:, None].cpu().numpy()
            metric = quantus.PixelFlipping(features_in_step=224, perturb_baseline=0.0, normalise=False,
                                           disable_warnings=True)
            t_q, _ = _timed(lambda: metric(a_batch=a, softmax=True, batch_size=B, **qkw))
            rows.append(("deletion, 224 steps", "quantus", t_q / B,
                         "PixelFlipping, 672 steps (224 channel elements each)", CPU_TIMES[-1] / B))
            rows.append(("deletion, 224 steps", "ratio quantus/ours (per image, the same request)", t_q / t_del, "",
                         CPU_TIMES[-1] / CPU_TIMES[-2]))
            rows.append(("deletion, 224 steps", "ratio quantus/ours (per evaluated input)",
                         (t_q / 672) / (t_del / 224), "", (CPU_TIMES[-1] / 672) / (CPU_TIMES[-2] / 224)))

    if "sensitivity" not in args.skip:
        t_sk, _ = _timed(lambda: ours(["max_sensitivity"], {"max_sensitivity": {"n_samples": 10, "radius": 0.02}},
                                      e="saliency"))
        rows.append(("max-sensitivity, 10 samples", "saliencykit", t_sk / B, "saliency explainer", CPU_TIMES[-1] / B))
        if quantus is not None:
            def explain_func(model, inputs, targets, **kw):
                xi = torch.as_tensor(inputs, device=args.device)
                return sk.explain(subject, xi, "saliency", target=[int(t) for t in targets]).maps[:, None].cpu().numpy()

            metric = quantus.MaxSensitivity(nr_samples=10, lower_bound=0.02, disable_warnings=True)
            t_q, _ = _timed(lambda: metric(a_batch=exps["saliency"].maps[:, None].cpu().numpy(), explain_func=explain_func,
                                           batch_size=B, **qkw))
            rows.append(("max-sensitivity, 10 samples", "quantus", t_q / B, "same explainer", CPU_TIMES[-1] / B))

    if "infidelity" not in args.skip:
        # the same number of model evaluations per image (10 samples x 16 patches of 56 px on
        # 224 x 224 = 160); the perturbations differ: Quantus replaces patches with black, one
        # after another (one forward of the batch per patch), ours draws Yeh et al.'s noisy
        # baselines and scores them in chunks
        n_eval = 10 * (x.shape[-1] // 56) * (x.shape[-2] // 56)
        t_sk, _ = _timed(lambda: ours(["infidelity"], {"infidelity": {"n_perturb": n_eval}}))
        rows.append((f"infidelity, {n_eval} evaluations", "saliencykit", t_sk / B,
                     f"noisy baseline, {n_eval} perturbations", CPU_TIMES[-1] / B))
        if quantus is not None:
            metric = quantus.Infidelity(perturb_patch_sizes=[56], n_perturb_samples=10, perturb_baseline="black",
                                        disable_warnings=True)
            t_q, _ = _timed(lambda: metric(a_batch=maps[:, None].cpu().numpy(), batch_size=B, **qkw))
            rows.append((f"infidelity, {n_eval} evaluations", "quantus", t_q / B,
                         "Infidelity, 10 samples x 16 black 56-px patches", CPU_TIMES[-1] / B))
            rows.append((f"infidelity, {n_eval} evaluations", "ratio quantus/ours", t_q / t_sk, "",
                         CPU_TIMES[-1] / CPU_TIMES[-2]))

    if "road" not in args.skip:
        levels = [0.1 * i for i in range(1, 10)]
        t_sk, _ = _timed(lambda: ours(["road_morf"], {"road_morf": {"levels": levels}}))
        rows.append(("ROAD MoRF, 9 levels", "saliencykit", t_sk / B, "9 solves + 9 passes per image",
                     CPU_TIMES[-1] / B))
        if quantus is not None:
            metric = quantus.ROAD(percentages=list(range(10, 100, 10)), disable_warnings=True)
            try:
                t_q, _ = _timed(lambda: metric(a_batch=maps[:, None].cpu().numpy(), batch_size=B, **qkw))
                rows.append(("ROAD MoRF, 9 levels", "quantus", t_q / B, "removes p/3 of the pixels (see docs)",
                             CPU_TIMES[-1] / B))
            except IndexError as err:
                # Quantus ranks the channel-broadcast map's C*H*W elements but imputes by H*W pixel index
                rows.append(("ROAD MoRF, 9 levels", "quantus", float("nan"), f"fails on RGB inputs: {err}",
                             float("nan")))
        try:
            from pytorch_grad_cam.metrics.road import ROADMostRelevantFirstAverage
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

            road = ROADMostRelevantFirstAverage(percentiles=list(range(10, 100, 10)))
            targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in y]
            t_g, _ = _timed(lambda: road(x, maps.cpu().numpy(), targets, subject.model))
            rows.append(("ROAD MoRF, 9 levels", "pytorch-grad-cam", t_g / B, "ROADMostRelevantFirstAverage",
                         CPU_TIMES[-1] / B))
        except ImportError:
            pass

    return rows


if __name__ == "__main__":
    main()
