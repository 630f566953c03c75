"""Messy data fails before training with the file and the problem named, or is skipped and counted.

Policy (docs/troubleshooting.md): errors for what cannot be right (a missing or unreadable file, a
malformed annotation, an unknown class, a NaN or a negative-size box, an empty split); clip-and-count for boxes
reaching outside the image; drop-and-count for boxes <= 1 px; keep-and-count for images without boxes.
"""

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from fl_rpn.cli.check_data import check_data
from fl_rpn.config import compose_config
from fl_rpn.data import (
    DatasetMeta,
    DetectionDataset,
    build_dataset,
    check_dataset,
    read_coco,
    read_voc,
    read_yolo,
    require_valid,
)
from fl_rpn.engine.trainer import train

from ..conftest import TINY_DATA, run_app


def coco_node(images, annotations, **kw):
    return {"format": "coco", "images": str(images), "annotations": str(annotations), **kw}


def rewrite(annotations, change):
    data = json.loads(annotations.read_text())
    data = change(data) or data
    annotations.write_text(json.dumps(data))


# --- image files -----------------------------------------------------------------------------------------


def test_missing_image_is_found_before_training(coco_files):
    images, annotations = coco_files
    (images / "b.png").unlink()
    ds = build_dataset(coco_node(images, annotations), train=True)
    with pytest.raises(
        ValueError, match=r"dataset\.train: 3 images.*\n.*\n.*1 problem.*\n.*b\.png: image file does not exist"
    ):
        require_valid({"dataset.train": ds})


