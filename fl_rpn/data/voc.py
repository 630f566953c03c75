"""Reader for PASCAL VOC (VOCdevkit layout, one XML file per image)."""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from .records import DatasetMeta, ImageRecord, box_counts, finish_box_stats, make_record

log = logging.getLogger(__name__)

VOC_CLASSES = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]


def _text(node: ET.Element, key: str, xml_file: Path, where: str = "") -> str:
    """The stripped text of ``node``'s child ``key``; ``where`` (e.g. ``"object 2 (dog) "``) goes into errors."""
    child = node.find(key)
    if child is None or child.text is None:
        raise ValueError(f"VOC annotation {xml_file}: {where}has no <{key}> under <{node.tag}>.")
    return child.text.strip()


def _number(node: ET.Element, key: str, xml_file: Path, where: str = "") -> float:
    text = _text(node, key, xml_file, where)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"VOC annotation {xml_file}: {where}<{node.tag}><{key}> is {text!r}, not a number.") from None


def parse_voc_xml(xml_file: Path) -> tuple[int, int, list[list[float]], list[int], list[bool]]:
    """Parse one VOC XML file into ``(width, height, boxes, labels, difficult)``.

    VOC stores 1-based inclusive pixel indices; like torchvision's and detectron2's VOC loaders we
    subtract 1 from ``xmin`` and ``ymin`` only, which turns them into 0-based continuous ``xyxy``
    (a box over pixels 1..10 becomes ``x1=0, x2=10``).
    """
    try:
        root = ET.parse(xml_file).getroot()
    except ET.ParseError as e:
        raise ValueError(f"VOC annotation {xml_file} is not valid XML: {e}") from e
    size = root.find("size")
    if size is None:
        raise ValueError(f"VOC annotation {xml_file} has no <size>.")
    width, height = _number(size, "width", xml_file), _number(size, "height", xml_file)
    if not (math.isfinite(width) and math.isfinite(height)):
        raise ValueError(f"VOC annotation {xml_file}: image size {width}x{height} (WxH) is not finite.")
    boxes, labels, difficult = [], [], []
    for i, obj in enumerate(root.iter("object")):
        name = _text(obj, "name", xml_file, f"object {i} ")
        if name not in VOC_CLASSES:
            raise ValueError(f"VOC annotation {xml_file} has an object of unknown class {name!r}.")
        where = f"object {i} ({name}) "
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"VOC annotation {xml_file} has an object {name!r} without <bndbox>.")
        x1, y1, x2, y2 = (_number(bb, k, xml_file, where) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x1 - 1, y1 - 1, x2, y2])
        labels.append(VOC_CLASSES.index(name) + 1)
        flag = obj.find("difficult")  # missing or empty: not difficult
        has_flag = flag is not None and (flag.text or "").strip() != ""
        difficult.append(has_flag and _number(obj, "difficult", xml_file, where) == 1)
    return int(width), int(height), boxes, labels, difficult


def read_voc(
    root: str | Path,
    year: str | int | Sequence[tuple[str | int, str]] = "2007",
    split: str = "trainval",
    train: bool = True,
) -> tuple[list[ImageRecord], DatasetMeta, dict[str, int]]:
    """Read ``root/VOC<year>/ImageSets/Main/<split>.txt`` with its ``Annotations/`` and ``JPEGImages/``.

    ``year`` may instead be a list of ``(year, split)`` pairs read one after the other, e.g.
    ``[("2007", "trainval"), ("2012", "trainval")]`` for VOC07+12 (``split`` is then unused).
    ``difficult`` objects are kept with ``ignore=True``. ``image_id`` is a running index over all
    sets; ``source_id`` keeps the VOC id (e.g. ``"000005"``). Coordinates: see ``parse_voc_xml``.

    An XML without ``<object>`` is a negative image (kept, counted in ``empty_images``). ``train=True``: boxes
    reaching outside ``<size>`` are clipped (counted), boxes <= 1 px dropped (counted); ``train=False``
    (evaluation): every box is kept as annotated, as the devkit's ``voc_eval`` reads it, and the same boxes are
    counted (``make_record``). An id listed again (in the same list or another set) is read once; the repeats
    are skipped and counted. The image lists may start with a UTF-8 byte-order mark. Errors (``ValueError``
    naming the XML file and the object): invalid XML, a missing ``<size>``, ``<name>`` or ``<bndbox>`` field, a
    size, coordinate or ``<difficult>`` flag that is not a number, a NaN or infinite size or coordinate, an unknown
    class, ``xmax < xmin`` or ``ymax < ymin``.

    Stats: ``difficult_boxes``, ``boxes_clipped`` and ``degenerate_boxes_dropped`` (train) or
    ``boxes_outside_image`` and ``degenerate_boxes_kept`` (eval), ``empty_images``, ``duplicate_ids_skipped``.
    """
    root = Path(root)
    sets = [(str(year), split)] if isinstance(year, str | int) else [(str(y), str(s)) for y, s in year]
    stats = {"difficult_boxes": 0, **box_counts(train), "empty_images": 0, "duplicate_ids_skipped": 0}
    records: list[ImageRecord] = []
    seen: set[tuple[str, str]] = set()
    for y, s in sets:
        base = root / f"VOC{y}"
        list_file = base / "ImageSets" / "Main" / f"{s}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"VOC image list {list_file} does not exist.")
        try:
            names = list_file.read_text(encoding="utf-8-sig").split()  # -sig: a BOM (Windows editors) is dropped
        except UnicodeDecodeError as e:
            raise ValueError(f"VOC image list {list_file} is not UTF-8 text: {e}") from e
        repeats = 0
        for name in names:
            if (y, name) in seen:
                repeats += 1
                continue
            seen.add((y, name))
            xml_file = base / "Annotations" / f"{name}.xml"
            if not xml_file.is_file():
                raise FileNotFoundError(f"VOC annotation {xml_file} (listed in {list_file}) does not exist.")
            width, height, boxes, labels, difficult = parse_voc_xml(xml_file)
            record = make_record(
                base / "JPEGImages" / f"{name}.jpg",
                len(records),
                width,
                height,
                boxes,
                labels,
                difficult,
                stats,
                source_id=name,
                source=f"VOC annotation {xml_file}",
                box_names=[f"object {i} ({VOC_CLASSES[k - 1]})" for i, k in enumerate(labels)],
                train=train,
            )
            stats["difficult_boxes"] += int(record.ignore.sum())
            stats["empty_images"] += int(len(record.boxes) == 0)
            records.append(record)
        if repeats:
            log.warning("VOC image list %s: %d id(s) listed before are skipped (each image is read once).",
                        list_file, repeats)  # fmt: skip
        stats["duplicate_ids_skipped"] += repeats
    lists = ", ".join(str(root / f"VOC{y}" / "ImageSets" / "Main" / f"{s}.txt") for y, s in sets)
    finish_box_stats(stats, f"VOC image list(s) {lists}")
    meta = DatasetMeta(class_names=list(VOC_CLASSES), category_ids=list(range(1, len(VOC_CLASSES) + 1)))
    return records, meta, stats
