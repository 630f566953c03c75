"""Inputs that were silently wrong or wrongly refused: each has a decision (docs/troubleshooting.md).

Errors name the file; skips are counted in the reader stats; valid inputs are read as their format means them.
"""

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from fl_rpn.data import DetectionDataset, check_dataset, ensure_synthetic, read_coco, read_dataset, read_voc, read_yolo
from fl_rpn.data.dataset import image_size


def rewrite(annotations, change):
    data = json.loads(annotations.read_text())
    change(data)
    annotations.write_text(json.dumps(data))


# --- COCO ----------------------------------------------------------------------------------------------------


def test_coco_image_listed_twice_is_an_error(coco_files):
    images, annotations = coco_files
    rewrite(annotations, lambda d: d["images"].append({"id": 8, "file_name": "a.png", "width": 40, "height": 30}))
    with pytest.raises(ValueError, match=r"instances\.json: file_name 'a\.png' is listed under two image ids, 7 and 8"):
        read_coco(images, annotations)


def test_coco_duplicate_annotation_ids_are_counted_and_all_read(coco_files, caplog):
    images, annotations = coco_files
    rewrite(annotations, lambda d: d["annotations"][4].update(id=1))  # b.png's box reuses a.png's id 1
    with caplog.at_level(logging.WARNING):
        records, _, stats = read_coco(images, annotations)
    assert stats["duplicate_annotation_ids"] == 1
    assert "instances.json: 1 annotation(s) reuse an id already taken; all are read here" in caplog.text
    b, a = records[1], records[2]
    np.testing.assert_array_equal(b.boxes, [[1, 1, 5, 3]])  # both annotations with id 1 are read
    np.testing.assert_array_equal(a.boxes[0], [2, 3, 12, 8])


def test_coco_boxes_normalised_to_unit_range_are_named_as_such(coco_files):
    images, annotations = coco_files

    def normalise(d):
        for a in d["annotations"]:
            a["bbox"] = [0.1, 0.2, 0.3, 0.25]

    rewrite(annotations, normalise)
    for train in (True, False):
        with pytest.raises(ValueError, match=r"instances\.json: every coordinate of all 5 boxes is <= 1, so 5 of them "
                           r"are <= 1 px wide or high: the boxes look normalised to \[0, 1\]"):  # fmt: skip
            read_coco(images, annotations, train=train)


def test_coco_split_mostly_degenerate_warns_and_the_empty_split_says_why(coco_files, caplog):
    images, annotations = coco_files

    def flatten(d):
        for a in d["annotations"]:
            a["bbox"] = [a["bbox"][0], a["bbox"][1], 0.5, 4]  # not normalised, but every box 0.5 px wide

    rewrite(annotations, flatten)
    with caplog.at_level(logging.WARNING):
        records, meta, stats = read_coco(images, annotations, keep_empty=False)
    assert "instances.json: 5 of 5 boxes are <= 1 px wide or high (dropped for training)" in caplog.text
    report = check_dataset(DetectionDataset(records, meta, stats=stats), "dataset.train")
    assert report.problems == [
        "the dataset has no images: all 3 were dropped as having no boxes (keep_empty: false), after 5 boxes <= 1 px "
        "wide or high were dropped (see the reader's warning above; are the boxes in pixels?)"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        read_coco(images, annotations, train=False)
    assert "5 of 5 boxes are <= 1 px wide or high (kept in the evaluation ground truth)" in caplog.text


def test_missing_coco_folder_says_how_data_root_is_set(tmp_path):
    node = {"format": "coco", "images": str(tmp_path / "data/coco/train2017"), "annotations": str(tmp_path / "x")}
    hint = r"under data_root, which is the FL_RPN_DATA environment variable, else \./data: set FL_RPN_DATA or"
    with pytest.raises(FileNotFoundError, match=r"train2017 does not exist\. .*" + hint):
        read_dataset(node)
    (tmp_path / "data/coco/train2017").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"COCO annotation file .*x does not exist\. .*FL_RPN_DATA"):
        read_dataset(node)
    # A file inside the dataset, not a configured path: no hint.
    list_file = write_voc_set(tmp_path / "voc", ["000001"])
    list_file.write_text("000001\n000404\n")
    with pytest.raises(FileNotFoundError, match=r"000404\.xml \(listed in .*trainval\.txt\) does not exist\.$"):
        read_dataset({"format": "voc", "root": str(tmp_path / "voc"), "sets": [[2007, "trainval"]]})


