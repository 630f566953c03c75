"""A map-style dataset over ImageRecords, in the input format of torchvision's detection models.

Shapes: image float32 [3, H, W] in [0, 1]; ``boxes`` float32 [M, 4] absolute xyxy; ``labels``
int64 [M] in 1..K.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image

from .records import DatasetMeta, ImageRecord


def read_image(file: Path) -> torch.Tensor:
    """Decode ``file`` to uint8 RGB [3, H, W]: torchvision.io (JPEG, PNG, WebP, GIF), else PIL (BMP, TIFF, ...).

    A truncated or non-image file raises ``ValueError`` naming it (``fl-rpn-check-data`` finds them all
    before a run).
    """
    try:
        return decode_image(str(file), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        error = re.sub(r"^.*?\.cpp:\d+, ", "", str(e))  # drop torchvision's source location
    try:  # a format torchvision.io does not decode, or a corrupt file: PIL decides
        with Image.open(file) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"Image {file} cannot be decoded: {error}; PIL: {e}") from e


class DetectionDataset(torch.utils.data.Dataset):
    """``dataset[i] -> (image, target)``.

    ``train=True``: ignored boxes (crowd / difficult) are removed, target is ``boxes``, ``labels``,
    ``image_id``. ``train=False``: all boxes are kept and the target adds ``ignore`` bool [M],
    ``area`` float32 [M] (COCO's area when the source has it, else the box area) and ``orig_size``
    ``(H, W)`` for the evaluators; eval transforms must then not change the geometry.
    ``transforms`` is called as ``transforms(image, target)`` with a ``tv_tensors.Image`` and
    ``target['boxes']`` as ``tv_tensors.BoundingBoxes`` (see ``build_transforms``).
    """

    def __init__(
        self,
        records: list[ImageRecord],
        meta: DatasetMeta,
        transforms: Callable | None = None,
        train: bool = True,
        stats: dict[str, int] | None = None,
    ) -> None:
        self.records = records
        self.meta = meta
        self.transforms = transforms
        self.train = train
        self.stats = dict(stats or {})  # the reader's counts of what it dropped or flagged

    def __len__(self) -> int:
        return len(self.records)

    def aspect_ratios(self) -> list[float]:
        """Width / height of each image, from the records (no decoding)."""
        return [r.width / r.height for r in self.records]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        r = self.records[index]
        if not r.file.is_file():
            raise FileNotFoundError(f"Image {r.file} (image_id {r.image_id}) does not exist.")
        image = read_image(r.file)
        if tuple(image.shape[1:]) != (r.height, r.width):
            raise ValueError(
                f"Image {r.file} is {image.shape[2]}x{image.shape[1]} (WxH) but its annotations say "
                f"{r.width}x{r.height}."
            )
        keep = ~r.ignore if self.train else slice(None)
        boxes = torch.as_tensor(r.boxes[keep], dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(r.height, r.width)),
            "labels": torch.as_tensor(r.labels[keep], dtype=torch.int64),
            "image_id": r.image_id,
        }
        if not self.train:
            target["ignore"] = torch.as_tensor(r.ignore, dtype=torch.bool)
            area = r.areas if r.areas is not None else (r.boxes[:, 2] - r.boxes[:, 0]) * (r.boxes[:, 3] - r.boxes[:, 1])
            target["area"] = torch.as_tensor(area, dtype=torch.float32)
            target["orig_size"] = (r.height, r.width)
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        if image.dtype == torch.uint8:
            image = image.float() / 255
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor)
        return image.as_subclass(torch.Tensor), target