def test_train_stops_on_a_missing_image_before_building_anything(coco_files, tmp_path):
    images, annotations = coco_files
    (images / "a.png").unlink()
    paths = [
        f"dataset.{s}.{k}={v}" for s in ("train", "val") for k, v in (("images", images), ("annotations", annotations))
    ]
    cfg = compose_config(["dataset=coco", *paths, f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"a\.png: image file does not exist") as info:
        train(cfg)
    assert "dataset.train" in str(info.value) and "dataset.val" in str(info.value)
    assert not (tmp_path / "run" / "tb").exists()  # the model and the writer come after the check


def test_truncated_non_image_and_wrong_size_files(coco_files, image_writer):
    images, annotations = coco_files
    data = (images / "a.png").read_bytes()
    (images / "a.png").write_bytes(data[: len(data) // 2])  # truncated: the header is intact
    (images / "c.png").write_text("<html>not found</html>")  # an error page saved as an image
    image_writer(images / "b.png", 30, 10)  # the annotations say 20x10
    ds = build_dataset(coco_node(images, annotations), train=False)

    assert check_dataset(ds, "val", depth="exists").ok
    header = check_dataset(ds, "val", depth="header").problems
    assert len(header) == 2
    assert any("c.png: not a readable image" in p for p in header)
    assert any("b.png: image is 30x10 (WxH) but its annotations say 20x10" in p for p in header)
    decoded = check_dataset(ds, "val", depth="decode").problems
    assert len(decoded) == 3 and any("a.png: not a readable image" in p for p in decoded)

    index = [r.file.name for r in ds.records].index("a.png")
    with pytest.raises(ValueError, match=r"a\.png cannot be decoded"):
        ds[index]


def test_empty_split_is_an_error(coco_files):
    images, annotations = coco_files
    rewrite(annotations, lambda d: d.update(images=[], annotations=[]))
    ds = build_dataset(coco_node(images, annotations), train=True)
    with pytest.raises(ValueError, match=r"dataset\.train: 0 images(.|\n)*the dataset has no images"):
        require_valid({"dataset.train": ds})
    empty = DetectionDataset([], DatasetMeta(["a"], [1]))
    assert not check_dataset(empty, "x").ok


# --- COCO annotation files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: [d], r"expected a JSON object with 'images', 'annotations' and 'categories', got a list"),
        (lambda d: d.pop("images") and None, r"has no 'images' list"),
        (lambda d: d.pop("annotations") and None, r"has no 'annotations' list"),
        (lambda d: d["images"][0].pop("width") and None, r"images\[0\] \(id 7\) lacks \['width'\]"),
        (lambda d: d["images"][1].update(height="16"), r"images\[1\] has a non-numeric id, width or height"),
        (lambda d: d["annotations"][0].pop("bbox") and None, r"annotations\[0\] \(id 1\) lacks \['bbox'\]"),
        (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), r"annotations\[1\] \(id 2\) has bbox \[1, 2, 3\]"),
        (lambda d: d["images"].append(dict(d["images"][0])), r"id 7 appears more than once in 'images'"),
        (lambda d: d["annotations"][0].update(category_id=2), r"annotation 1 has category_id 2, which is not in"),
        (lambda d: d["annotations"][3].update(bbox=[5, 5, -3, 4]), r"image_id 7: annotation 4 .* negative width"),
        (lambda d: d["annotations"][4].update(bbox=[1, float("nan"), 2, 2]), r"image_id 5: annotation 5 .* NaN"),
        (lambda d: d["annotations"][4].update(bbox=[1, 1, float("inf"), 2]), r"annotation 5 .* NaN or infinite"),
        (lambda d: d["images"][2].update(width=0), r"image_id 5: image size 0x10 \(WxH\) is not positive"),
        (lambda d: d["images"][2].update(width=float("inf")), r"image_id 5: image size infx10 .* and finite"),
        (lambda d: d["images"][0].update(file_name=None), r"images\[0\] \(id 7\) has file_name None; expected a path"),
        (lambda d: d["images"][1].update(file_name=3), r"images\[1\] \(id 3\) has file_name 3; expected a path"),
        (lambda d: d["categories"][0].update(id=[90]), r"categories\[0\] needs a numeric id and a string name"),
        (lambda d: d["categories"][1].update(name=None), r"categories\[1\] needs a numeric id and a string name"),
        (lambda d: d["annotations"][2].pop("id") and None, r"annotations\[2\] \(id None\) lacks \['id'\]"),
        (lambda d: d["annotations"][2].update(image_id=[7]), r"annotations\[2\] has a non-numeric id, image_id or"),
        (lambda d: d["annotations"][2].update(category_id="5"), r"annotations\[2\] has a non-numeric id, image_id or"),
        (lambda d: d["annotations"][1].update(bbox="0 0 20 20"), r"annotations\[1\] \(id 2\) has bbox '0 0 20 20'"),
        (lambda d: d["annotations"][0].update(area="big"), r"annotations\[0\] \(id 1\) has area 'big'; expected a"),
        (lambda d: d["annotations"][0].update(iscrowd="no"), r"annotations\[0\] \(id 1\) has iscrowd 'no'; expected"),
    ],
)
def test_bad_coco_annotations_name_the_file_and_entry(coco_files, change, message):
    images, annotations = coco_files
    rewrite(annotations, change)
    with pytest.raises(ValueError, match=r"COCO annotation file .*instances\.json.*" + message):
        read_coco(images, annotations)


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"images": [], "annotations": [', r"is not valid JSON: Expecting value"),  # truncated
        ("", r"is not valid JSON"),
        (b'{"images": "\xff"}', r"is not valid JSON: 'utf-8' codec can't decode"),
    ],
)
def test_coco_file_that_is_not_json_is_named(coco_files, text, message):
    images, annotations = coco_files
    annotations.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=r"COCO annotation file .*instances\.json " + message):
        read_coco(images, annotations)


def test_coco_boxes_outside_the_image_are_clipped_or_dropped_and_counted(coco_files):
    images, annotations = coco_files

    def change(d):
        d["annotations"][4]["bbox"] = [-5, -5, 10, 10]  # b.png is 20x10: clipped to [0, 0, 5, 5]
        d["annotations"].append({"id": 9, "image_id": 5, "category_id": 1, "bbox": [50, 50, 5, 5]})  # outside
        d["annotations"].append({"id": 10, "image_id": 404, "category_id": 1, "bbox": [1, 1, 5, 5]})  # no image

    rewrite(annotations, change)
    records, _, stats = read_coco(images, annotations)
    b = next(r for r in records if r.image_id == 5)
    np.testing.assert_array_equal(b.boxes, [[0, 0, 5, 5]])
    assert stats["boxes_clipped"] == 2  # this one and a.png's [35, 25, 10, 10]
    assert stats["degenerate_boxes_dropped"] == 2  # the one outside and a.png's 0.5 px wide one
    assert stats["annotations_without_image"] == 1


# --- YOLO ------------------------------------------------------------------------------------------------


@pytest.fixture
def yolo_files(tmp_path, image_writer):
    images, labels = tmp_path / "images", tmp_path / "labels"
    image_writer(images / "a.png", 100, 50)
    labels.mkdir()
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n")
    (tmp_path / "data.yaml").write_text("names: [cat, dog]\n")
    return images, labels, tmp_path / "data.yaml"


