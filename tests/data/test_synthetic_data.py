import json

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from fl_rpn.config import compose_config
from fl_rpn.data import SHAPES, ensure_synthetic, make_synthetic_coco, read_coco
from fl_rpn.data import synthetic as synthetic_module

SMALL = {"image_size": (64, 80), "max_objects": 6, "min_object_size": 8}


def _snapshot(images, annotations):
    return annotations.read_bytes(), {p.name: p.read_bytes() for p in sorted(images.iterdir())}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first = _snapshot(*make_synthetic_coco(tmp_path / "a", 4, seed=0, **SMALL))
    again = _snapshot(*make_synthetic_coco(tmp_path / "b", 4, seed=0, **SMALL))
    other = _snapshot(*make_synthetic_coco(tmp_path / "c", 4, seed=1, **SMALL))
    assert first == again
    assert first[0] != other[0]
    assert all(first[1][name] != other[1][name] for name in first[1])
    assert sorted(first[1]) == ["000000.png", "000001.png", "000002.png", "000003.png"]


def test_counts_sizes_and_format(tmp_path):
    images, annotations = make_synthetic_coco(
        tmp_path, 40, seed=3, image_size=(96, 128), max_objects=12, empty_fraction=0.2
    )
    data = json.loads(annotations.read_text())
    assert [c["name"] for c in data["categories"]] == SHAPES
    assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4, 5]
    assert all((im["width"], im["height"]) == (128, 96) for im in data["images"])

    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=41)[1:]
    assert per_image.max() <= 12 and per_image.min() == 0 and per_image.max() >= 6
    boxes = np.array([a["bbox"] for a in data["annotations"]])
    x, y, w, h = boxes.T
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 128).all() and (y + h <= 96).all()
    # sides: log-uniform 8..48 (half the shorter side) with an aspect jitter of exp(+-0.2)
    assert min(w.min(), h.min()) >= 6 and max(w.max(), h.max()) <= 48 * np.exp(0.2) + 1
    side = np.sqrt(w * h)
    assert side.min() < 12 and side.max() > 30
    areas = np.array([a["area"] for a in data["annotations"]])
    assert (areas > 0).all() and (areas <= w * h).all()
    assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3, 4, 5}

    records, meta, stats = read_coco(images, annotations)
    assert meta.class_names == SHAPES and len(records) == 40
    assert stats["degenerate_boxes_dropped"] == 0 and stats["empty_images"] == int((per_image == 0).sum())


def default_split(cache_dir, num_images):
    """The training split of the shipped ``dataset=synthetic`` config, with ``num_images`` images."""
    cfg = compose_config([f"cache_dir={cache_dir}", f"dataset.train.num_images={num_images}"])
    node = OmegaConf.to_container(cfg.dataset.train, resolve=True)
    assert node.pop("format") == "synthetic"
    return node, *ensure_synthetic(**node)


