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