@pytest.mark.parametrize(
    "line,message",
    [
        ("0 0.5 0.5 0.2", r"line 2: expected 'cls cx cy w h'"),
        ("0 0.5 0.5 0.2 0.4 0.9", r"line 2: expected 'cls cx cy w h'"),
        ("2 0.5 0.5 0.2 0.4", r"line 2: class 2 is outside 0\.\.1"),
        ("-1 0.5 0.5 0.2 0.4", r"line 2: class -1 is outside"),
        ("0 1.5 0.5 0.2 0.4", r"line 2: cx cy w h must be normalised to \[0, 1\]"),
        ("0 0.5 0.5 -0.2 0.4", r"line 2: cx cy w h must be normalised"),
        ("0 0.5 nan 0.2 0.4", r"line 2: cx cy w h must be normalised"),
        ("0 0.5 0.5 0.2 x", r"line 2: cannot parse"),
        ("0.5 0.5 0.5 0.2 0.4", r"line 2: cannot parse"),
    ],
)
def test_bad_yolo_label_lines_name_the_file_and_line(yolo_files, line, message):
    images, labels, names = yolo_files
    (labels / "a.txt").write_text(f"1 0.5 0.5 0.2 0.4\n{line}\n")
    with pytest.raises(ValueError, match=r"YOLO label file .*a\.txt, " + message):
        read_yolo(images, labels, names)


def test_yolo_label_file_that_is_not_utf8_is_named(yolo_files):
    images, labels, names = yolo_files
    (labels / "a.txt").write_bytes(b"0 0.5 0.5 0.2 0.4\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"YOLO label file .*a\.txt is not UTF-8 text"):
        read_yolo(images, labels, names)


@pytest.mark.parametrize(
    "content,message",
    [
        (None, r"YOLO data yaml .*data\.yaml does not exist"),
        ("names: [cat, dog\n  : : x\n", r"YOLO data yaml .*data\.yaml is not valid YAML"),
        (b"names: [\xff]\n", r"YOLO data yaml .*data\.yaml is not valid YAML"),
        ("nc: 2\n", r"YOLO data yaml .*data\.yaml has no 'names' key"),
        ("- cat\n- dog\n", r"YOLO data yaml .*data\.yaml has no 'names' key"),
        ("names:\n", r"YOLO class names in .*data\.yaml must be a list or an \{index: name\} dict, got None"),
        ("names: cat\n", r"YOLO class names in .*data\.yaml must be a list .* got 'cat'"),
        ("names: {cat: 0, dog: 1}\n", r"YOLO class names in .*data\.yaml must be indexed 0\.\.1 without gaps"),
        ("names: {0: cat, 2: dog}\n", r"YOLO class names in .*data\.yaml must be indexed 0\.\.1 without gaps"),
        ("names: []\n", r"YOLO class names in .*data\.yaml are empty"),
    ],
)
def test_bad_yolo_data_yaml_names_the_file(yolo_files, content, message):
    images, labels, names = yolo_files
    if content is None:
        names.unlink()
    else:
        names.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_yolo(images, labels, names)


@pytest.mark.parametrize(
    "category_ids,message",
    [
        ({0: 3}, r"category_ids has no entry for the class indices \[1\] \(of 0\.\.1\)"),
        (["a", "b"], r"category_ids must be integers, got \['a', 'b'\]"),
    ],
)
def test_bad_yolo_category_ids_are_named(yolo_files, category_ids, message):
    images, labels, names = yolo_files
    with pytest.raises(ValueError, match=message):
        read_yolo(images, labels, names, category_ids=category_ids)


def test_yolo_boxes_past_the_border_are_clipped_and_counted(yolo_files):
    images, labels, names = yolo_files
    (labels / "a.txt").write_text("0 0.95 0.5 0.2 0.4\n")  # x from 85 to 105 in a 100 px wide image
    records, _, stats = read_yolo(images, labels, names)
    np.testing.assert_allclose(records[0].boxes, [[85, 15, 100, 35]])
    assert stats["boxes_clipped"] == 1


def test_yolo_file_that_is_not_an_image(yolo_files):
    images, labels, names = yolo_files
    (images / "b.jpg").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"YOLO image .*b\.jpg is not a readable image"):
        read_yolo(images, labels, names)


