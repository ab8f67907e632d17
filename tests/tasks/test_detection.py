"""Detectors: adapters, Box targets and D-RISE (synthetic detector for definitions, the OpenCV face
cascade on the astronaut for meaning)."""
import os

import numpy as np
import pytest
import torch

import saliencykit as sk
from saliencykit import data
from saliencykit.tasks.detection import (Box, Detections, Detector, box_iou, detection_similarity, drise,
                                         drise_masks, load_detector)
from saliencykit.errors import SaliencyError

SQUARES = {0: (8, 8, 24, 24), 1: (36, 30, 56, 50)}  # class -> x1, y1, x2, y2 of a bright square


def square_photo():
    img = np.full((64, 64, 3), 40, dtype=np.uint8)
    for x1, y1, x2, y2 in SQUARES.values():
        img[y1:y2, x1:x2] = 230
    return img


def square_detector(img):
    """Reports the box of a square (its class, score 0.9) when at least 60 % of it is still bright."""
    boxes, scores, classes = [], [], []
    for cls, (x1, y1, x2, y2) in SQUARES.items():
        visible = (img[y1:y2, x1:x2].mean(-1) > 150).mean()
        if visible >= 0.6:
            boxes.append((x1, y1, x2, y2))
            scores.append(0.9)
            classes.append(cls)
    return np.array(boxes, dtype=float).reshape(-1, 4), np.array(scores), np.array(classes)


@pytest.fixture
def squares():
    return Detector(square_detector, num_classes=2, class_names=["left", "right"], name="squares")


def test_box_iou_matches_torchvision_and_self_similarity():
    # what: our IoU equals torchvision.ops.box_iou (1e-12, float64); s(d, d) = 1 for a one-hot class
    # vector and O = 1; why: the D-RISE detection similarity
    from torchvision.ops import box_iou as tv_iou

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(6, 2, generator=g, dtype=torch.float64) * 50
    a = torch.cat([xy, xy + 1 + torch.rand(6, 2, generator=g, dtype=torch.float64) * 30], 1)
    assert torch.allclose(box_iou(a, a[:4]), tv_iou(a, a[:4]), atol=1e-12)
    d = Detections(a[:1], torch.ones(1), torch.zeros(1, dtype=torch.long), torch.tensor([[1.0, 0.0, 0.0]]),
                   torch.ones(1))
    assert float(detection_similarity(d, d)) == pytest.approx(1.0, abs=1e-12)


def test_adapter_protocol_and_class_vectors():
    # what: tuple and dict outputs convert alike; one score + class expands to P[c] = score, others
    # (1 - score)/(C - 1); why: detectors without full class probabilities (MS D-RISE helper)
    tup = Detector(lambda im: (np.array([[1, 2, 10, 12]]), np.array([0.8]), np.array([2])), num_classes=3)
    dic = Detector(lambda im: {"boxes": torch.tensor([[1.0, 2, 10, 12]]), "scores": torch.tensor([0.8]),
                               "labels": torch.tensor([2])}, num_classes=3)
    img = np.zeros((16, 16, 3), dtype=np.uint8)
    a, b = tup.detect([img])[0], dic.detect([img])[0]
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.classes, b.classes)
    assert torch.allclose(a.probs, torch.tensor([[0.1, 0.1, 0.8]], dtype=torch.float64))
    with pytest.raises(SaliencyError, match="not a preprocessed tensor"):
        tup.detect([torch.zeros(3, 16, 16)])


def test_drise_concentrates_on_the_square_and_is_seeded(squares):
    # what: each square's map peaks inside that square and keeps > 60 % of its positive (centred)
    # mass within one mask cell (8 px) of it, an area share of only 25-32 % (energy-based pointing
    # game at the masks' resolution; 300 masks leave some noise); same seed -> identical maps,
    # other seed -> not; why: a synthetic detector whose answer is known, and the seeding rule
    photo = square_photo()
    e = drise(squares, photo, n_masks=300, cell=8, seed=0, batch_size=100, center=True)
    assert e.maps.shape == (2, 64, 64)
    for t, cls in enumerate(e.extras["classes"]):
        x1, y1, x2, y2 = SQUARES[cls]
        row, col = divmod(int(e.maps[t].argmax()), 64)
        assert x1 <= col < x2 and y1 <= row < y2, cls
        pos = e.maps[t].clamp_min(0)
        c = 8
        assert float(pos[max(0, y1 - c):y2 + c, max(0, x1 - c):x2 + c].sum() / pos.sum()) > 0.6, cls
    again = drise(squares, photo, n_masks=300, cell=8, seed=0, batch_size=100, center=True)
    assert torch.equal(e.maps, again.maps)
    other = drise(squares, photo, n_masks=300, cell=8, seed=1, batch_size=100, center=True)
    assert not torch.equal(e.maps, other.maps)
    assert e.passes["forward"] == 301  # the clean pass + one per mask


