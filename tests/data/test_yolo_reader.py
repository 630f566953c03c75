import numpy as np
import pytest

from fl_rpn.data import COCO80_TO_COCO91, read_yolo


@pytest.fixture
def yolo_files(tmp_path, image_writer):
    images, labels = tmp_path / "images", tmp_path / "labels"
    image_writer(images / "a.png", 100, 50)
    image_writer(images / "b.jpg", 64, 32)
    image_writer(images / "c.png", 8, 8)  # no label file: a negative image
    labels.mkdir()
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n\n2 0.25 0.5 0.5 1.0\n")
    (labels / "b.txt").write_text("2 0.75 0.25 0.25 0.5\n")
    (labels / "orphan.txt").write_text("")
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text("path: .\nnames:\n  0: cat\n  1: dog\n  2: bird\n")
    return images, labels, data_yaml


def test_read_yolo_exact(yolo_files):
    records, meta, stats = read_yolo(*yolo_files)
    assert meta.class_names == ["cat", "dog", "bird"]  # 'dog' never occurs but still counts
    assert meta.category_ids == [1, 2, 3]
    assert stats == {
        "missing_label_files": 1,
        "empty_images": 1,
        "boxes_clipped": 0,
        "degenerate_boxes_dropped": 0,
        "label_files_without_image": 1,
    }
    a, b, c = records
    assert [(r.image_id, r.source_id, r.width, r.height) for r in records] == [
        (0, "a", 100, 50),
        (1, "b", 64, 32),
        (2, "c", 8, 8),
    ]
    np.testing.assert_array_equal(a.boxes, [[40, 15, 60, 35], [0, 0, 50, 50]])
    np.testing.assert_array_equal(a.labels, [1, 3])
    np.testing.assert_array_equal(a.ignore, [False, False])
    np.testing.assert_array_equal(b.boxes, [[40, 0, 56, 16]])
    np.testing.assert_array_equal(b.labels, [3])
    assert c.boxes.shape == (0, 4) and c.labels.shape == (0,)


def test_read_yolo_names_and_category_ids(yolo_files):
    images, labels, _ = yolo_files
    _, meta, _ = read_yolo(images, labels, ["cat", "dog", "bird"], category_ids=[1, 5, 90])
    assert meta.category_ids == [1, 5, 90]
    _, meta, _ = read_yolo(images, labels, {0: "cat", 1: "dog", 2: "bird"}, category_ids={0: 7, 1: 8, 2: 9})
    assert meta.category_ids == [7, 8, 9]
    names80 = [f"c{i}" for i in range(80)]
    _, meta, _ = read_yolo(images, labels, names80, category_ids="coco80")
    assert meta.category_ids == COCO80_TO_COCO91
    with pytest.raises(ValueError, match="category_ids has 2 entries but there are 3 class names"):
        read_yolo(images, labels, ["cat", "dog", "bird"], category_ids=[1, 2])


def test_coco80_to_coco91():
    assert len(COCO80_TO_COCO91) == 80 and len(set(COCO80_TO_COCO91)) == 80
    assert COCO80_TO_COCO91[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13]
    assert COCO80_TO_COCO91[-1] == 90
    assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(COCO80_TO_COCO91)


def test_read_yolo_bad_lines(yolo_files):
    images, labels, data_yaml = yolo_files
    (labels / "b.txt").write_text("2 0.75 0.25 0.25 0.5\n1 0.5 0.5 0.1\n")
    with pytest.raises(ValueError, match=r"b\.txt, line 2: expected 'cls cx cy w h'"):
        read_yolo(images, labels, data_yaml)
    (labels / "b.txt").write_text("3 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match=r"b\.txt, line 1: class 3 is outside 0\.\.2"):
        read_yolo(images, labels, data_yaml)