def test_bmp_and_tiff_images_decode_through_pil(yolo_files):
    from PIL import Image

    images, labels, names = yolo_files
    Image.new("RGB", (12, 8), (10, 20, 30)).save(images / "b.bmp")
    Image.new("RGB", (12, 8), (10, 20, 30)).save(images / "c.tif")
    ds = DetectionDataset(*read_yolo(images, labels, names)[:2], train=False)
    assert check_dataset(ds, "yolo", depth="decode").ok
    image, _ = ds[1]
    assert image.shape == (3, 8, 12) and abs(image[2, 0, 0].item() - 30 / 255) < 1e-6


# --- VOC -------------------------------------------------------------------------------------------------


def write_voc(root, name, xml, image_writer=None):
    base = root / "VOC2007"
    (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (base / "Annotations").mkdir(exist_ok=True)
    (base / "ImageSets" / "Main" / "trainval.txt").write_text(f"{name}\n")
    (base / "Annotations" / f"{name}.xml").write_text(xml)
    if image_writer:
        image_writer(base / "JPEGImages" / f"{name}.jpg", 50, 40)


def voc_xml(objects="", size="<width>50</width><height>40</height>"):
    return f"<annotation><size>{size}<depth>3</depth></size>{objects}</annotation>"


def voc_obj(x1="1", y1="2", x2="10", y2="20", name="dog", difficult="0"):
    box = f"<xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
    return f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>{box}</bndbox></object>"


@pytest.mark.parametrize(
    "xml,message",
    [
        (voc_xml(voc_obj(x1="abc")), r"<bndbox><xmin> is 'abc', not a number"),
        (voc_xml(voc_obj(y2="")), r"has no <ymax> under <bndbox>"),
        (voc_xml(voc_obj().replace("<xmax>10</xmax>", "")), r"has no <xmax> under <bndbox>"),
        (voc_xml(voc_obj(x1="30", x2="10")), r"object 0 \(dog\) .* negative width or height"),
        (voc_xml("<object><name>dog</name></object>"), r"has an object 'dog' without <bndbox>"),
        (voc_xml(size="<width>0</width><height>40</height>"), r"image size 0x40 \(WxH\) is not positive"),
        (voc_xml(size="<width>fifty</width><height>40</height>"), r"<size><width> is 'fifty', not a number"),
        ("<annotation><size>", r"is not valid XML"),
        ("this is not XML", r"is not valid XML"),
        (voc_xml(voc_obj(difficult="yes")), r"object 0 \(dog\) <object><difficult> is 'yes', not a number"),
        (voc_xml(voc_obj() + voc_obj(name="cat", difficult="true")), r"object 1 \(cat\) <object><difficult> is 'true'"),
        (voc_xml(voc_obj() + voc_obj(name="cat", y1="2.5.1")), r"object 1 \(cat\) <bndbox><ymin> is '2\.5\.1'"),
        (voc_xml(voc_obj(x1="nan")), r"object 0 \(dog\) \[nan, 1\.0, 10\.0, 20\.0\] \(xyxy\) has a NaN or infinite"),
        (voc_xml(voc_obj(y2="inf")), r"object 0 \(dog\) \[0\.0, 1\.0, 10\.0, inf\] \(xyxy\) has a NaN or infinite"),
        (voc_xml(voc_obj(x2="-inf")), r"object 0 \(dog\) .* has a NaN or infinite coordinate"),
        (voc_xml(size="<width>nan</width><height>40</height>"), r"image size nanx40\.0 \(WxH\) is not finite"),
        (voc_xml(size="<width>50</width><height>inf</height>"), r"image size 50\.0xinf \(WxH\) is not finite"),
    ],
)
def test_bad_voc_xml_names_the_file(tmp_path, xml, message):
    write_voc(tmp_path, "000001", xml)
    with pytest.raises(ValueError, match=r"VOC annotation .*000001\.xml.*" + message):
        read_voc(tmp_path)


def test_voc_difficult_flag_is_read_as_a_number(tmp_path):
    flags = ["1", " 0 ", "1.0", "", " "]  # an empty flag, like a missing one, is not difficult
    write_voc(tmp_path, "000001", voc_xml("".join(voc_obj(difficult=f) for f in flags)))
    records, _, stats = read_voc(tmp_path)
    assert records[0].ignore.tolist() == [True, False, True, False, False] and stats["difficult_boxes"] == 2


def test_voc_image_list_that_is_not_utf8_is_named(tmp_path):
    write_voc(tmp_path, "000001", voc_xml())
    (tmp_path / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").write_bytes(b"\xff\xfe000001\n")
    with pytest.raises(ValueError, match=r"VOC image list .*trainval\.txt is not UTF-8 text"):
        read_voc(tmp_path)


def test_voc_xml_without_objects_is_a_counted_negative_image(tmp_path, image_writer):
    write_voc(tmp_path, "000001", voc_xml(), image_writer)
    records, _, stats = read_voc(tmp_path)
    assert records[0].boxes.shape == (0, 4) and stats["empty_images"] == 1


# --- fl-rpn-check-data -----------------------------------------------------------------------------------


def test_check_data_reports_both_splits_of_a_good_dataset(tmp_path):
    cfg = compose_config([f"cache_dir={tmp_path}", "dataset.train.num_images=4", "dataset.val.num_images=2",
                          "dataset.train.image_size=[64,64]", "dataset.val.image_size=[64,64]"])  # fmt: skip
    reports = check_data(cfg)
    assert [r.name for r in reports] == ["dataset.train", "dataset.val"]
    assert [r.images for r in reports] == [4, 2] and all(r.ok and r.depth == "decode" for r in reports)


@pytest.mark.parametrize(
    "override,message",
    [
        ("check_images=yes", r"config key check_images='yes': must be false, 'header' or 'decode'"),
        ("rpn.gamma=inf", r"config key rpn\.gamma=inf: must be a finite number >= 0"),
    ],
)
def test_check_data_validates_the_config_before_reading_any_data(tmp_path, override, message):
    cache = tmp_path / "cache"
    cfg = compose_config([f"cache_dir={cache}", override])
    with pytest.raises(ValueError, match=message):
        check_data(cfg)
    assert not cache.exists()  # the synthetic set was not generated


def test_check_data_command_exits_1_and_names_every_problem(coco_files, tmp_path):
    images, annotations = coco_files
    broken = tmp_path / "broken.json"
    broken.write_text(annotations.read_text().replace('"bbox": [1, 1, 4, 2]', '"bbox": [1, 1, 4]'))
    (images / "b.png").write_bytes(b"GIF89a")
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "fl_rpn.cli.check_data", "dataset=coco", f"dataset.train.images={images}",
         f"dataset.train.annotations={annotations}", f"dataset.val.images={images}",
         f"dataset.val.annotations={broken}", f"hydra.run.dir={tmp_path / 'out'}"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    out = proc.stdout
    # dataset=coco trains without empty images (keep_empty: false): c.png is dropped, and counted
    assert "dataset.train: 2 images, 4 boxes (1 ignored), 3 classes; images checked: decode" in out
    assert "boxes_clipped=1, degenerate_boxes_dropped=1, empty_images=1, empty_images_dropped=1" in out
    assert "b.png: not a readable image" in out
    assert "dataset.val" in out and "broken.json: annotations[4] (id 5) has bbox [1, 1, 4]" in out


def test_check_data_prints_the_boxes_and_images_of_each_class(tmp_path):
    """Per split, the classes most boxes first (ties in class order) with the images holding each, as counted from
    the synthetic annotation files themselves, then the ratio of the most to the least frequent class's boxes."""
    cache = tmp_path / "cache"
    out = run_app(*TINY_DATA, f"hydra.run.dir={tmp_path / 'out'}", cache=cache, module="fl_rpn.cli.check_data").stdout
    train_text, val_text = out.split("dataset.val:")
    for split, text in (("train", train_text), ("val", val_text)):
        (annotations,) = cache.glob(f"synthetic-*/{split}/annotations.json")
        coco = json.loads(annotations.read_text())
        boxes = Counter(a["category_id"] for a in coco["annotations"])
        images = Counter(c for _, c in {(a["image_id"], a["category_id"]) for a in coco["annotations"]})
        order = sorted(coco["categories"], key=lambda c: (-boxes[c["id"]], c["id"]))
        expected = [[c["name"], str(boxes[c["id"]]), str(images[c["id"]])] for c in order]
        lines = text.splitlines()
        start = lines.index("  boxes per class (ignored boxes left out), most first:")
        assert lines[start + 1].split() == ["class", "boxes", "images"]
        assert [line.split() for line in lines[start + 2 : start + 2 + len(expected)]] == expected
        (most, top), (least, bottom) = (expected[0][:2], expected[-1][:2])
        ratio = f"{int(top) / int(bottom):.1f}" if int(bottom) else f"inf ({least} has none)"
        assert lines[start + 2 + len(expected)] == (
            f"  most / least frequent class: {most} / {least} = {top} / {bottom} boxes = {ratio}"
        )
