"""Subject: loading, preprocessing, output handling, layer lookup, label resolution."""
import numpy as np
import pytest
import torch
from torch import nn

import saliencykit as sk
from saliencykit import SaliencyError, Subject
from saliencykit.subject import extract_logits, load_image


def test_bundled_models_predict_the_documented_classes(lite0, mobilenet, chelsea):
    # ASSETS.md: chelsea -> Egyptian cat (0.78 EfficientNet-Lite0, 0.72 MobileNetV2); coffee -> espresso.
    # Our preprocessing resizes the whole photo (no crop), so probabilities differ slightly: +-0.1.
    for subject, p_cat in ((lite0, 0.78), (mobilenet, 0.72)):
        top = subject.predict(subject.preprocess(chelsea), k=5)[0]
        assert top[0]["label"] == "Egyptian cat" and abs(top[0]["prob"] - p_cat) < 0.1
        coffee = subject.predict(subject.preprocess(sk.data.image("coffee")), k=1)[0][0]
        assert coffee["label"] == "espresso"


def test_preprocess_shape_and_batch(lite0, chelsea):
    x = lite0.preprocess([chelsea, sk.data.image("coffee")])
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    # normalisation round trip
    pix = lite0.unnormalize(x)
    assert pix.min() >= 0 and pix.max() <= 1
    assert torch.allclose(lite0.normalize_pixels(pix), x, atol=1e-5)


def test_grayscale_and_rgba_photos_are_converted(tmp_path, tiny):
    from PIL import Image

    gray = Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 255).astype(np.uint8), "L")
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 128))
    for img in (gray, rgba):
        path = tmp_path / f"{img.mode}.png"
        img.save(path)
        x = tiny.preprocess(str(path))
        assert x.shape == (1, 3, 32, 32)
    # an RGBA pixel half-transparent red over white -> (255, 127, 127)
    assert load_image(rgba).getpixel((0, 0)) == (255, 127, 127)


def test_unreadable_and_missing_files(tmp_path, tiny):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is not a PNG")
    with pytest.raises(SaliencyError, match="cannot read image"):
        tiny.preprocess(str(bad))
    with pytest.raises(SaliencyError, match="not found"):
        tiny.preprocess(str(tmp_path / "missing.jpg"))


def test_output_forms_are_understood():
    logits = torch.randn(2, 4)
    assert extract_logits(logits) is logits
    assert extract_logits((logits, torch.zeros(1))) is logits
    assert extract_logits({"logits": logits, "aux": 1}) is logits
    with pytest.raises(SaliencyError, match="not understood"):
        extract_logits({"features": logits})
    with pytest.raises(SaliencyError, match="not understood"):
        extract_logits(torch.randn(2, 3, 4))
    with pytest.raises(SaliencyError, match="not understood"):
        extract_logits("text")


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.fc(self.body(x).mean((2, 3)))}


def test_dict_output_model_is_explained():
    subject = Subject(DictModel(), input_size=(16, 16))
    exp = sk.explain(subject, torch.randn(1, 3, 16, 16), method=["gradcam", "saliency"])
    assert exp["gradcam"].maps.shape == (1, 16, 16)
    assert exp["gradcam"].layer == "body"  # auto: the last spatial output before pooling


def test_auto_layer_is_the_last_spatial_map(lite0, mobilenet):
    assert lite0.auto_layer() == "_swish"        # the head's ReLU6 (its last call) -> [1280, 7, 7]
    assert mobilenet.auto_layer() == "features"  # torchvision MobileNetV2 feature stack -> [1280, 7, 7]


def test_auto_layer_skips_adaptive_pooling():
    # VGG's `avgpool` is AdaptiveAvgPool2d((7, 7)): at 64 px it copies the 2x2 feature map onto a
    # 7x7 grid, spatial but without new location evidence; the auto layer is the feature stack
    vgg = sk.load_model("torchvision:vgg11:random")
    assert vgg.auto_layer(torch.zeros(1, 3, 64, 64)) == "features"


def test_unknown_layer_lists_close_names(tiny):
    with pytest.raises(SaliencyError, match="closest: conv2"):
        tiny.find_layer("conv_2")
    with pytest.raises(SaliencyError, match="not found"):
        sk.explain(tiny, torch.randn(1, 3, 32, 32), method="gradcam", layer="nope")


def test_dataparallel_prefix_is_accepted(tiny):
    wrapped = Subject(nn.DataParallel(tiny.model), input_size=(32, 32))
    name, module = wrapped.find_layer("conv2")
    assert name == "module.conv2" and module is tiny.model.conv2
    name, _ = tiny.find_layer("module.conv2")
    assert name == "conv2"


def test_labels_case_insensitive_aliases_and_errors(lite0):
    assert lite0.class_index("egyptian CAT") == 285
    assert lite0.class_index("tabby cat") == 281          # WordNet synonym of "tabby"
    assert lite0.class_index("281") == 281
    with pytest.raises(SaliencyError, match="did you mean"):
        lite0.class_index("egyptain cat")
    with pytest.raises(SaliencyError, match="out of range"):
        lite0.class_index(1000)


def test_bare_module_is_wrapped(tiny):
    exp = sk.explain(tiny.model, torch.randn(1, 3, 32, 32), method="saliency")
    assert exp.maps.shape == (1, 32, 32)


def test_token_outputs_become_a_grid():
    subject = Subject(nn.Identity(), input_size=(32, 48))
    tokens = torch.arange(2 * (1 + 8 * 12) * 5, dtype=torch.float32).reshape(2, 1 + 8 * 12, 5)
    grid = subject.tokens_to_grid(tokens, (32, 48))   # patch 4, CLS dropped, non-square
    assert grid.shape == (2, 5, 8, 12)
    assert torch.equal(grid[:, :, 0, 1], tokens[:, 2])
    with pytest.raises(SaliencyError, match="patch grid"):
        subject.tokens_to_grid(torch.zeros(1, 3, 5), (32, 48))


def test_load_model_errors():
    with pytest.raises(SaliencyError, match="unknown model"):
        sk.load_model("efficientnet_lite00")
    with pytest.raises(SaliencyError, match="unknown torchvision model"):
        sk.load_model("torchvision:resnet1")
    subject = sk.load_model("torchvision:resnet18:random")
    assert subject.labels and len(subject.labels) == 1000