def test_the_default_config_has_the_promised_properties(tmp_path):
    """Five shape classes, 0..20 objects per image with some empty images, sides from ~8 px to half the shorter
    image side, textured and cluttered backgrounds, the same bytes from the same seed."""
    node, images, annotations = default_split(tmp_path / "a", 60)
    data = json.loads(annotations.read_text())
    h, w = node["image_size"]
    assert {c["id"] for c in data["categories"]} == {1, 2, 3, 4, 5}
    assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3, 4, 5}

    per_image = np.bincount([a["image_id"] - 1 for a in data["annotations"]], minlength=60)
    assert len(per_image) == 60 and per_image.max() <= 20  # max_objects defaults to 20
    assert 2 <= (per_image == 0).sum() <= 15  # empty_fraction defaults to 0.1
    assert per_image.max() >= 18 and len(set(per_image.tolist())) >= 15  # the whole range is used

    x, y, bw, bh = np.array([a["bbox"] for a in data["annotations"]]).T
    assert (x >= 0).all() and (y >= 0).all() and (x + bw <= w).all() and (y + bh <= h).all()
    side = np.sqrt(bw * bh)
    half = min(h, w) / 2
    assert min(bw.min(), bh.min()) >= 6 and max(bw.max(), bh.max()) <= half * np.exp(0.2) + 1
    assert side.min() < 10 and side.max() > 0.8 * half  # from ~8 px to half the shorter side

    for i in np.flatnonzero(per_image == 0):  # no object: what is left is the background
        pixels = np.asarray(Image.open(images / f"{i:06d}.png"), dtype=np.float32)
        assert pixels.shape == (h, w, 3)
        # means over 8x8 blocks average the pixel noise (std ~8) away: what varies is gradient, texture, clutter
        blocks = pixels.reshape(h // 8, 8, w // 8, 8, 3).mean(axis=(1, 3))
        assert (blocks.std(axis=(0, 1)) > 5).all(), f"image {i}: flat background"

    _, images3, annotations3 = default_split(tmp_path / "b", 3)  # generated again, from the same seed
    assert images3.parent != images.parent
    for i in range(3):
        assert (images3 / f"{i:06d}.png").read_bytes() == (images / f"{i:06d}.png").read_bytes()
    first3 = [a for a in data["annotations"] if a["image_id"] <= 3]
    assert json.loads(annotations3.read_text())["annotations"] == first3


def test_empty_fraction_decides_the_empty_images(tmp_path):
    """An image is empty only when drawn so: a crowded one still gets at least one object."""
    crowded = {**SMALL, "max_objects": 40, "min_object_size": 24}
    _, annotations = make_synthetic_coco(tmp_path / "none", 20, seed=0, empty_fraction=0.0, **crowded)
    data = json.loads(annotations.read_text())
    per_image = np.bincount([a["image_id"] - 1 for a in data["annotations"]], minlength=20)
    assert per_image.min() >= 1 and per_image.max() < 40  # placement gave up on some, never on all

    _, annotations = make_synthetic_coco(tmp_path / "all", 5, seed=0, empty_fraction=1.0, **SMALL)
    data = json.loads(annotations.read_text())
    assert len(data["images"]) == 5 and data["annotations"] == []


def test_objects_overlap_little(tmp_path):
    _, annotations = make_synthetic_coco(tmp_path, 10, seed=5, **SMALL)
    data = json.loads(annotations.read_text())
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        by_image.setdefault(a["image_id"], []).append((x, y, x + w, y + h))
    for boxes in by_image.values():
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
                ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
                smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
                # placement boxes overlap <= 10% of the smaller; tight boxes are a little smaller
                assert iw * ih <= 0.15 * smaller


def test_ensure_synthetic_caches_and_splits_differ(tmp_path, monkeypatch):
    train = ensure_synthetic(tmp_path, "train", 3, seed=0, **SMALL)
    assert train[0].parent.parent.name.startswith("synthetic-") and train[0].parent.name == "train"
    assert train[1].is_file() and len(list(train[0].iterdir())) == 3

    def fail(*args, **kwargs):
        raise AssertionError("a cached split was generated again")

    monkeypatch.setattr(synthetic_module, "make_synthetic_coco", fail)
    assert ensure_synthetic(tmp_path, "train", 3, seed=0, **SMALL) == train
    monkeypatch.undo()

    val = ensure_synthetic(tmp_path, "val", 3, seed=0, **SMALL)
    assert val[0] != train[0]
    assert (train[0] / "000000.png").read_bytes() != (val[0] / "000000.png").read_bytes()
    leftovers = [p.name for p in tmp_path.glob("synthetic-*/.*")]
    assert leftovers == []


def test_ensure_synthetic_leaves_no_partial_split(tmp_path, monkeypatch):
    def crash(root, *args, **kwargs):
        (root / "images").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(synthetic_module, "make_synthetic_coco", crash)
    with pytest.raises(OSError, match="disk full"):
        ensure_synthetic(tmp_path, "train", 3, seed=0)
    assert [p for p in tmp_path.rglob("*") if p.is_dir() and not p.name.startswith("synthetic-")] == []
