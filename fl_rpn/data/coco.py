"""Reader for COCO ``instances_*.json`` annotations (via pycocotools)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from .records import DatasetMeta, ImageRecord, box_counts, finish_box_stats, make_record

log = logging.getLogger(__name__)

# What every entry must have for detection: (list key, required fields)
_REQUIRED = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def check_coco_json(data: Any, annotations: str | Path) -> None:
    """Raise ``ValueError`` naming the file and the first bad entry unless ``data`` is a usable COCO detection json.

    Checks: a JSON object with lists ``images``, ``annotations`` and ``categories``; the required fields of
    every entry (``_REQUIRED``); numeric image sizes and ids; a string ``file_name`` and category ``name``;
    ``bbox`` a list of 4 numbers; ``area`` (when given) a number and ``iscrowd`` 0 or 1; unique image and
    category ids; no ``file_name`` listed under two image ids (the image would be trained twice and its
    annotations split between the two). Box values (NaN, negative size) are checked per image by ``make_record``.
    """
    where = f"COCO annotation file {annotations}"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object with 'images', 'annotations' and 'categories', "
                         f"got a {type(data).__name__}.")  # fmt: skip
    for key, fields in _REQUIRED.items():
        if key not in data:
            raise ValueError(f"{where} has no '{key}' list.")
        if not isinstance(data[key], list):
            raise ValueError(f"{where}: '{key}' is a {type(data[key]).__name__}, not a list.")
        for i, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: {key}[{i}] is not an object: {entry!r:.80}.")
            missing = [f for f in fields if f not in entry]
            if missing:
                raise ValueError(f"{where}: {key}[{i}] (id {entry.get('id')}) lacks {missing}.")
    for i, img in enumerate(data["images"]):
        if not all(_is_number(img[k]) for k in ("id", "width", "height")):
            raise ValueError(f"{where}: images[{i}] has a non-numeric id, width or height: {img!r:.120}.")
        if not isinstance(img["file_name"], str):
            raise ValueError(f"{where}: images[{i}] (id {img['id']}) has file_name {img['file_name']!r:.80}; "
                             "expected a path relative to the image folder.")  # fmt: skip
    for i, cat in enumerate(data["categories"]):
        if not (_is_number(cat["id"]) and isinstance(cat["name"], str)):
            raise ValueError(f"{where}: categories[{i}] needs a numeric id and a string name: {cat!r:.120}.")
    for i, ann in enumerate(data["annotations"]):
        if not all(_is_number(ann[k]) for k in ("id", "image_id", "category_id")):
            raise ValueError(f"{where}: annotations[{i}] has a non-numeric id, image_id or category_id: "
                             f"{ann!r:.120}.")  # fmt: skip
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise ValueError(f"{where}: annotations[{i}] (id {ann['id']}) has bbox {box!r:.80}; "
                             "expected [x, y, width, height].")  # fmt: skip
        if "area" in ann and not _is_number(ann["area"]):
            raise ValueError(f"{where}: annotations[{i}] (id {ann['id']}) has area {ann['area']!r:.80}; "
                             "expected a number.")  # fmt: skip
        if ann.get("iscrowd", 0) not in (0, 1):
            raise ValueError(f"{where}: annotations[{i}] (id {ann['id']}) has iscrowd {ann['iscrowd']!r:.80}; "
                             "expected 0 or 1.")  # fmt: skip
    for key in ("images", "categories"):
        ids = [e["id"] for e in data[key]]
        if len(set(ids)) != len(ids):
            dup = next(x for x in ids if ids.count(x) > 1)
            raise ValueError(f"{where}: id {dup} appears more than once in '{key}'.")
    first_id: dict[str, Any] = {}
    for img in data["images"]:
        other = first_id.setdefault(img["file_name"], img["id"])
        if other != img["id"]:
            raise ValueError(f"{where}: file_name {img['file_name']!r} is listed under two image ids, {other} and "
                             f"{img['id']}; list each image once, with all its annotations.")  # fmt: skip


def load_coco_api(annotations: str | Path) -> COCO:
    """Load and check a COCO json (``check_coco_json``), quietly, with errors that name the file."""
    annotations = Path(annotations)
    if not annotations.is_file():
        raise FileNotFoundError(f"COCO annotation file {annotations} does not exist.")
    try:
        data = json.loads(annotations.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"COCO annotation file {annotations} is not valid JSON: {e}") from e
    check_coco_json(data, annotations)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def _coco_record(coco, img_id: int, images: Path, annotations, label_of: dict, stats: dict, train: bool):
    """The ``ImageRecord`` of one image of ``coco`` (a pycocotools ``COCO``): its boxes as ``xyxy``, labels 1..K,
    crowd flags and areas (``make_record`` clips or keeps them and counts what it does into ``stats``)."""
    img, anns = coco.imgs[img_id], coco.imgToAnns.get(img_id, [])
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
    return make_record(
        images / img["file_name"], img_id, img["width"], img["height"], boxes, labels, crowd, stats, areas=areas,
        source=f"COCO annotation file {annotations}, image_id {img_id}",
        box_names=[f"annotation {ann.get('id')}" for ann in anns], train=train,
    )  # fmt: skip


def read_coco(
    images: str | Path, annotations: str | Path, keep_empty: bool = True, train: bool = True
) -> tuple[list[ImageRecord], DatasetMeta, dict[str, int]]:
    """Read a COCO detection json whose ``file_name`` entries are relative to ``images``.

    - ``bbox`` is COCO ``[x, y, w, h]``; records hold ``xyxy``; ``areas`` the file's own ``area`` (``w * h``
      where it has none), crowd annotations stay in the record with ``ignore=True``.
    - Category ids (which may have gaps, e.g. 1..90) map to contiguous labels 1..K in increasing id
      order; ``meta.category_ids`` maps back.
    - ``train=True``: boxes reaching outside the image are clipped (counted); boxes whose width or height is
      <= 1 px after clipping are dropped (counted). ``train=False`` (evaluation): every box is kept as in the
      file, as pycocotools reads it; the same boxes are counted (``make_record``).
    - Images without (remaining) boxes are kept as negatives unless ``keep_empty`` is False.
    - Errors (``ValueError`` naming the file and entry): not JSON, a missing list or field, duplicate image ids or
      file names (``check_coco_json``), a ``category_id`` not in ``categories``, a NaN / infinite coordinate, a
      negative width or height, boxes that all look normalised to [0, 1] (``finish_box_stats``; a warning when
      more than half the boxes are <= 1 px). Annotations whose ``image_id`` is not in ``images`` are skipped and
      counted. Annotation ids used more than once are counted and warned about (all the annotations are read;
      pycocotools' own index keeps the last one per id).

    Stats: ``annotations``, ``annotations_without_image``, ``duplicate_annotation_ids``, ``crowd_boxes``, then
    ``boxes_clipped`` and ``degenerate_boxes_dropped`` (train) or ``boxes_outside_image`` and
    ``degenerate_boxes_kept`` (eval), ``empty_images``, ``empty_images_dropped``.
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

    ann_ids = [a["id"] for a in coco.dataset["annotations"]]
    stats = {
        "annotations": 0,
        "annotations_without_image": sum(len(a) for i, a in coco.imgToAnns.items() if i not in coco.imgs),
        "duplicate_annotation_ids": len(ann_ids) - len(set(ann_ids)),
        "crowd_boxes": 0,
        **box_counts(train),
        "empty_images": 0,
        "empty_images_dropped": 0,
    }
    if stats["duplicate_annotation_ids"]:
        log.warning("COCO annotation file %s: %d annotation(s) reuse an id already taken; all are read here, but "
                    "pycocotools scoring this file itself reads the last annotation of each repeated id in place "
                    "of the others.", annotations, stats["duplicate_annotation_ids"])  # fmt: skip
    records = []
    for img_id in sorted(coco.getImgIds()):
        record = _coco_record(coco, img_id, images, annotations, label_of, stats, train)
        stats["crowd_boxes"] += int(record.ignore.sum())
        if len(record.boxes) == 0:
            stats["empty_images"] += 1
            if not keep_empty:
                stats["empty_images_dropped"] += 1
                continue
        records.append(record)
    finish_box_stats(stats, f"COCO annotation file {annotations}")
    return records, meta, stats