def test_shared_passes_equal_one_box_runs(squares):
    # what: explaining both detections from one set of masked passes gives the maps of two single-box
    # runs (1e-6), with half the detector calls; the masks do not depend on the chunking; why: the
    # shared-pass computation must be exact
    photo = square_photo()
    both = drise(squares, photo, [Box(0), Box(1)], n_masks=96, cell=8, seed=4, batch_size=32)
    one = drise(squares, photo, Box(0), n_masks=96, cell=8, seed=4, batch_size=50)
    two = drise(squares, photo, Box(1), n_masks=96, cell=8, seed=4, batch_size=96)
    assert torch.allclose(both.maps[0], one.maps[0], atol=1e-6)
    assert torch.allclose(both.maps[1], two.maps[0], atol=1e-6)
    assert float((both.maps[0] - both.maps[1]).abs().max()) > 0
    assert torch.equal(drise_masks(5, (20, 30), 4, seed=2, start=3), drise_masks(8, (20, 30), 4, seed=2)[3:])


def test_explain_routes_a_detector_to_drise(squares, tiny, tiny_x):
    # what: sk.explain(detector, photo, "drise", ...) is the function drise with the same seed and
    # budget (identical maps); drise is listed in the registry; a classifier asked for drise and a
    # detector asked for a classifier-only method get clear errors; why: one API for every subject
    photo = square_photo()
    via_explain = sk.explain(squares, photo, "drise", target=[Box(0), Box(1)], seed=3, n_masks=64, cell=8)
    direct = drise(squares, photo, [Box(0), Box(1)], n_masks=64, cell=8, seed=3)
    assert torch.equal(via_explain.maps, direct.maps) and via_explain.method == "drise"
    both = sk.explain(squares, photo, ["drise"], params={"drise": {"n_masks": 32, "cell": 8}})
    assert set(both) == {"drise"} and both["drise"].maps.shape == (2, 64, 64)
    assert sk.methods.available()["drise"]["family"] == "detection"
    with pytest.raises(SaliencyError, match="drise explains object detectors"):
        sk.explain(tiny, tiny_x, "drise")
    with pytest.raises(SaliencyError, match="cannot explain a detector"):
        sk.explain(squares, photo, "integrated_gradients")
    with pytest.raises(SaliencyError, match="unknown parameter"):
        sk.explain(squares, photo, "drise", steps=3)


