"""Detection data: one reader per format, a common record type, the dataset, transforms and batching.

Every reader returns ``(records, meta, stats)``: a list of ImageRecord (absolute xyxy boxes, labels
1..K, an ``ignore`` flag), the DatasetMeta (class names, dataset category ids) and counts of what it
dropped or flagged.
"""

from .batching import collate_fn, create_aspect_ratio_groups, full_batches, rank_tokens
from .build import build_dataset, build_loader, read_dataset
from .check import SplitReport, check_dataset, require_valid
from .coco import read_coco
from .dataset import DetectionDataset
from .records import DatasetMeta, ImageRecord
from .synthetic import SHAPES, ensure_synthetic, make_synthetic_coco
from .transforms import build_transforms
from .voc import VOC_CLASSES, read_voc
from .yolo import COCO80_TO_COCO91, read_yolo

__all__ = [
    "COCO80_TO_COCO91",
    "SHAPES",
    "VOC_CLASSES",
    "DatasetMeta",
    "DetectionDataset",
    "ImageRecord",
    "SplitReport",
    "build_dataset",
    "build_loader",
    "build_transforms",
    "check_dataset",
    "collate_fn",
    "create_aspect_ratio_groups",
    "ensure_synthetic",
    "full_batches",
    "make_synthetic_coco",
    "read_coco",
    "read_dataset",
    "read_voc",
    "rank_tokens",
    "read_yolo",
    "require_valid",
]
