"""Checking a dataset before a run: every image file there, readable and of the size its annotations say.

The readers already fail on bad annotations (naming the file and entry) and count what they skip
(``dataset.stats``). On top of that, ``check_dataset`` looks at the images themselves, at one of three depths:

- ``exists``: one ``stat`` per image; the trainer always does this;
- ``header``: PIL reads each file's header: not an image, or another size than the annotations say;
- ``decode``: each image is fully decoded as training would: also truncated / corrupt files.

Images are checked in parallel threads. ``fl-rpn-check-data`` (``fl_rpn.cli.check_data``) decodes both splits and
prints the reports; the trainer calls ``require_valid`` with the depth set by ``check_images``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch.distributed as dist

from .dataset import DetectionDataset, image_size, read_image, size_mismatch
from .records import ImageRecord

log = logging.getLogger(__name__)

IMAGE_CHECKS = ("exists", "header", "decode")


def check_image(record: ImageRecord, depth: str = "exists") -> str | None:
    """The problem with ``record``'s image file, as one line that names it, or None."""
    file = record.file
    if not file.is_file():
        return f"{file}: image file does not exist (image_id {record.image_id})"
    if depth == "exists":
        return None
    try:
        if depth == "header":
            width, height = image_size(file)  # as decoded: EXIF orientation applied
        else:
            height, width = read_image(file).shape[1:]
    except (OSError, SyntaxError, ValueError) as e:
        return f"{file}: not a readable image ({e})"
    problem = size_mismatch(record, width, height)
    return None if problem is None else f"{file}: image is {problem}"


