import pytest
import torch
from omegaconf import OmegaConf

from fl_rpn.data import SHAPES, build_dataset, build_loader, read_dataset


def test_build_coco_dataset_from_dictconfig(coco_files):
    images, annotations = coco_files
    node = OmegaConf.create(
        {"format": "coco", "images": str(images), "annotations": str(annotations), "keep_empty": False}
    )
    ds = build_dataset(node, train=True)
    assert len(ds) == 2 and ds.train and ds.meta.category_ids == [1, 5, 90]


def test_build_rejects_bad_nodes(coco_files):
    images, annotations = coco_files
    with pytest.raises(ValueError, match=r"format 'tfrecord'; expected one of \['coco', 'synthetic', 'voc', 'yolo'\]"):
        read_dataset({"format": "tfrecord"})
    with pytest.raises(ValueError, match=r"unknown keys \['root'\]"):
        read_dataset({"format": "coco", "images": images, "annotations": annotations, "root": "x"})


def test_build_synthetic_and_loader(tmp_path):
    node = {
        "format": "synthetic",
        "cache_dir": str(tmp_path),
        "split": "train",
        "num_images": 10,
        "seed": 0,
        "image_size": [64, 80],
        "max_objects": 5,
    }
    ds = build_dataset(node, train=True)
    assert len(ds) == 10 and ds.meta.class_names == SHAPES and ds.meta.category_ids == [1, 2, 3, 4, 5]

    eval_ds = build_dataset(node, train=False)
    batches = [[t["image_id"] for t in targets] for _, targets in build_loader(eval_ds, 3, 0, seed=0)]
    assert batches == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10]]  # the dataset's order, the last batch short
    images, targets = next(iter(build_loader(eval_ds, 2, 0, seed=0)))
    assert [t["image_id"] for t in targets] == [1, 2]
    assert images[0].shape == (3, 64, 80) and images[0].dtype == torch.float32
    assert "ignore" in targets[0]


def test_build_voc_node_passes_sets(tmp_path):
    (tmp_path / "VOC2007" / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_text("")
    records, meta, _ = read_dataset(
        OmegaConf.create({"format": "voc", "root": str(tmp_path), "sets": [[2007, "test"]]})
    )
    assert records == [] and len(meta.class_names) == 20
