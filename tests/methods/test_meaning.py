"""Maps of the pretrained models point at the object: mass inside hand-drawn boxes."""
import pytest
import torch

import saliencykit as sk


def positive_mass_inside(exp, mask):
    pos = exp.maps[0].clamp_min(0)
    return float(pos[mask].sum() / pos.sum())


@pytest.mark.parametrize("model", ["lite0", "mobilenet"])
def test_chelsea_evidence_is_on_the_cat(model, request, chelsea):
    subject = request.getfixturevalue(model)
    x = subject.preprocess(chelsea)
    exps = sk.explain(subject, x, method=["gradcam", "hirescam", "integrated_gradients"],
                      params={"integrated_gradients": {"steps": 32}})
    cat = sk.data.box_mask("chelsea", (224, 224), "cat")
    face = sk.data.box_mask("chelsea", (224, 224), "cat face")
    for name, exp in exps.items():
        # the criterion: more than half the positive mass inside the cat's box
        assert positive_mass_inside(exp, cat) > 0.5, name
    for name in ("gradcam", "hirescam"):
        # stronger: the CAMs concentrate on the face beyond its share of the image (57% of the area)
        assert positive_mass_inside(exps[name], face) > float(face.float().mean()) + 0.05, name


def test_coffee_gradcam_is_on_the_cup(lite0):
    x = lite0.preprocess(sk.data.image("coffee"))
    exp = sk.explain(lite0, x, method="gradcam")
    cup = sk.data.box_mask("coffee", (224, 224), "cup")
    # the cup box is 29% of the photo; Grad-CAM for "espresso" puts most of its mass there
    assert positive_mass_inside(exp, cup) > 0.5
