from pathlib import Path

import numpy as np
import pytest

from fl_rpn.data import VOC_CLASSES, read_voc

XML = """<annotation>
  <filename>{name}.jpg</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  {objects}
</annotation>"""
OBJ = """<object><name>{cls}</name><difficult>{difficult}</difficult>
  <bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"""


def write_voc(root: Path, year: str, split: str, images: dict, image_writer) -> None:
    """images: name -> (w, h, [(cls, difficult, x1, y1, x2, y2), ...])."""
    base = root / f"VOC{year}"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "Annotations").mkdir()
    (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
    for name, (w, h, objects) in images.items():
        objs = "".join(OBJ.format(cls=c, difficult=d, x1=x1, y1=y1, x2=x2, y2=y2) for c, d, x1, y1, x2, y2 in objects)
        (base / "Annotations" / f"{name}.xml").write_text(XML.format(name=name, w=w, h=h, objects=objs))
        image_writer(base / "JPEGImages" / f"{name}.jpg", w, h)


def test_read_voc_exact(tmp_path, image_writer):
    write_voc(
        tmp_path,
        "2007",
        "trainval",
        {
            "000001": (50, 40, [("dog", 0, 1, 2, 10, 20), ("person", 1, 5, 5, 15, 15)]),
            "000002": (30, 30, []),
        },
        image_writer,
    )
    records, meta, stats = read_voc(tmp_path)

    assert meta.class_names == VOC_CLASSES and len(VOC_CLASSES) == 20
    assert meta.category_ids == list(range(1, 21))
    assert stats == {
        "difficult_boxes": 1,
        "boxes_clipped": 0,
        "degenerate_boxes_dropped": 0,
        "empty_images": 1,
        "duplicate_ids_skipped": 0,
    }
    first, second = records
    assert (first.image_id, first.source_id, first.width, first.height) == (0, "000001", 50, 40)
    assert first.file == tmp_path / "VOC2007" / "JPEGImages" / "000001.jpg"
    # 1-based inclusive pixels -> xmin, ymin minus 1
    np.testing.assert_array_equal(first.boxes, [[0, 1, 10, 20], [4, 4, 15, 15]])
    np.testing.assert_array_equal(first.labels, [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("person") + 1])
    np.testing.assert_array_equal(first.labels, [12, 15])
    np.testing.assert_array_equal(first.ignore, [False, True])
    assert first.areas is None
    assert second.boxes.shape == (0, 4)


def test_read_voc_07_plus_12(tmp_path, image_writer):
    write_voc(tmp_path, "2007", "trainval", {"000005": (20, 20, [("cat", 0, 1, 1, 5, 5)])}, image_writer)
    write_voc(tmp_path, "2012", "trainval", {"2008_000001": (20, 20, [("bus", 0, 2, 2, 9, 9)])}, image_writer)
    records, _, _ = read_voc(tmp_path, [("2007", "trainval"), (2012, "trainval")])
    assert [(r.image_id, r.source_id) for r in records] == [(0, "000005"), (1, "2008_000001")]
    assert records[1].file == tmp_path / "VOC2012" / "JPEGImages" / "2008_000001.jpg"
    np.testing.assert_array_equal(records[1].boxes, [[1, 1, 9, 9]])


def test_read_voc_errors(tmp_path, image_writer):
    with pytest.raises(FileNotFoundError, match=r"ImageSets.Main.test\.txt does not exist"):
        read_voc(tmp_path, "2007", "test")
    write_voc(tmp_path, "2007", "trainval", {"000001": (20, 20, [("unicorn", 0, 1, 1, 5, 5)])}, image_writer)
    with pytest.raises(ValueError, match=r"000001\.xml has an object of unknown class 'unicorn'"):
        read_voc(tmp_path)


def write_voc_folder(root: Path, splits: dict, image_writer, suffix: str = ".jpg", filename: bool = True) -> None:
    """A labelling tool's export in one folder: splits: split -> {name: (w, h, [(cls, x1, y1, x2, y2), ...])};
    images are ``JPEGImages/<name><suffix>``, named in ``<filename>`` when ``filename``."""
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(exist_ok=True)
    for split, images in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
        for name, (w, h, objects) in images.items():
            objs = "".join(OBJ.format(cls=c, difficult=0, x1=x1, y1=y1, x2=x2, y2=y2) for c, x1, y1, x2, y2 in objects)
            xml = XML.format(name=name, w=w, h=h, objects=objs).replace(f"{name}.jpg", f"{name}{suffix}")
            if not filename:
                xml = xml.replace(f"<filename>{name}{suffix}</filename>", "")
            (root / "Annotations" / f"{name}.xml").write_text(xml)
            image_writer(root / "JPEGImages" / f"{name}{suffix}", w, h)


CELLS = {
    "train": {"a": (40, 30, [("WBC", 1, 1, 20, 20), ("RBC", 2, 2, 9, 9)]), "b": (40, 30, [("Platelets", 3, 3, 8, 8)])},
    "val": {"c": (40, 30, [("RBC", 1, 1, 10, 10), ("WBC", 5, 5, 30, 25)])},
}


def test_single_folder_with_given_classes(tmp_path, image_writer):
    write_voc_folder(tmp_path, CELLS, image_writer)
    records, meta, stats = read_voc(tmp_path, None, "train", classes=["RBC", "WBC", "Platelets"])
    assert meta.class_names == ["RBC", "WBC", "Platelets"] and meta.category_ids == [1, 2, 3]
    assert [r.source_id for r in records] == ["a", "b"]
    assert records[0].file == tmp_path / "JPEGImages" / "a.jpg"
    np.testing.assert_array_equal(records[0].labels, [2, 1])  # WBC, RBC
    np.testing.assert_array_equal(records[0].boxes, [[0, 0, 20, 20], [1, 1, 9, 9]])
    np.testing.assert_array_equal(records[1].labels, [3])


def test_classes_inferred_from_the_training_split_sorted_and_logged(tmp_path, image_writer, caplog):
    write_voc_folder(tmp_path, CELLS, image_writer)
    with caplog.at_level("INFO", logger="fl_rpn.data.voc"):
        _, meta, _ = read_voc(tmp_path, None, "train", classes=None)
    assert meta.class_names == ["Platelets", "RBC", "WBC"]  # sorted, not in order of appearance
    assert "3 classes collected" in caplog.text and "['Platelets', 'RBC', 'WBC']" in caplog.text
    # the val split (which has no Platelets) gets the training split's classes through classes_from
    records, val_meta, _ = read_voc(tmp_path, None, "val", train=False, classes=None, classes_from="train")
    assert val_meta.class_names == ["Platelets", "RBC", "WBC"]
    np.testing.assert_array_equal(records[0].labels, [2, 3])
    _, own, _ = read_voc(tmp_path, None, "val", train=False, classes=None)  # without it: the val split's own
    assert own.class_names == ["RBC", "WBC"]


def test_val_class_unknown_to_the_training_split_names_file_and_class(tmp_path, image_writer):
    splits = {**CELLS, "val": {"c": (40, 30, [("RBC", 1, 1, 10, 10), ("Neutrophil", 5, 5, 30, 25)])}}
    write_voc_folder(tmp_path, splits, image_writer)
    with pytest.raises(ValueError, match=r"c\.xml has an object of unknown class 'Neutrophil'; the classes are "
                                         r"\['Platelets', 'RBC', 'WBC'\]"):  # fmt: skip
        read_voc(tmp_path, None, "val", train=False, classes=None, classes_from="train")
    with pytest.raises(ValueError, match=r"b\.xml has an object of unknown class 'Platelets'"):  # a short list
        read_voc(tmp_path, None, "train", classes=["RBC", "WBC"])
    with pytest.raises(ValueError, match=r"classes must be a list of class names .* got 'RBC'"):
        read_voc(tmp_path, None, "train", classes="RBC")
    with pytest.raises(ValueError, match=r"names a class twice"):
        read_voc(tmp_path, None, "train", classes=["RBC", "WBC", "RBC", "Platelets"])


def test_class_names_differing_only_in_case_or_spacing_are_refused_naming_the_files(tmp_path, image_writer):
    """Collected classes (classes=null): RBC in one file, rbc and 'R BC ' elsewhere would be three classes."""
    splits = {"train": {"a": (40, 30, [("RBC", 1, 1, 10, 10)]), "b": (40, 30, [("rbc", 1, 1, 10, 10)]),
                        "c": (40, 30, [("WBC", 1, 1, 10, 10), ("wbc", 2, 2, 9, 9)])}}  # fmt: skip
    write_voc_folder(tmp_path, splits, image_writer)
    with pytest.raises(ValueError) as raised:
        read_voc(tmp_path, None, "train", classes=None)
    message = str(raised.value)
    assert "class names that differ only in case or spacing would become separate classes" in message
    assert "  'RBC' in 1 file(s): a.xml\n  'rbc' in 1 file(s): b.xml\n  'WBC' in 1 file(s): c.xml" in message
    assert "'wbc' in 1 file(s): c.xml" in message and "Give every object of a class one spelling" in message
    # a given class list: the object's near miss is named
    with pytest.raises(ValueError, match=r"b\.xml has an object of unknown class 'rbc'.*'RBC' differs only in case"):
        read_voc(tmp_path, None, "train", classes=["RBC", "WBC"])


@pytest.mark.parametrize("filename", [True, False])
def test_png_images_found_from_filename_or_suffix(tmp_path, image_writer, filename):
    write_voc_folder(tmp_path, CELLS, image_writer, suffix=".png", filename=filename)
    records, _, _ = read_voc(tmp_path, None, "train", classes=["RBC", "WBC", "Platelets"])
    assert [r.file for r in records] == [tmp_path / "JPEGImages" / "a.png", tmp_path / "JPEGImages" / "b.png"]


def test_dataset_nodes_voc_and_bccd_presets(tmp_path, image_writer):
    """dataset=bccd (three classes given) and dataset=voc (inferred, the val node uses the train split's)."""
    from fl_rpn.config import compose_config
    from fl_rpn.data import build_dataset

    write_voc_folder(tmp_path / "bccd", CELLS, image_writer)
    cfg = compose_config(["dataset=bccd", f"data_root={tmp_path}"])
    train, val = build_dataset(cfg.dataset.train, train=True), build_dataset(cfg.dataset.val, train=False)
    assert train.meta.class_names == val.meta.class_names == ["RBC", "WBC", "Platelets"]
    assert (len(train), len(val)) == (2, 1)
    assert list(cfg.eval.evaluators) == ["voc07", "coco", "proposal_recall"]  # the dataset chooses eval=voc07_coco
    assert compose_config(["dataset=bccd", "dataset.val_split=test"]).dataset.val.split == "test"
    assert list(compose_config(["dataset=bccd", "eval=default"]).eval.evaluators) == ["coco", "proposal_recall"]
    cfg = compose_config(["dataset=voc", f"dataset.root={tmp_path / 'bccd'}"])
    assert build_dataset(cfg.dataset.val, train=False).meta.class_names == ["Platelets", "RBC", "WBC"]
    with pytest.raises(ValueError, match="exactly one of sets .* or split"):
        build_dataset({"format": "voc", "root": str(tmp_path), "sets": [[2007, "val"]], "split": "val"}, train=False)


def test_vocdevkit_layout_unchanged(tmp_path, image_writer):
    """VOCdevkit/VOC2007 through the dataset=voc2007 node: the 20 PASCAL classes, <id>.jpg, the same labels."""
    from fl_rpn.config import compose_config
    from fl_rpn.data import build_dataset

    write_voc(
        tmp_path / "VOCdevkit", "2007", "trainval", {"000001": (50, 40, [("dog", 0, 1, 2, 10, 20)])}, image_writer
    )
    cfg = compose_config(["dataset=voc2007", f"data_root={tmp_path}"])
    ds = build_dataset(cfg.dataset.train, train=True)
    assert ds.meta.class_names == VOC_CLASSES and ds.meta.category_ids == list(range(1, 21))
    assert ds.records[0].file == tmp_path / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000001.jpg"
    np.testing.assert_array_equal(ds.records[0].labels, [VOC_CLASSES.index("dog") + 1])
    np.testing.assert_array_equal(ds.records[0].boxes, [[0, 1, 10, 20]])
