"""Tiny on-disk fixtures for the data tests (images: ``write_image`` / ``image_writer`` of ``tests/conftest.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..conftest import write_image


@pytest.fixture
def coco_files(tmp_path: Path) -> tuple[Path, Path]:
    """Three images and a COCO json with gapped, unordered category ids (90, 1, 5), a crowd box,
    a degenerate box, a box crossing the border and an image without annotations."""
    images = tmp_path / "images"
    write_image(images / "a.png", 40, 30)
    write_image(images / "b.png", 20, 10)
    write_image(images / "c.png", 16, 16)
    data = {
        "images": [
            {"id": 7, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 3, "file_name": "c.png", "width": 16, "height": 16},
            {"id": 5, "file_name": "b.png", "width": 20, "height": 10},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [2, 3, 10, 5], "area": 40.5, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 90, "bbox": [0, 0, 20, 20], "area": 123.0, "iscrowd": 1},
            {"id": 3, "image_id": 7, "category_id": 5, "bbox": [5, 5, 0.5, 10], "area": 5.0, "iscrowd": 0},
            {"id": 4, "image_id": 7, "category_id": 5, "bbox": [35, 25, 10, 10], "area": 100.0, "iscrowd": 0},
            {"id": 5, "image_id": 5, "category_id": 5, "bbox": [1, 1, 4, 2], "area": 8.0, "iscrowd": 0},
        ],
        "categories": [
            {"id": 90, "name": "toothbrush"},
            {"id": 1, "name": "person"},
            {"id": 5, "name": "airplane"},
        ],
    }
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(data))
    return images, annotations
