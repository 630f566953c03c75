import json

import numpy as np
import pytest

from fl_rpn.data import build_dataset, check_dataset, read_coco


def test_read_coco_exact(coco_files):
    images, annotations = coco_files
    records, meta, stats = read_coco(images, annotations)

    assert meta.category_ids == [1, 5, 90]
    assert meta.class_names == ["person", "airplane", "toothbrush"]
    assert stats == {
        "annotations": 5,
        "annotations_without_image": 0,
        "duplicate_annotation_ids": 0,
        "crowd_boxes": 1,
        "boxes_clipped": 1,  # [35, 25, 10, 10] in a 40x30 image
        "degenerate_boxes_dropped": 1,
        "empty_images": 1,
        "empty_images_dropped": 0,
    }
    assert [r.image_id for r in records] == [3, 5, 7]
    assert [r.file.name for r in records] == ["c.png", "b.png", "a.png"]

    empty, b, a = records
    assert (a.width, a.height) == (40, 30)
    np.testing.assert_array_equal(a.boxes, [[2, 3, 12, 8], [0, 0, 20, 20], [35, 25, 40, 30]])
    assert a.boxes.dtype == np.float32
    np.testing.assert_array_equal(a.labels, [1, 3, 2])
    assert a.labels.dtype == np.int64
    np.testing.assert_array_equal(a.ignore, [False, True, False])
    np.testing.assert_array_equal(a.areas, [40.5, 123.0, 100.0])
    np.testing.assert_array_equal(b.boxes, [[1, 1, 5, 3]])
    np.testing.assert_array_equal(b.labels, [2])
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,) and empty.ignore.shape == (0,)


def test_read_coco_for_evaluation_keeps_every_box_as_in_the_file(coco_files):
    # The 0.5 px wide box and the box crossing the border stay as annotated (pycocotools reads them so), counted.
    records, _, stats = read_coco(*coco_files, train=False)
    assert stats["boxes_outside_image"] == 1 and stats["degenerate_boxes_kept"] == 1
    assert "boxes_clipped" not in stats and "degenerate_boxes_dropped" not in stats
    a = records[2]
    np.testing.assert_array_equal(a.boxes, [[2, 3, 12, 8], [0, 0, 20, 20], [5, 5, 5.5, 15], [35, 25, 45, 35]])
    np.testing.assert_array_equal(a.labels, [1, 3, 2, 2])
    np.testing.assert_array_equal(a.ignore, [False, True, False, False])
    np.testing.assert_array_equal(a.areas, [40.5, 123.0, 5.0, 100.0])
    # fl-rpn-check-data and train.log report them.
    node = {"format": "coco", "images": str(coco_files[0]), "annotations": str(coco_files[1])}
    summary = check_dataset(build_dataset(node, train=False), "dataset.val").summary()
    assert "reader counts: annotations=5, crowd_boxes=1, boxes_outside_image=1, degenerate_boxes_kept=1," in summary


def test_read_coco_drops_empty_images(coco_files):
    records, _, stats = read_coco(*coco_files, keep_empty=False)
    assert [r.image_id for r in records] == [5, 7]
    assert stats["empty_images"] == 1 and stats["empty_images_dropped"] == 1


def test_read_coco_unknown_category(coco_files):
    images, annotations = coco_files
    data = json.loads(annotations.read_text())
    data["annotations"][0]["category_id"] = 2
    annotations.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances\.json: annotation 1 has category_id 2"):
        read_coco(images, annotations)


def test_read_coco_missing_and_invalid_files(coco_files, tmp_path):
    images, annotations = coco_files
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_coco(images, tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        read_coco(images, broken)