# --- VOC -----------------------------------------------------------------------------------------------------


def write_voc_set(root, ids, list_bytes=None):
    base = root / "VOC2007"
    (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (base / "Annotations").mkdir(exist_ok=True)
    for name in set(ids):
        box = "<xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>20</ymax>"
        obj = f"<object><name>dog</name><bndbox>{box}</bndbox></object>"
        (base / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><size><width>50</width><height>40</height></size>{obj}</annotation>"
        )
    list_file = base / "ImageSets" / "Main" / "trainval.txt"
    list_file.write_bytes(list_bytes if list_bytes is not None else ("\n".join(ids) + "\n").encode())
    return list_file


def test_voc_id_listed_twice_is_read_once_and_counted(tmp_path, caplog):
    write_voc_set(tmp_path, ["000001", "000002", "000001"])
    with caplog.at_level(logging.WARNING):
        records, _, stats = read_voc(tmp_path)
    assert [r.source_id for r in records] == ["000001", "000002"] and [r.image_id for r in records] == [0, 1]
    assert stats["duplicate_ids_skipped"] == 1
    assert "trainval.txt: 1 id(s) listed before are skipped" in caplog.text
    # The same set listed twice (07 + 07): read once.
    records, _, stats = read_voc(tmp_path, [("2007", "trainval"), ("2007", "trainval")])
    assert len(records) == 2 and stats["duplicate_ids_skipped"] == 4


def test_voc_image_list_with_a_utf8_bom_is_read(tmp_path):
    write_voc_set(tmp_path, ["000001", "000002"], list_bytes=b"\xef\xbb\xbf000001\r\n000002\r\n")
    records, _, _ = read_voc(tmp_path)
    assert [r.source_id for r in records] == ["000001", "000002"]
    np.testing.assert_array_equal(records[0].boxes, [[0, 1, 10, 20]])


# --- YOLO ----------------------------------------------------------------------------------------------------


@pytest.fixture
def yolo_root(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "data.yaml").write_text("names: [cat, dog]\n")
    return tmp_path


def test_yolo_images_in_nested_sub_folders_are_found_with_their_labels(yolo_root, image_writer):
    images, labels = yolo_root / "images", yolo_root / "labels"
    names = ["a", "b", "x/c", "x/d", "x/y/e", "z/f"]
    for i, name in enumerate(names):
        image_writer(images / f"{name}.png", 100, 50)
        (labels / name).parent.mkdir(parents=True, exist_ok=True)
        (labels / f"{name}.txt").write_text(f"{i % 2} 0.5 0.5 0.2 0.4\n")
    (labels / "x" / "orphan.txt").write_text("")
    records, _, stats = read_yolo(images, labels, yolo_root / "data.yaml")
    assert [r.source_id for r in records] == names
    assert [r.labels.tolist() for r in records] == [[1], [2], [1], [2], [1], [2]]
    np.testing.assert_array_equal(records[4].boxes, [[40, 15, 60, 35]])
    assert stats["missing_label_files"] == 0 and stats["label_files_without_image"] == 1


def test_yolo_images_sharing_a_stem_are_an_error(yolo_root, image_writer):
    image_writer(yolo_root / "images" / "a.jpg", 20, 20)
    image_writer(yolo_root / "images" / "a.png", 20, 20)
    with pytest.raises(ValueError, match=r"YOLO images .*a\.jpg and .*a\.png would share the label file .*a\.txt"):
        read_yolo(yolo_root / "images", yolo_root / "labels", yolo_root / "data.yaml")


def test_yolo_label_file_with_a_bom_and_float_classes_is_read(yolo_root, image_writer):
    image_writer(yolo_root / "images" / "a.png", 100, 50)
    (yolo_root / "labels" / "a.txt").write_bytes(b"\xef\xbb\xbf0.0 0.5 0.5 0.2 0.4\r\n1.0 0.25 0.5 0.5 1.0\r\n")
    records, _, _ = read_yolo(yolo_root / "images", yolo_root / "labels", yolo_root / "data.yaml")
    np.testing.assert_array_equal(records[0].labels, [1, 2])
    np.testing.assert_array_equal(records[0].boxes, [[40, 15, 60, 35], [0, 0, 50, 50]])
    (yolo_root / "labels" / "a.txt").write_text("1.5 0.5 0.5 0.2 0.4\n")
    with pytest.raises(ValueError, match=r"a\.txt, line 1: cannot parse .*: the class 1\.5 is not a whole number"):
        read_yolo(yolo_root / "images", yolo_root / "labels", yolo_root / "data.yaml")


def test_image_over_pil_pixel_limit_is_read_and_a_pil_decode_names_the_file(yolo_root, image_writer, monkeypatch):
    # As a 14000 x 14000 image against PIL's default limit: 60 x 50 = 3000 pixels > 2 x 1000 raises in Image.open.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    images = yolo_root / "images"
    image_writer(images / "big.png", 60, 50)
    Image.new("RGB", (60, 50), (200, 0, 0)).save(images / "big2.bmp")
    (yolo_root / "labels" / "big.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    records, meta, _ = read_yolo(images, yolo_root / "labels", yolo_root / "data.yaml")
    assert [(r.file.name, r.width, r.height) for r in records] == [("big.png", 60, 50), ("big2.bmp", 60, 50)]
    np.testing.assert_array_equal(records[0].boxes, [[15, 12.5, 45, 37.5]])
    ds = DetectionDataset(records, meta, train=False)
    assert check_dataset(ds, "yolo", depth="header").ok
    assert ds[0][0].shape == (3, 50, 60)  # torchvision.io decodes it, as the COCO path does
    with pytest.raises(ValueError, match=r"Image .*big2\.bmp cannot be decoded: PIL refuses it as a possible "
                       r"decompression bomb .*PIL\.Image\.MAX_IMAGE_PIXELS"):  # fmt: skip
        ds[1]
    assert Image.MAX_IMAGE_PIXELS == 1000  # the limit is back


# --- EXIF orientation ----------------------------------------------------------------------------------------


def write_rotated(path, orientation=6):
    """A 60 x 40 (WxH) stored image with a white 20 x 10 block at the stored top-left and an EXIF orientation.

    Orientation 6 (the camera was turned 90 degrees clockwise) displays it 40 x 60, with the block at the top-right:
    x 30..40, y 0..20. Returns that displayed box [1, 4] xyxy."""
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[0:10, 0:20] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return torch.tensor([[30.0, 0, 40, 20]])


def object_box(image):
    """The xyxy box [1, 4] of the bright pixels of a float [3, H, W] image."""
    ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
    return torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif"])
def test_yolo_exif_rotated_image_puts_its_boxes_on_the_object(yolo_root, suffix):
    truth = write_rotated(yolo_root / "images" / f"a{suffix}")
    assert image_size(yolo_root / "images" / f"a{suffix}") == (40, 60)
    # The label, normalised in the displayed image (as every labelling tool shows it): cx 35/40, cy 10/60.
    (yolo_root / "labels" / "a.txt").write_text(f"0 {35 / 40} {10 / 60} {10 / 40} {20 / 60}\n")
    records, meta, _ = read_yolo(yolo_root / "images", yolo_root / "labels", yolo_root / "data.yaml")
    assert (records[0].width, records[0].height) == (40, 60)
    ds = DetectionDataset(records, meta, train=False)
    assert check_dataset(ds, "yolo", depth="header").ok and check_dataset(ds, "yolo", depth="decode").ok
    image, target = ds[0]
    assert image.shape == (3, 60, 40)
    torch.testing.assert_close(object_box(image), truth)
    assert box_iou(target["boxes"], truth).item() == pytest.approx(1.0, abs=1e-5)


def test_coco_exif_rotated_image_is_compared_with_its_displayed_size(tmp_path):
    (tmp_path / "images").mkdir()
    truth = write_rotated(tmp_path / "images" / "a.jpg")
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 60}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [30, 0, 10, 20], "area": 200}],
        "categories": [{"id": 1, "name": "block"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(data))
    ds = DetectionDataset(*read_coco(tmp_path / "images", tmp_path / "a.json")[:2], train=False)
    assert check_dataset(ds, "coco", depth="header").ok and check_dataset(ds, "coco", depth="decode").ok
    image, target = ds[0]
    torch.testing.assert_close(object_box(image), truth)
    assert box_iou(target["boxes"], truth).item() == 1.0
    # Annotated with the stored size: the problem says the EXIF tag turns it.
    data["images"][0].update(width=60, height=40)
    (tmp_path / "a.json").write_text(json.dumps(data))
    ds = DetectionDataset(*read_coco(tmp_path / "images", tmp_path / "a.json")[:2], train=False)
    (problem,) = check_dataset(ds, "coco", depth="header").problems
    assert problem.startswith(f"{tmp_path / 'images' / 'a.jpg'}: image is 40x60 (WxH) but its annotations say 60x40 "
                              "(its size before the 90-degree turn of its EXIF orientation tag")  # fmt: skip
    with pytest.raises(ValueError, match=r"a\.jpg is 40x60 \(WxH\) but its annotations say 60x40 \(its size before"):
        ds[0]


# --- the synthetic cache ---------------------------------------------------------------------------------------


def test_synthetic_cache_honours_the_umask_and_logs_its_path(tmp_path, caplog):
    old = os.umask(0o022)
    try:
        with caplog.at_level(logging.INFO):
            images, annotations = ensure_synthetic(tmp_path / "cache", "val", 2, 0, image_size=[32, 32])
    finally:
        os.umask(old)
    split = images.parent
    assert oct(split.stat().st_mode & 0o777) == oct(0o755)
    assert oct(images.stat().st_mode & 0o777) == oct(0o755)
    assert oct(annotations.stat().st_mode & 0o777) == oct(0o644)
    assert f"synthetic val split: generating 2 images in {split}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ensure_synthetic(tmp_path / "cache", "val", 2, 0, image_size=[32, 32])
    assert f"synthetic val split: {split} (cached)" in caplog.text


# --- a split without boxes ---------------------------------------------------------------------------------------


def test_a_training_split_without_a_box_is_refused_and_an_empty_val_split_is_warned_about(coco_files, caplog):
    """COCO with keep_empty=true and no annotations (or only crowd ones): nothing to learn; refused before training.
    The same json as the val split (its crowd boxes are kept, and ignored by the metrics) is only a warning: AP and AR
    are undefined without objects to find."""
    from fl_rpn.config import compose_config
    from fl_rpn.engine.build import build_datasets

    images, annotations = coco_files
    rewrite(annotations, lambda d: d.update(annotations=[a for a in d["annotations"] if a["iscrowd"]]))
    from omegaconf import open_dict

    cfg = compose_config(["check_val_images=false"])
    with open_dict(cfg):
        for split in ("train", "val"):
            cfg.dataset[split] = {"format": "coco", "images": str(images), "annotations": str(annotations),
                                  "keep_empty": True}  # fmt: skip
    with pytest.raises(ValueError, match=r"^dataset\.train: none of its 3 images has a box to train on .* nothing can "
                       r"be learnt"):  # fmt: skip
        build_datasets(cfg)
    with caplog.at_level(logging.WARNING):
        from types import SimpleNamespace

        from fl_rpn.engine.build import require_boxes

        train_set = SimpleNamespace(records=[SimpleNamespace(ignore=np.array([False]))])  # one box to learn
        val_set = DetectionDataset(*read_coco(images, annotations, train=False, keep_empty=True)[:2], train=False)
        require_boxes(train_set, val_set)
    assert "dataset.val: none of its 3 images has a box: AP and AR are undefined (NaN)" in caplog.text
