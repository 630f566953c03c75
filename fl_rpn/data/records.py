"""The in-memory form every reader produces, independent of the file format.

Shapes: M boxes in one image; boxes are absolute ``xyxy`` pixels in continuous coordinates
(a box covering pixel columns 0..9 is ``x1=0, x2=10``); labels are contiguous ``1..K``, 0 is background.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class ImageRecord:
    """One image and its annotations.

    ``boxes`` float32 [M, 4] xyxy (clipped to the image, degenerate ones dropped, when read for training; as
    annotated when read for evaluation: ``make_record``); ``labels`` int64 [M] in 1..K; ``ignore`` bool [M]
    marks COCO crowd regions and VOC ``difficult`` objects, which stay out of the training loss and are ignored
    by the evaluators; ``areas`` float32 [M] is COCO's own ``area`` (the object's segment area, which decides
    APs/APm/APl) when the source has one, else None; ``source_id`` is the dataset's own image name
    (VOC id, YOLO stem) when it has one.
    """

    file: Path
    image_id: int
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray
    areas: np.ndarray | None = None
    source_id: str | None = None


@dataclass
class DatasetMeta:
    """What the model and the evaluators need to know about the label space.

    ``class_names[k]`` names label ``k + 1``; ``category_ids[k]`` is the dataset's own category id for
    label ``k + 1`` (COCO ids have gaps; other formats use ``1..K`` unless told otherwise).
    """

    class_names: list[str]
    category_ids: list[int]

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.category_ids):
            raise ValueError(
                f"DatasetMeta has {len(self.class_names)} class names but {len(self.category_ids)} category ids."
            )

    @property
    def num_classes(self) -> int:
        """K, not counting the background."""
        return len(self.class_names)


def clip_and_keep(boxes: np.ndarray, width: int, height: int, min_size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Clip xyxy ``boxes`` [M, 4] to the image and flag the ones worth keeping.

    Returns the clipped float32 boxes [M, 4] and a bool mask [M] that is False for degenerate boxes,
    whose width or height is ``<= min_size`` pixels after clipping.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    w = clipped[:, 2] - clipped[:, 0]
    h = clipped[:, 3] - clipped[:, 1]
    return clipped, (w > min_size) & (h > min_size)


def box_counts(train: bool) -> dict[str, int]:
    """The zeroed box counts ``make_record`` keeps: what training clips and drops, or what evaluation keeps."""
    keys = ("boxes_clipped", "degenerate_boxes_dropped") if train else ("boxes_outside_image", "degenerate_boxes_kept")
    return dict.fromkeys(keys, 0)


def make_record(
    file: Path,
    image_id: int,
    width: int,
    height: int,
    boxes: list | np.ndarray,
    labels: list | np.ndarray,
    ignore: list | np.ndarray,
    stats: dict[str, int],
    areas: list | np.ndarray | None = None,
    source_id: str | None = None,
    source: str | None = None,
    box_names: list[str] | None = None,
    train: bool = True,
) -> ImageRecord:
    """Build an ImageRecord from raw xyxy boxes, checking them, and for training clipping and dropping them.

    - An image size that is not positive and finite, a box coordinate that is NaN or infinite, or a box with negative
      width or height is an error (``ValueError`` naming ``source``, the annotation file and entry the
      boxes come from, and the box: ``box_names[i]`` when given, e.g. ``"annotation 17"``, else ``box i``);
    - ``train=True``: boxes reaching outside the image are clipped to it and counted in ``stats['boxes_clipped']``;
      boxes whose width or height is <= 1 px after clipping (including boxes entirely outside the image) are dropped
      and counted in ``stats['degenerate_boxes_dropped']``;
    - ``train=False`` (evaluation): every box is kept exactly as annotated, as pycocotools and the VOC devkit read
      the file; the same boxes are counted instead, in ``stats['boxes_outside_image']`` and
      ``stats['degenerate_boxes_kept']``.

    Two private counters, ``stats['_boxes']`` and ``stats['_unit_boxes']`` (boxes whose every coordinate is <= 1),
    are for ``finish_box_stats``, which the reader calls once at the end.
    """
    where = source or f"the annotations of image {file}"

    def name(i: int) -> str:
        return box_names[i] if box_names is not None else f"box {i}"

    if not (0 < width < math.inf and 0 < height < math.inf):  # also False for NaN
        raise ValueError(f"{where}: image size {width}x{height} (WxH) is not positive and finite.")
    raw = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    bad = ~np.isfinite(raw).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: {name(i)} {raw[i].tolist()} (xyxy) has a NaN or infinite coordinate.")
    bad = (raw[:, 2] < raw[:, 0]) | (raw[:, 3] < raw[:, 1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: {name(i)} {raw[i].tolist()} (xyxy) has a negative width or height.")
    clipped, keep = clip_and_keep(raw, width, height)
    outside = (clipped != raw.astype(np.float32)).any(axis=1) & keep
    stats["_boxes"] = stats.get("_boxes", 0) + len(raw)
    stats["_unit_boxes"] = stats.get("_unit_boxes", 0) + int((np.abs(raw) <= 1).all(axis=1).sum())
    if train:
        stats["boxes_clipped"] = stats.get("boxes_clipped", 0) + int(outside.sum())
        stats["degenerate_boxes_dropped"] = stats.get("degenerate_boxes_dropped", 0) + int((~keep).sum())
        boxes = clipped
    else:
        stats["boxes_outside_image"] = stats.get("boxes_outside_image", 0) + int(outside.sum())
        stats["degenerate_boxes_kept"] = stats.get("degenerate_boxes_kept", 0) + int((~keep).sum())
        boxes, keep = raw.astype(np.float32), np.ones(len(raw), dtype=bool)
    return ImageRecord(
        file=Path(file),
        image_id=int(image_id),
        width=int(width),
        height=int(height),
        boxes=boxes[keep],
        labels=np.asarray(labels, dtype=np.int64).reshape(-1)[keep],
        ignore=np.asarray(ignore, dtype=bool).reshape(-1)[keep],
        areas=None if areas is None else np.asarray(areas, dtype=np.float32).reshape(-1)[keep],
        source_id=source_id,
    )


def finish_box_stats(stats: dict[str, int], where: str, pixel_boxes: bool = True) -> None:
    """Close a reader's box counts: pop ``make_record``'s private counters and say when the boxes look wrong.

    - ``pixel_boxes`` (the format stores pixels: COCO, VOC) and every coordinate of every box <= 1: the boxes look
      normalised to [0, 1] (a common YOLO-export mistake); ``ValueError`` naming ``where`` (the annotation file);
    - more than half the boxes <= 1 px wide or high: a warning naming ``where``, with the counts.
    """
    total, unit = stats.pop("_boxes", 0), stats.pop("_unit_boxes", 0)
    dropped = stats.get("degenerate_boxes_dropped", 0)
    degenerate = dropped + stats.get("degenerate_boxes_kept", 0)
    fate = "dropped for training" if dropped else "kept in the evaluation ground truth"
    if pixel_boxes and total and unit == total:
        raise ValueError(
            f"{where}: every coordinate of all {total} boxes is <= 1, so {degenerate} of them are <= 1 px wide or "
            "high: the boxes look normalised to [0, 1], but this format stores them in pixels."
        )
    if degenerate > total / 2:
        log.warning("%s: %d of %d boxes are <= 1 px wide or high (%s).", where, degenerate, total, fate)
