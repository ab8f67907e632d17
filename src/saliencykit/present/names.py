"""What things are called where a person reads them: methods' display names, which maps are
speckled, and a target in words with its probability."""
from __future__ import annotations

METHOD_NAMES = {
    "cam": "CAM", "gradcam": "Grad-CAM", "gradcam_pp": "Grad-CAM++", "smooth_gradcam_pp": "Smooth Grad-CAM++",
    "hirescam": "HiResCAM", "xgradcam": "XGrad-CAM", "layercam": "LayerCAM", "scorecam": "Score-CAM",
    "eigencam": "Eigen-CAM", "saliency": "Gradient saliency", "gradxinput": "Gradient x Input",
    "smoothgrad": "SmoothGrad", "vargrad": "VarGrad", "integrated_gradients": "Integrated Gradients",
    "guided_backprop": "Guided Backprop", "deconvnet": "DeconvNet", "occlusion": "Occlusion", "rise": "RISE",
    "lime": "LIME", "kernelshap": "KernelSHAP", "random": "A random map", "cf_cam": "CF-CAM",
    "smoothgrad_sq": "SmoothGrad²", "blur_ig": "Blur IG", "guided_ig": "Guided IG", "iia": "IIA", "dix": "DIX",
    "fullgrad": "FullGrad", "normgrad": "NormGrad", "lrp": "LRP", "crp": "CRP", "xrai": "XRAI", "drise": "D-RISE",
    "extremal_perturbation": "Extremal perturbation", "meaningful_perturbation": "Meaningful perturbation",
}
# families whose maps are pixel-level (gradients, paths, propagation): speckled, so pictures clip
# them at a lower percentile and may smooth them for display (the stored map is never touched)
SPECKLED_FAMILIES = ("gradient", "propagation")


def method_title(name: str) -> str:
    """A readable method name: gradcam -> Grad-CAM."""
    return METHOD_NAMES.get(name, name.replace("_", " ").capitalize())


def target_words(described: dict, probs) -> tuple[str, float | None]:
    """What a map explains, in words, and the target's probability where it is one number (None
    when `probs` is None: a dense output has no class probabilities)."""
    if probs is None:
        return described.get("name", ""), None

    def p(indices):
        return float(probs[list(indices)].sum())

    if described.get("kind") == "contrast":
        a = described["name"].split(" vs ")[0]
        return (f"{a} ({100 * p(described['indices']):.0f} %) rather than {described['vs_name']} "
                f"({100 * p(described['vs_indices']):.0f} %)"), None
    return described.get("name", ""), p(described.get("indices", []))


def is_speckled(name: str) -> bool:
    """Whether a method's maps are pixel-level (see `SPECKLED_FAMILIES`); unknown names are not."""
    from ..methods import available

    info = available(include_experimental=True).get(name)
    return info is not None and info["family"] in SPECKLED_FAMILIES


__all__ = ["METHOD_NAMES", "SPECKLED_FAMILIES", "method_title", "is_speckled", "target_words"]
