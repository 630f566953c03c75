"""A map-style dataset over ImageRecords, in the input format of torchvision's detection models.

Shapes: image float32 [3, H, W] in [0, 1]; ``boxes`` float32 [M, 4] absolute xyxy; ``labels``
int64 [M] in 1..K.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image

from .records import DatasetMeta, ImageRecord

EXIF_ORIENTATION = 0x0112  # the EXIF tag; values 5..8 turn the image by 90 degrees (width and height swap)
_TORCHVISION_ORIENTED = {"JPEG", "MPO", "PNG"}  # torchvision.io applies the EXIF tag of these (not WebP, GIF)
_TORCHVISION_FORMATS = _TORCHVISION_ORIENTED | {"GIF", "WEBP"}
_NO_PIXEL_LIMIT = threading.Lock()


def _open_header(file: Path) -> Image.Image:
    """``PIL.Image.open`` without PIL's decompression-bomb limit, which guards decoding, not reading a header."""
    try:
        return Image.open(file)
    except Image.DecompressionBombError:
        with _NO_PIXEL_LIMIT:
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                return Image.open(file)
            finally:
                Image.MAX_IMAGE_PIXELS = limit


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 = upright) that ``read_image`` applies to ``im``'s file, from the header only.

    torchvision.io (JPEG, PNG) reads the EXIF tag itself, and ignores WebP's; PIL (other formats) applies it in
    ``ImageOps.exif_transpose``, or, for TIFF, while reading (``im.size`` is then already turned).
    """
    if im.format in _TORCHVISION_ORIENTED:
        exif = Image.Exif()
        if im.info.get("exif"):
            exif.load(im.info["exif"])
        return int(exif.get(EXIF_ORIENTATION, 1))
    if im.format in _TORCHVISION_FORMATS or im.format == "TIFF":  # PIL's TIFF reader reports the turned size
        return 1
    return int(im.getexif().get(EXIF_ORIENTATION, 1))


def image_size(file: Path, oriented: bool = True) -> tuple[int, int]:
    """``(width, height)`` of ``file`` as ``read_image`` decodes it (EXIF orientation applied), from its header.

    ``oriented=False``: the stored size, before the orientation. Large images are fine (PIL's
    ``MAX_IMAGE_PIXELS`` is not applied to a header); a file that is not an image raises what ``PIL.Image.open``
    raises (an ``OSError``).
    """
    with _open_header(file) as im:
        width, height = im.size
        if oriented and _orientation(im) in (5, 6, 7, 8):
            width, height = height, width
    return width, height


def size_mismatch(record: ImageRecord, width: int, height: int) -> str | None:
    """None if ``record``'s file, decoded to ``width x height``, has the annotated size; else the mismatch, as
    ``"30x10 (WxH) but its annotations say 20x10"`` (with a hint when EXIF orientation explains it)."""
    if (width, height) == (record.width, record.height):
        return None
    problem = f"{width}x{height} (WxH) but its annotations say {record.width}x{record.height}"
    if (height, width) == (record.width, record.height) and image_size(record.file, oriented=False) != (width, height):
        problem += (
            " (its size before the 90-degree turn of its EXIF orientation tag, which is applied, as image viewers, "
            "detectron2 and ultralytics do: annotate the image as displayed, or remove the tag)"
        )
    return problem


def read_image(file: Path) -> torch.Tensor:
    """Decode ``file`` to uint8 RGB [3, H, W]: torchvision.io (JPEG, PNG, WebP, GIF), else PIL (BMP, TIFF, ...).

    The EXIF orientation is applied (torchvision.io for JPEG and PNG, ``ImageOps.exif_transpose`` for PIL's
    formats), so the pixels are upright as displayed and the size is ``image_size(file)``. A truncated or non-image
    file, or one too large for PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``; torchvision.io has
    none), raises ``ValueError`` naming it (``fl-rpn-check-data`` finds them all before a run).
    """
    try:
        return decode_image(str(file), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as e:
        error = re.sub(r"^.*?\.cpp:\d+, ", "", str(e))  # drop torchvision's source location
    try:  # a format torchvision.io does not decode, or a corrupt file: PIL decides
        with Image.open(file) as im:
            upright = ImageOps.exif_transpose(im)
            return torch.from_numpy(np.array(upright.convert("RGB"))).permute(2, 0, 1).contiguous()
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"Image {file} cannot be decoded: PIL refuses it as a possible decompression bomb ({e}); "
            "set PIL.Image.MAX_IMAGE_PIXELS higher (or to None) to read it, or convert it to PNG or JPEG."
        ) from e
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
        problem = size_mismatch(r, image.shape[2], image.shape[1])
        if problem:
            raise ValueError(f"Image {r.file} is {problem}.")
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