def check_images(records: list[ImageRecord], depth: str = "exists", workers: int | None = None) -> list[str]:
    """Problems (one line each) with the image files of ``records``, checked in ``workers`` threads."""
    if depth not in IMAGE_CHECKS:
        raise ValueError(f"image check depth {depth!r}: expected one of {IMAGE_CHECKS}")
    workers = workers or min(32, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [p for p in pool.map(lambda r: check_image(r, depth), records) if p is not None]


def drop_bad_images(dataset: DetectionDataset, depth: str = "decode", workers: int | None = None) -> list[str]:
    """Remove from ``dataset`` the records whose image fails ``check_image`` at ``depth`` (``bad_images=skip``).

    Counts them in ``dataset.stats["bad_images_skipped"]`` and returns their problems (one line each).
    """
    workers = workers or min(32, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(lambda r: check_image(r, depth), dataset.records))
    dataset.records = [r for r, p in zip(dataset.records, problems) if p is None]
    bad = [p for p in problems if p is not None]
    dataset.stats["bad_images_skipped"] = len(bad)
    return bad


@dataclass
class SplitReport:
    """What ``check_dataset`` found in one split; ``ok`` when it can be trained / evaluated on."""

    name: str
    images: int = 0
    boxes: int = 0
    ignored_boxes: int = 0
    classes: int = 0
    depth: str = "exists"
    stats: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    class_counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # class -> (boxes, images), not ignored

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, max_problems: int = 20, per_class: bool = False) -> str:
        """The counts and problems; ``per_class``: also the boxes and images of each class (``class_lines``)."""
        lines = [
            f"{self.name}: {self.images} images, {self.boxes} boxes ({self.ignored_boxes} ignored), "
            f"{self.classes} classes; images checked: {self.depth}"
        ]
        counted = {k: v for k, v in self.stats.items() if v}
        if counted:
            lines.append("  reader counts: " + ", ".join(f"{k}={v}" for k, v in counted.items()))
        if per_class:
            lines += self.class_lines()
        if self.problems:
            lines.append(f"  {len(self.problems)} problem(s):")
            lines += [f"    {p}" for p in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                lines.append(f"    ... and {len(self.problems) - max_problems} more")
        else:
            lines.append("  OK")
        return "\n".join(lines)

    def class_lines(self) -> list[str]:
        """Per class, most boxes first: its boxes and the images holding one (ignored boxes left out), then the
        ratio of the most to the least frequent class's boxes."""
        if not self.class_counts:
            return []
        counts = sorted(self.class_counts.items(), key=lambda item: -item[1][0])  # stable: ties in class order
        width = max(len("class"), *(len(name) for name in self.class_counts))
        lines = ["  boxes per class (ignored boxes left out), most first:", f"    {'class':<{width}}  boxes  images"]
        lines += [f"    {name:<{width}}  {boxes:>5}  {images:>6}" for name, (boxes, images) in counts]
        (most, (top, _)), (least, (bottom, _)) = counts[0], counts[-1]
        ratio = f"{top / bottom:.1f}" if bottom else f"inf ({least} has none)"
        return [*lines, f"  most / least frequent class: {most} / {least} = {top} / {bottom} boxes = {ratio}"]


def _no_images(stats: dict[str, int]) -> str:
    """Why a split has no images, as far as the reader's counts tell."""
    dropped = stats.get("empty_images_dropped", 0)
    if not dropped:
        return "the dataset has no images (check its paths, image list or keep_empty)"
    problem = f"the dataset has no images: all {dropped} were dropped as having no boxes (keep_empty: false)"
    degenerate = stats.get("degenerate_boxes_dropped", 0)
    if degenerate:
        problem += (f", after {degenerate} boxes <= 1 px wide or high were dropped (see the reader's warning above; "
                    "are the boxes in pixels?)")  # fmt: skip
    return problem


def class_counts(records: list[ImageRecord], class_names: list[str]) -> dict[str, tuple[int, int]]:
    """``{class name: (boxes, images holding one)}`` over ``records``, in class order; ignored boxes (crowd, VOC
    difficult) are left out."""
    boxes, images = Counter(), Counter()
    for r in records:
        labels = r.labels[~r.ignore].tolist()
        boxes.update(labels)
        images.update(set(labels))
    return {name: (boxes[k], images[k]) for k, name in enumerate(class_names, 1)}


def check_dataset(
    dataset: DetectionDataset, name: str, depth: str = "exists", workers: int | None = None
) -> SplitReport:
    """Check one split: not empty, and every image file at ``depth`` (see the module docstring)."""
    records = dataset.records
    report = SplitReport(
        name=name,
        images=len(records),
        boxes=sum(len(r.boxes) for r in records),
        ignored_boxes=sum(int(r.ignore.sum()) for r in records),
        classes=dataset.meta.num_classes,
        depth=depth,
        stats=dict(getattr(dataset, "stats", {})),
        class_counts=class_counts(records, dataset.meta.class_names),
    )
    if not records:
        report.problems.append(_no_images(report.stats))
    report.problems += check_images(records, depth, workers)
    return report


def require_valid(
    datasets: Mapping[str, DetectionDataset], depth: str | Mapping[str, str] = "exists"
) -> list[SplitReport]:
    """Check each named split, log its summary, and raise ``ValueError`` listing the problems of all of them.

    ``depth`` is one depth for every split, or one per split name. Under ``torch.distributed`` every rank checks
    (and raises), but only rank 0 logs the summaries: ranks > 0 log to stdout without timestamps (``fl_rpn.cli.train``)
    and would repeat each of them.
    """
    depths = depth if isinstance(depth, Mapping) else dict.fromkeys(datasets, depth)
    reports = [check_dataset(ds, name, depths[name]) for name, ds in datasets.items()]
    if not dist.is_initialized() or dist.get_rank() == 0:
        for report in reports:
            (log.info if report.ok else log.error)("%s", report.summary())
    bad = [r for r in reports if not r.ok]
    if bad:
        raise ValueError(
            "the data has problems; nothing was trained:\n"
            + "\n".join(r.summary(max_problems=10) for r in bad)
            + "\n(fl-rpn-check-data with the same overrides lists every problem)"
        )
    return reports
