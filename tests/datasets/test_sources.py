"""Image sources: each kind lists its images in a fixed order with ids, labels and ground truth,
and decodes them to RGB; problems known before decoding are named on the item."""
import json

import numpy as np
import pytest
from PIL import Image

from saliencykit import SaliencyError
from saliencykit.datasets import (BundledSource, FolderSource, HFSource, ListSource, PartsSource, TorchvisionSource,
                                  open_source)


def _png(path, colour=(200, 30, 30), size=(20, 16), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else 128).save(path)
    return path


def test_folder_imagefolder_layout_gives_labels_and_sorted_ids(tmp_path):
    _png(tmp_path / "dog" / "b.png")
    _png(tmp_path / "cat" / "a.png")
    _png(tmp_path / "cat" / "c.jpg")
    (tmp_path / ".hidden.png").write_bytes(b"skip me")
    src = open_source(str(tmp_path))
    assert isinstance(src, FolderSource) and src.has_labels
    items = src.items()
    assert [i.id for i in items] == ["cat/a.png", "cat/c.jpg", "dog/b.png"]   # sorted, hidden skipped
    assert [i.label for i in items] == ["cat", "cat", "dog"]
    d = src.decode(items[0])
    assert d.image.mode == "RGB" and d.image.size == (20, 16) and d.mode == "RGB"


def test_folder_flat_has_no_labels_and_names_non_images(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("hello")
    src = FolderSource(tmp_path)
    assert not src.has_labels
    items = {i.id: i for i in src.items()}
    assert items["a.png"].problem is None and items["a.png"].label is None
    assert "not an image file" in items["notes.txt"].problem
    with pytest.raises(SaliencyError, match="not an ImageFolder layout"):
        FolderSource(tmp_path, labels=True)


def test_folder_decode_errors_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    src = FolderSource(tmp_path)
    by_id = {i.id: i for i in src.items()}
    with pytest.raises(SaliencyError, match="empty file"):
        src.decode(by_id["empty.png"])
    with pytest.raises(SaliencyError, match="not a readable image"):
        src.decode(by_id["bad.jpg"])


def test_csv_and_jsonl_lists_with_labels_boxes_and_masks(tmp_path):
    _png(tmp_path / "img" / "a.png", size=(20, 10))
    _png(tmp_path / "img" / "b.png", size=(20, 10))
    mask = np.zeros((10, 20), np.uint8)
    mask[2:5, 3:9] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    (tmp_path / "list.csv").write_text("path,label,box,mask\nimg/a.png,cat,\"1,2,5,6\",\nimg/b.png,dog,,m.png\n")
    src = open_source(str(tmp_path / "list.csv"))
    assert isinstance(src, ListSource) and src.has_labels and src.has_masks
    a, b = src.items()
    assert (a.id, a.label, a.box) == ("img/a.png", "cat", (1.0, 2.0, 5.0, 6.0))
    da, db = src.decode(a), src.decode(b)
    assert da.mask.shape == (10, 20) and da.mask.sum() == 4 * 4 and da.mask[2:6, 1:5].all()
    assert np.array_equal(db.mask, mask > 0)
    lines = [json.dumps({"path": "img/a.png", "label": 3}), json.dumps({"path": "img/b.png"})]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    src = open_source(tmp_path / "list.jsonl")
    assert [i.label for i in src.items()] == [3, None]


def test_list_errors_are_named(tmp_path):
    (tmp_path / "x.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(SaliencyError, match="'path' column"):
        ListSource(tmp_path / "x.csv")
    (tmp_path / "y.jsonl").write_text('{"path": "a.png"}\nnot json\n')
    with pytest.raises(SaliencyError, match="y.jsonl:2: not valid JSON"):
        ListSource(tmp_path / "y.jsonl")
    (tmp_path / "z.csv").write_text("path,box\na.png,\"1,2,3\"\n")
    with pytest.raises(SaliencyError, match="box must be four numbers"):
        ListSource(tmp_path / "z.csv")


def test_torchvision_dataset_object():
    from torchvision.datasets import FakeData

    ds = FakeData(size=5, image_size=(3, 12, 10), num_classes=3, random_offset=0)
    src = open_source(ds)
    assert isinstance(src, TorchvisionSource) and src.has_labels
    items = src.items()
    assert [i.id for i in items] == [f"FakeData/{k}" for k in range(5)]
    d = src.decode(items[2])
    assert d.image.size == (10, 12) and d.label == int(ds[2][1])
    assert src.content_hash(items[2]) == src.content_hash(items[2])   # the same sample hashes the same


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    imgs = [Image.new("RGB", (8, 6), (i * 40, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": imgs, "label": [0, 1, 0]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.ClassLabel(names=["a", "b"])}))
    ds.save_to_disk(str(tmp_path / "hf"))
    src = open_source(f"hf:{tmp_path / 'hf'}")
    assert isinstance(src, HFSource) and src.has_labels
    items = src.items()
    assert [i.label for i in items] == ["a", "b", "a"]
    d = src.decode(items[1])
    assert d.image.size == (8, 6) and np.asarray(d.image)[0, 0, 0] == 40
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "hfd"))
    with pytest.raises(SaliencyError, match="name one as hf:"):
        open_source(f"hf:{tmp_path / 'hfd'}")
    assert len(open_source(f"hf:{tmp_path / 'hfd'}@validation").items()) == 3


def test_parts_source_masks_are_the_bird():
    from saliencykit.benchmarks.parts import dataset as parts

    src = open_source("parts:6")
    assert isinstance(src, PartsSource) and src.has_masks
    items = src.items()
    assert len(items) == 6 and items[0].id == "parts/0"
    d = src.decode(items[0])
    img, pmap = parts.render(src.scenes[0])
    assert np.array_equal(np.asarray(d.image), img)
    assert np.array_equal(d.mask, (pmap > 0) & (pmap < 100))   # body and parts, not canvas or clutter
    assert items[0].label == parts.labels()[src.scenes[0].class_id]


def test_bundled_source_boxes():
    src = open_source("bundled:chelsea,coffee")
    assert isinstance(src, BundledSource)
    d = src.decode(src.items()[0])
    assert d.mask is not None and 0 < d.mask.mean() < 1


def test_open_source_refuses_by_name(tmp_path):
    with pytest.raises(SaliencyError, match="no such directory"):
        open_source(str(tmp_path / "nope"))
    _png(tmp_path / "a.png")
    with pytest.raises(SaliencyError, match="is a file, not a source"):
        open_source(str(tmp_path / "a.png"))
    with pytest.raises(SaliencyError, match="parts:500"):
        open_source("parts:many")