def test_drise_through_the_runner_equals_the_definition(squares):
    # what: the D-RISE maps of the one explain path (masked photos through engine.perturbed_scores
    # in chunks of 7) equal the definition written out mask by mask: detect each M_i * I (rounded
    # to uint8), w_it = max_j IoU * cos * objectness against target t, S_t = sum_i w_it M_i / (N p),
    # centred by the mean weight times the mask sum; why: the runner must change nothing but the
    # batching. Same float64 sums in a different order: 1e-12 relative.
    photo = square_photo()
    n, cell, p, seed = 40, 8, 0.5, 5
    e = sk.explain(squares, photo, "drise", target=[Box(0), Box(1)], n_masks=n, cell=cell, p=p, seed=seed,
                   batch_size=7, center=True)
    clean = squares.detect([photo])[0]
    order = clean.scores.argsort(descending=True)
    tgt = Detections(*(getattr(clean, f)[order] for f in ("boxes", "scores", "classes", "probs", "objectness")))
    masks = drise_masks(n, photo.shape[:2], cell, p, seed)
    w = torch.zeros(n, 2, dtype=torch.float64)
    for i in range(n):
        masked = (torch.from_numpy(photo).float() * masks[i][..., None]).round().clamp(0, 255).to(torch.uint8)
        sim = detection_similarity(tgt, squares.detect([masked.numpy()])[0])
        w[i] = sim.amax(1) if sim.shape[1] else 0.0
    flat = masks.reshape(n, -1).double()
    expected = (w.t() @ flat - w.mean(0)[:, None] * flat.sum(0)[None]) / (n * p)
    torch.testing.assert_close(e.maps.double().reshape(2, -1), expected.float().double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(e.extras["weights"].double(), w.float().double())
    assert e.passes["forward"] == n + 1 and e.passes["model_calls"] == 1 + -(-n // 7) and e.seed == seed
    assert e.signed and [d["name"] for d in e.target] == ["left", "right"]


def test_detectors_share_the_method_registry(squares, tiny, tiny_x):
    # what: drise is registered for detectors only and gradcam under one name for both kinds; the
    # registry says which kinds each method runs on; a bad target for a detector is named
    info = sk.methods.available()
    assert info["drise"]["kinds"] == ["detector"] and info["gradcam"]["kinds"] == ["classifier"]
    assert sk.methods.get("gradcam", "detector").__name__ == "DetectorGradCAM"
    assert sk.methods.get("gradcam").__name__ == "GradCAM"
    with pytest.raises(SaliencyError, match="sk.Box targets"):
        sk.explain(squares, square_photo(), "drise", target=1)
    with pytest.raises(SaliencyError, match="needs a Detector"):
        drise(tiny, tiny_x)
    with pytest.raises(SaliencyError, match="torchvision detection model"):
        sk.explain(squares, square_photo(), "gradcam")


def test_explicit_box_and_label_targets(squares):
    # what: Box(label=...) picks that class's detection; an explicit box with a one-hot class gives
    # the same map as the detection it coincides with (the detector's P is (0.9, 0.1) vs one-hot,
    # so the maps agree up to the cosine factor: Pearson > 0.99); why: targets for misses
    photo = square_photo()
    by_label = drise(squares, photo, Box(label="right"), n_masks=64, cell=8, seed=0, batch_size=64)
    assert by_label.extras["classes"] == [1]
    explicit = drise(squares, photo, Box(box=SQUARES[1], label=1), n_masks=64, cell=8, seed=0, batch_size=64)
    r = np.corrcoef(by_label.maps.flatten().numpy(), explicit.maps.flatten().numpy())[0, 1]
    assert r > 0.99


def test_bad_detector_inputs(squares, tiny, tiny_x):
    # what: no detections, an index beyond the detections, a class with no detection, a degenerate
    # explicit box and a Box target given to a classifier each raise a clear SaliencyError
    empty = Detector(lambda im: (np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int)), num_classes=1)
    photo = square_photo()
    with pytest.raises(SaliencyError, match="found no objects"):
        drise(empty, photo, n_masks=4)
    with pytest.raises(SaliencyError, match="found no objects"):
        drise(empty, photo, Box(0), n_masks=4)
    with pytest.raises(SaliencyError, match=r"Box\(5\) but squares found 2"):
        drise(squares, photo, Box(5), n_masks=4)
    only_left = Detector(lambda im: square_detector(im) if False else
                         (np.array([SQUARES[0]], dtype=float), np.array([0.9]), np.array([0])),
                         num_classes=2, class_names=["left", "right"], name="left")
    with pytest.raises(SaliencyError, match="no detection of class 'right'"):
        drise(only_left, photo, Box(label="right"), n_masks=4)
    with pytest.raises(SaliencyError, match="x2 > x1"):
        drise(squares, photo, Box(box=(10, 10, 5, 20)), n_masks=4)
    with pytest.raises(SaliencyError, match="explains a detector"):
        sk.explain(tiny, tiny_x, "saliency", target=Box(0))
    with pytest.raises(SaliencyError, match="unknown detector"):
        load_detector("yolo9000")


def test_torchvision_detector_adapter():
    # what: a torchvision detection model (random weights: none ship offline) answers through the
    # adapter with boxes in photo pixels and 91-long class vectors; why: list-of-dicts outputs
    torch.manual_seed(0)
    det = load_detector("torchvision:ssdlite320_mobilenet_v3_large:random")
    out = det.detect([np.full((48, 64, 3), 128, dtype=np.uint8)])[0]
    assert out.boxes.shape[1] == 4 and out.probs.shape == (len(out), 91)
    if len(out):
        assert float(out.boxes[:, 2].max()) <= 64 and float(out.boxes[:, 3].max()) <= 48


def _cascade_available():
    try:
        import cv2

        return os.path.exists(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    except (ImportError, AttributeError):
        return False


@pytest.mark.skipif(not _cascade_available(), reason="OpenCV Haar cascade files absent (opencv-python>=5 shadows them)")
def test_drise_astronaut_face_with_opencv_cascade():
    # what: on the astronaut's head (crop 256 px, resized to 128 for speed) the face cascade's D-RISE
    # map puts over twice its area share of positive (centred) mass inside the face box, and
    # blacking out the map's top 5 % makes the face detection disappear; why: a real black-box
    # detector explained by its own behaviour
    det = load_detector("opencv:haarcascade_frontalface_default")
    img = data.image("astronaut").crop((100, 0, 356, 256)).resize((128, 128))
    e = drise(det, img, Box(0), n_masks=100, cell=8, seed=0, batch_size=50, center=True)
    x1, y1, x2, y2 = [int(round(v)) for v in e.extras["boxes"][0]]
    face_x1, face_y1, face_x2, face_y2 = [(v - o) / 2 for v, o in zip(data.boxes("astronaut")[1]["box"],
                                                                       (100, 0, 100, 0))]
    assert abs(x1 - face_x1) < 8 and abs(y1 - face_y1) < 8  # the cascade finds the hand-drawn face
    m = e.maps[0]
    inside = torch.zeros_like(m, dtype=torch.bool)
    inside[y1:y2, x1:x2] = True
    pos = m.clamp_min(0)
    assert float(pos[inside].sum() / pos.sum()) > 2 * float(inside.float().mean())
    top = m >= m.flatten().topk(int(0.05 * m.numel())).values[-1]
    hidden = np.asarray(img).copy()
    hidden[top.numpy()] = 0
    assert len(det.detect([hidden])[0]) == 0
    assert len(det.detect([np.asarray(img)])[0]) == 1


def test_gradcam_on_a_torchvision_detector():
    # what: Grad-CAM of one detection of a torchvision Faster R-CNN (random weights) comes back at
    # photo size, non-negative, with a non-zero gradient reaching the backbone, and the model is
    # left as found; a box matching no output raises; why: gradient CAMs where gradients exist
    from saliencykit.tasks.detection import detector_gradcam
    from saliencykit.subject import count_hooks

    torch.manual_seed(0)
    det = load_detector("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn:random")
    photo = np.asarray(data.image("astronaut").resize((96, 80)))
    flags = [m.training for m in det.model.modules()]
    e = detector_gradcam(det, photo, Box(0))
    assert e.maps.shape == (1, 80, 96) and (e.maps >= 0).all()
    assert e.layer.startswith("backbone.body") and e.extras["gradient_norm"] > 0
    assert flags == [m.training for m in det.model.modules()] and count_hooks(det.model) == 0
    assert all(p.grad is None for p in det.model.parameters())
    with pytest.raises(SaliencyError, match="matches the target|not among"):
        detector_gradcam(det, photo, Box(box=(0, 0, 3, 3), label=1))
    with pytest.raises(SaliencyError, match="torchvision detection model"):
        detector_gradcam(Detector(square_detector, num_classes=2), square_photo())
    # the one explain path gives the same map, charged 2 forwards (clean + differentiable) and 1 backward
    via = sk.explain(det, photo, "gradcam", target=Box(0))
    assert torch.equal(via.maps, e.maps) and via.passes["forward"] == 2 and via.passes["backward"] == 1


def test_skimage_lbp_face_detector_finds_the_astronaut():
    # what: the scikit-image LBP cascade adapter finds the astronaut's face with IoU > 0.6 against the
    # hand-drawn face box (photo at 256 px); why: a second real detector behind the same protocol
    det = load_detector("skimage:lbp_frontal_face")
    found = det.detect([data.image("astronaut").resize((256, 256))])[0]
    face = torch.tensor(data.boxes("astronaut")[1]["box"], dtype=torch.float64) / 2
    assert len(found) >= 1
    assert float(box_iou(face[None], found.boxes).max()) > 0.6
