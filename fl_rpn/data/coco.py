"""Reader for COCO ``instances_*.json`` annotations (via pycocotools)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from pycocotools.coco import COCO

from .records import DatasetMeta, ImageRecord, make_record


def load_coco_api(annotations: str | Path) -> COCO:
    """Load a COCO json quietly, with errors that name the file."""
    annotations = Path(annotations)
    if not annotations.is_file():
        raise FileNotFoundError(f"COCO annotation file {annotations} does not exist.")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            return COCO(str(annotations))
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"COCO annotation file {annotations} is not valid JSON: {e}") from e


def read_coco(
    images: str | Path, annotations: str | Path, keep_empty: bool = True
) -> tuple[list[ImageRecord], DatasetMeta, dict[str, int]]:
    """Read a COCO detection json whose ``file_name`` entries are relative to ``images``.

    - ``bbox`` is COCO ``[x, y, w, h]``; records hold ``xyxy`` clipped to the image.
    - Category ids (which may have gaps, e.g. 1..90) map to contiguous labels 1..K in increasing id
      order; ``meta.category_ids`` maps back.
    - Crowd annotations stay in the record with ``ignore=True``.
    - Boxes whose width or height is <= 1 px after clipping are dropped.
    - Images without (remaining) boxes are kept as negatives unless ``keep_empty`` is False.

    Stats: ``annotations``, ``crowd_boxes``, ``degenerate_boxes_dropped``, ``empty_images``,
    ``empty_images_dropped``.
    """
    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"COCO image folder {images} does not exist.")
    coco = load_coco_api(annotations)
    cat_ids = sorted(coco.getCatIds())
    if not cat_ids:
        raise ValueError(f"COCO annotation file {annotations} has no 'categories'.")
    label_of = {cid: k + 1 for k, cid in enumerate(cat_ids)}
    meta = DatasetMeta(class_names=[coco.cats[c]["name"] for c in cat_ids], category_ids=cat_ids)

    stats = {
        "annotations": 0,
        "crowd_boxes": 0,
        "degenerate_boxes_dropped": 0,
        "empty_images": 0,
        "empty_images_dropped": 0,
    }
    records = []
    for img_id in sorted(coco.getImgIds()):
        img = coco.imgs[img_id]
        anns = coco.imgToAnns.get(img_id, [])
        boxes, labels, crowd, areas = [], [], [], []
        for ann in anns:
            if ann["category_id"] not in label_of:
                raise ValueError(
                    f"COCO annotation file {annotations}: annotation {ann.get('id')} has category_id "
                    f"{ann['category_id']}, which is not in 'categories'."
                )
            x, y, w, h = ann["bbox"]
            boxes.append([x, y, x + w, y + h])
            labels.append(label_of[ann["category_id"]])
            crowd.append(bool(ann.get("iscrowd", 0)))
            areas.append(ann.get("area", w * h))
        stats["annotations"] += len(anns)
        record = make_record(
            images / img["file_name"],
            img_id,
            img["width"],
            img["height"],
            boxes,
            labels,
            crowd,
            stats,
            areas=areas,
        )
        stats["crowd_boxes"] += int(record.ignore.sum())
        if len(record.boxes) == 0:
            stats["empty_images"] += 1
            if not keep_empty:
                stats["empty_images_dropped"] += 1
                continue
        records.append(record)
    return records, meta, stats
