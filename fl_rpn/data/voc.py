"""Reader for VOC-format datasets (one XML file per image): PASCAL VOC and the output of labelling tools.

Two layouts: a ``VOCdevkit`` folder with ``VOC<year>/`` sub-folders (PASCAL VOC 2007/2012), or a single folder
holding ``Annotations/``, ``JPEGImages/`` and ``ImageSets/Main/<split>.txt`` (labelImg, CVAT, Roboflow exports).
The class names are the 20 PASCAL classes by default, a given list, or (``classes=None``) the sorted names found in
the XML files of a named split, normally the training split.
"""

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


def parse_voc_xml(
    xml_file: Path, classes: Sequence[str] = VOC_CLASSES
) -> tuple[int, int, list[list[float]], list[int], list[bool]]:
    """Parse one VOC XML file into ``(width, height, boxes, labels, difficult)``; labels are 1-based in ``classes``.

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
        if name not in classes:
            near = [c for c in classes if spelling_key(c) == spelling_key(name)]
            raise ValueError(
                f"VOC annotation {xml_file} has an object of unknown class {name!r}; the classes are {list(classes)} "
                + (f"({near[0]!r} differs only in case or spacing: give the object that spelling in the XML file)."
                   if near else "(set the dataset node's classes to the full list, or to null to collect them from "
                   "the training split's XML files).")
            )  # fmt: skip
        where = f"object {i} ({name}) "
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"VOC annotation {xml_file} has an object {name!r} without <bndbox>.")
        x1, y1, x2, y2 = (_number(bb, k, xml_file, where) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x1 - 1, y1 - 1, x2, y2])
        labels.append(classes.index(name) + 1)
        flag = obj.find("difficult")  # missing or empty: not difficult
        has_flag = flag is not None and (flag.text or "").strip() != ""
        difficult.append(has_flag and _number(obj, "difficult", xml_file, where) == 1)
    return int(width), int(height), boxes, labels, difficult


VOCSets = str | int | None | Sequence[tuple[str | int | None, str]]
IMAGE_SUFFIXES = (".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp", ".tif", ".tiff", ".webp")


def _sets(year: VOCSets, split: str) -> list[tuple[str | None, str]]:
    """``year`` and ``split`` as a list of ``(year, split)`` pairs; year None: the root is itself the year folder."""
    if year is None or isinstance(year, str | int):
        return [(None if year is None else str(year), split)]
    return [(None if y is None else str(y), str(s)) for y, s in year]


def _base(root: Path, year: str | None) -> Path:
    return root if year is None else root / f"VOC{year}"


def _image_ids(list_file: Path) -> list[str]:
    if not list_file.is_file():
        raise FileNotFoundError(f"VOC image list {list_file} does not exist.")
    try:
        return list_file.read_text(encoding="utf-8-sig").split()  # -sig: a BOM (Windows editors) is dropped
    except UnicodeDecodeError as e:
        raise ValueError(f"VOC image list {list_file} is not UTF-8 text: {e}") from e


def _image_file(images: Path, name: str, xml_file: Path) -> Path:
    """``images/<name>.jpg`` when it exists (PASCAL VOC), else the XML's ``<filename>``, else ``<name>`` with another
    image suffix; when none exists, ``<name>.jpg`` (the missing file is reported by the image check)."""
    default = images / f"{name}.jpg"
    if default.is_file():
        return default
    try:
        filename = ET.parse(xml_file).getroot().findtext("filename")
    except ET.ParseError:
        filename = None  # parse_voc_xml has already read this file; it cannot fail here
    if filename and filename.strip() and (images / Path(filename.strip()).name).is_file():
        return images / Path(filename.strip()).name
    for suffix in IMAGE_SUFFIXES:
        if (images / f"{name}{suffix}").is_file():
            return images / f"{name}{suffix}"
    return default


def spelling_key(name: str) -> str:
    """``name`` folded to lower case with its inner whitespace collapsed: ``"Red  Cell"`` and ``"red cell"`` meet."""
    return " ".join(name.split()).casefold()


def _check_spellings(names: dict[str, list[Path]], root: Path) -> None:
    """Refuse class names that differ only in case or spacing (``RBC`` in one XML file, ``rbc`` in another): almost
    always a labelling slip, which collecting the names would silently turn into two classes."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        groups.setdefault(spelling_key(name), []).append(name)
    clashes = [spellings for spellings in groups.values() if len(spellings) > 1]
    if not clashes:
        return
    lines = [f"VOC dataset {root}: class names that differ only in case or spacing would become separate classes:"]
    for spellings in clashes:
        for name in spellings:
            files = names[name]
            shown = ", ".join(f.name for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            lines.append(f"  {name!r} in {len(files)} file(s): {shown}")
    lines.append(
        "Give every object of a class one spelling in the XML files "
        "(e.g. sed -i 's|<name>rbc</name>|<name>RBC</name>|' Annotations/*.xml), then run again."
    )
    raise ValueError("\n".join(lines))


def collect_voc_classes(root: str | Path, year: VOCSets = None, split: str = "train") -> list[str]:
    """The sorted set of ``<object><name>`` values in the XML files of the listed images (one or more sets).

    Names that differ only in case or spacing (``spelling_key``) are refused, naming the files of each spelling.
    """
    root, names = Path(root), {}
    for y, s in _sets(year, split):
        base = _base(root, y)
        for image_id in _image_ids(base / "ImageSets" / "Main" / f"{s}.txt"):
            xml_file = base / "Annotations" / f"{image_id}.xml"
            if not xml_file.is_file():
                raise FileNotFoundError(f"VOC annotation {xml_file} does not exist.")
            try:
                objects = ET.parse(xml_file).getroot().iter("object")
            except ET.ParseError as e:
                raise ValueError(f"VOC annotation {xml_file} is not valid XML: {e}") from e
            for i, obj in enumerate(objects):
                files = names.setdefault(_text(obj, "name", xml_file, f"object {i} "), [])
                if not files or files[-1] != xml_file:
                    files.append(xml_file)
    _check_spellings(names, root)
    return sorted(names)


def _voc_classes(root: Path, sets: list, classes: Sequence[str] | None, classes_from: VOCSets | str) -> list[str]:
    """``classes`` checked (a list of distinct names), or with ``classes=None`` the names collected from the XML
    files of ``classes_from`` (a split name of the sets read, or ``(year, split)`` pairs; None: the sets read)."""
    if classes is None:
        if classes_from is None:
            source = sets
        elif isinstance(classes_from, str):  # a split name: in the year folder(s) read here
            source = list(dict.fromkeys((y, classes_from) for y, _ in sets))
        else:
            source = _sets(classes_from, "")
        classes = collect_voc_classes(root, source)
        if not classes:
            raise ValueError(f"VOC dataset {root}: no classes given and no <object> in the XML files of {source}.")
        lists = ", ".join(str(_base(root, y) / "ImageSets" / "Main" / f"{s}.txt") for y, s in source)
        log.info("VOC dataset %s: %d classes collected from the XML files listed in %s (sorted): %s",
                 root, len(classes), lists, classes)  # fmt: skip
    if isinstance(classes, str) or not all(isinstance(c, str) and c for c in classes):
        raise ValueError(f"VOC dataset {root}: classes must be a list of class names (e.g. [RBC, WBC]) or null, "
                         f"got {classes!r}.")  # fmt: skip
    if len(set(classes)) != len(classes):
        raise ValueError(f"VOC dataset {root}: the class list {list(classes)} names a class twice.")
    return list(classes)


def _read_voc_set(root: Path, year: str | None, split: str, classes: list[str], train: bool, records: list,
                  seen: set, stats: dict) -> None:  # fmt: skip
    """Append the records of one ``(year, split)`` image list to ``records``; ids in ``seen`` (read before, in this
    list or another) are skipped and counted."""
    base = _base(root, year)
    list_file = base / "ImageSets" / "Main" / f"{split}.txt"
    repeats = 0
    for name in _image_ids(list_file):
        if (year, name) in seen:
            repeats += 1
            continue
        seen.add((year, name))
        xml_file = base / "Annotations" / f"{name}.xml"
        if not xml_file.is_file():
            raise FileNotFoundError(f"VOC annotation {xml_file} (listed in {list_file}) does not exist.")
        width, height, boxes, labels, difficult = parse_voc_xml(xml_file, classes)
        record = make_record(
            _image_file(base / "JPEGImages", name, xml_file), len(records), width, height, boxes, labels, difficult,
            stats, source_id=name, source=f"VOC annotation {xml_file}",
            box_names=[f"object {i} ({classes[k - 1]})" for i, k in enumerate(labels)], train=train,
        )  # fmt: skip
        stats["difficult_boxes"] += int(record.ignore.sum())
        stats["empty_images"] += int(len(record.boxes) == 0)
        records.append(record)
    if repeats:
        log.warning("VOC image list %s: %d id(s) listed before are skipped (each image is read once).",
                    list_file, repeats)  # fmt: skip
    stats["duplicate_ids_skipped"] += repeats


def read_voc(
    root: str | Path,
    year: VOCSets = "2007",
    split: str = "trainval",
    train: bool = True,
    classes: Sequence[str] | None = VOC_CLASSES,
    classes_from: VOCSets | str = None,
) -> tuple[list[ImageRecord], DatasetMeta, dict[str, int]]:
    """Read ``root/VOC<year>/ImageSets/Main/<split>.txt`` with its ``Annotations/`` and ``JPEGImages/``.

    ``year`` may instead be a list of ``(year, split)`` pairs read one after the other, e.g.
    ``[("2007", "trainval"), ("2012", "trainval")]`` for VOC07+12 (``split`` is then unused). ``year=None`` (or a
    pair ``(None, split)``): ``root`` is itself the folder holding ``Annotations/``, ``JPEGImages/`` and
    ``ImageSets/Main/`` (a labelling tool's export). ``difficult`` objects are kept with ``ignore=True``.
    ``image_id`` is a running index over all sets; ``source_id`` keeps the VOC id (e.g. ``"000005"``). The image
    is ``JPEGImages/<id>.jpg``, else the XML's ``<filename>`` (png, jpeg, ...). Coordinates: see ``parse_voc_xml``.

    Classes: ``classes`` lists the names of labels 1..K (default: the 20 PASCAL VOC classes). ``classes=None``:
    the sorted names found in the XML files of ``classes_from`` (a split of the same root, or a list of
    ``(year, split)`` pairs; default: the sets read here), logged. An evaluation split is given its training
    split as ``classes_from`` (or the same list), so both have the same labels; an object of a class not in the
    list is an error naming the XML file and the class.

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
    sets = _sets(year, split)
    warn_unused = classes is not None and classes is not VOC_CLASSES  # a list of the user's own
    classes = _voc_classes(root, sets, classes, classes_from)
    stats = {"difficult_boxes": 0, **box_counts(train), "empty_images": 0, "duplicate_ids_skipped": 0}
    records: list[ImageRecord] = []
    seen: set[tuple[str | None, str]] = set()
    for y, s in sets:
        _read_voc_set(root, y, s, classes, train, records, seen, stats)
    if train and warn_unused:
        unused = sorted(set(classes) - {classes[k - 1] for r in records for k in r.labels})
        if unused:
            log.warning("VOC dataset %s: no training box of class(es) %s of the class list %s.", root, unused, classes)
    lists = ", ".join(str(_base(root, y) / "ImageSets" / "Main" / f"{s}.txt") for y, s in sets)
    finish_box_stats(stats, f"VOC image list(s) {lists}")
    meta = DatasetMeta(class_names=list(classes), category_ids=list(range(1, len(classes) + 1)))
    return records, meta, stats
