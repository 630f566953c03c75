"""Reader for YOLO-format detection labels (one ``<stem>.txt`` per image, normalised ``cls cx cy w h``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from .dataset import image_size
from .records import DatasetMeta, ImageRecord, box_counts, finish_box_stats, make_record

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}

# The 80 contiguous classes of YOLO's COCO exports -> the COCO category ids (1..90 with gaps).
COCO80_TO_COCO91 = [
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
    11,
    13,
    14,
    15,
    16,
    17,
    18,
    19,
    20,
    21,
    22,
    23,
    24,
    25,
    27,
    28,
    31,
    32,
    33,
    34,
    35,
    36,
    37,
    38,
    39,
    40,
    41,
    42,
    43,
    44,
    46,
    47,
    48,
    49,
    50,
    51,
    52,
    53,
    54,
    55,
    56,
    57,
    58,
    59,
    60,
    61,
    62,
    63,
    64,
    65,
    67,
    70,
    72,
    73,
    74,
    75,
    76,
    77,
    78,
    79,
    80,
    81,
    82,
    84,
    85,
    86,
    87,
    88,
    89,
    90,
]


def load_yolo_names(names: str | Path | Sequence[str] | Mapping[int, str]) -> list[str]:
    """Class names from a YOLO data yaml (``names:`` as a list or a ``{index: name}`` dict) or directly."""
    source = "the given names"
    if isinstance(names, str | Path):
        source = str(names)
        path = Path(names)
        if not path.is_file():
            raise FileNotFoundError(f"YOLO data yaml {path} does not exist.")
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"YOLO data yaml {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict) or "names" not in data:
            raise ValueError(f"YOLO data yaml {path} has no 'names' key.")
        names = data["names"]
    if isinstance(names, str) or not isinstance(names, Sequence | Mapping):
        raise ValueError(f"YOLO class names in {source} must be a list or an {{index: name}} dict, got {names!r:.80}.")
    if isinstance(names, Mapping):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            keys = None
        if keys != list(range(len(names))):
            raise ValueError(f"YOLO class names in {source} must be indexed 0..{len(names) - 1} without gaps.")
        names = [names[k] if k in names else names[str(k)] for k in keys]
    names = [str(n) for n in names]
    if not names:
        raise ValueError(f"YOLO class names in {source} are empty.")
    return names


def _category_ids(category_ids: Sequence[int] | Mapping[int, int] | str | None, k: int) -> list[int]:
    if category_ids is None:
        return list(range(1, k + 1))
    if isinstance(category_ids, str):
        if category_ids != "coco80":
            raise ValueError(f"category_ids {category_ids!r} is not known; use 'coco80', a list or a dict.")
        category_ids = COCO80_TO_COCO91
    if isinstance(category_ids, Mapping):
        missing = [i for i in range(k) if i not in category_ids]
        if missing:
            raise ValueError(f"category_ids has no entry for the class indices {missing} (of 0..{k - 1}).")
        category_ids = [category_ids[i] for i in range(k)]
    if len(category_ids) != k:
        raise ValueError(f"category_ids has {len(category_ids)} entries but there are {k} class names.")
    try:
        return [int(c) for c in category_ids]
    except (TypeError, ValueError):
        raise ValueError(f"category_ids must be integers, got {list(category_ids)!r:.80}.") from None


def _read_label_file(path: Path, width: int, height: int, k: int) -> tuple[list[list[float]], list[int]]:
    boxes, labels = [], []
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM (Windows editors) is dropped
    except UnicodeDecodeError as e:
        raise ValueError(f"YOLO label file {path} is not UTF-8 text: {e}") from e
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            raise ValueError(f"YOLO label file {path}, line {line_no}: expected 'cls cx cy w h', got {line!r}.")
        try:
            cls_value = float(fields[0])  # some exporters write the class as "0.0"
            cx, cy, w, h = (float(f) for f in fields[1:])
        except ValueError as e:
            raise ValueError(f"YOLO label file {path}, line {line_no}: cannot parse {line!r}.") from e
        if not cls_value.is_integer():
            raise ValueError(f"YOLO label file {path}, line {line_no}: cannot parse {line!r}: the class "
                             f"{fields[0]} is not a whole number.")  # fmt: skip
        cls = int(cls_value)
        if not 0 <= cls < k:
            raise ValueError(f"YOLO label file {path}, line {line_no}: class {cls} is outside 0..{k - 1}.")
        if not all(0 <= v <= 1 for v in (cx, cy, w, h)):  # also False for NaN
            raise ValueError(
                f"YOLO label file {path}, line {line_no}: cx cy w h must be normalised to [0, 1], got {line!r}."
            )
        boxes.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
        labels.append(cls + 1)
    return boxes, labels


def read_yolo(
    images: str | Path,
    labels: str | Path,
    names: str | Path | Sequence[str] | Mapping[int, str],
    category_ids: Sequence[int] | Mapping[int, int] | str | None = None,
    train: bool = True,
) -> tuple[list[ImageRecord], DatasetMeta, dict[str, int]]:
    """Read every image under the folder ``images`` (sub-folders included) with its labels.

    The labels of ``images/<sub>/<stem>.<ext>`` are ``labels/<sub>/<stem>.txt`` (ultralytics' layout). Normalised
    ``cx cy w h`` become absolute ``xyxy`` using each image's size as decoded (from the file header, with its EXIF
    orientation applied, as ultralytics does; so are the pixels, ``read_image``). An image without a label file,
    or with an empty one, is a negative image. YOLO class ``c`` (``c`` or ``c.0``) becomes label ``c + 1``; K is
    ``len(names)`` whether or not every class occurs. ``category_ids`` maps class index -> the id evaluation
    should report (a list, a dict, or ``"coco80"`` for ``COCO80_TO_COCO91``); by default ``1..K``.
    ``image_id`` is a running index in path order; ``source_id`` is the path under ``images`` without its suffix
    (the stem for an image at the top).

    Errors (``ValueError`` naming the file, and the line for labels): a data yaml that is not YAML or whose
    ``names`` is not a list or an ``{index: name}`` dict, an image file PIL cannot identify, two images that
    would share a label file (``a.jpg`` and ``a.png``), a label file that is not UTF-8 text (a BOM is fine), a
    label line without exactly 5 fields, a class that is not a whole number or is outside ``0..K-1``,
    ``cx cy w h`` outside [0, 1] or NaN.
    ``train=True``: boxes reaching past the image border are clipped (counted), boxes <= 1 px dropped (counted);
    ``train=False``: kept as labelled, and counted (``make_record``).

    Stats: ``missing_label_files``, ``empty_images``, ``boxes_clipped`` and ``degenerate_boxes_dropped`` (train)
    or ``boxes_outside_image`` and ``degenerate_boxes_kept`` (eval), ``label_files_without_image``.
    """
    images, labels = Path(images), Path(labels)
    for folder in (images, labels):
        if not folder.is_dir():
            raise FileNotFoundError(f"YOLO folder {folder} does not exist.")
    class_names = load_yolo_names(names)
    meta = DatasetMeta(class_names=class_names, category_ids=_category_ids(category_ids, len(class_names)))
    files = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    image_of: dict[Path, Path] = {}  # label path under labels/ -> its image
    for file in files:
        key = file.relative_to(images).with_suffix(".txt")
        other = image_of.setdefault(key, file)
        if other != file:
            raise ValueError(f"YOLO images {other} and {file} would share the label file {labels / key}; "
                             "rename one of them.")  # fmt: skip
    stats = {"missing_label_files": 0, "empty_images": 0, **box_counts(train)}
    records = []
    for image_id, file in enumerate(files):
        try:
            width, height = image_size(file)
        except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"YOLO image {file} is not a readable image ({type(e).__name__}: {e}).") from e
        relative = file.relative_to(images)
        label_file = labels / relative.with_suffix(".txt")
        boxes, classes = [], []
        if label_file.is_file():
            boxes, classes = _read_label_file(label_file, width, height, len(class_names))
        else:
            stats["missing_label_files"] += 1
        record = make_record(
            file, image_id, width, height, boxes, classes, [False] * len(boxes), stats,
            source_id=relative.with_suffix("").as_posix(), source=f"YOLO image {file}", train=train,
        )  # fmt: skip
        stats["empty_images"] += int(len(record.boxes) == 0)
        records.append(record)
    stats["label_files_without_image"] = sum(p.relative_to(labels) not in image_of for p in labels.rglob("*.txt"))
    finish_box_stats(stats, f"YOLO labels {labels}", pixel_boxes=False)
    return records, meta, stats
