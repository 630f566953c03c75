"""``torch.export`` of a torchvision Faster R-CNN: one ``.pt2`` program whose image height and width are dynamic.

``export_program(model, image)`` traces ``model`` (a torchvision ``GeneralizedRCNN``, e.g. what
``export_torchvision`` returns) on the example ``image``. Saved with ``torch.export.save`` and loaded with
``torch.export.load(path).module()`` (after ``import torchvision``: the program calls its ``nms`` and ``roi_align``
operators), it takes ``[image]``, one float ``[3, H, W]`` image in [0, 1] of any height and width (2 or more),
and returns ``[{"boxes": [D, 4], "labels": [D], "scores": [D]}]`` as the eager model does.

torchvision's inference code reads sizes in ways that ``torch.export`` cannot keep symbolic: the resized image's
size and padding through Python floats and ``min`` (they would be fixed to the example's), and the number of
proposals and detections, which depends on the data, through ``len``, ``if n > 0`` and a branch on the box count.
While exporting, these pieces are swapped for equivalents written with shape arithmetic (restored afterwards):

- ``transform._resize_image_and_masks``: the same scale, ``min(min_size / min(H, W), max_size / max(H, W))``, and
  the same truncated size, with ``torch.sym_min`` / ``torch.sym_max``;
- ``GeneralizedRCNNTransform.batch_images``: the zero padding to multiples of 32 as ``F.pad`` of integer amounts;
- ``boxes.batched_nms``: always its coordinate trick (each class's boxes shifted apart, one ``nms``), which
  torchvision itself uses up to 1,000 boxes on the CPU; above that it loops over ``torch.unique`` of the classes.
  The same boxes are kept, except that an IoU within float rounding of the threshold may round the other way;
- ``poolers._multiscale_roi_align``: the number of RoIs as ``rois.shape[0]`` instead of ``len(rois)``;
- ``BoxCoder.decode``: no branch on the number of boxes, ``[N, 4K]`` deltas unflattened to ``[N, K, 4]``;
- the fake ``torchvision::nms`` (the result shape the tracer sees): torchvision's declares 2 or more kept boxes, so
  the program would assert that at run time and fail on an image with 0 or 1 detection
  (``Runtime assertion failed for expression u9 >= 2``); for the export, one that declares 0 or more.

Only inference is exported (the model in eval mode, no losses), one image per call, and only the boxes, labels and
scores: Mask R-CNN's mask pasting is not covered.
"""

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import transform as rcnn_transform
from torchvision.ops import boxes as box_ops
from torchvision.ops import nms, poolers, roi_align

__all__ = ["export_program", "exportable"]


def _resize(image, self_min_size, self_max_size, target=None, fixed_size=None):
    """``image`` ``[3, H, W]`` resized (bilinear) by ``min(min_size / min(H, W), max_size / max(H, W))`` to
    ``[3, int(H * scale), int(W * scale)]``, as torchvision's inference does."""
    if target is not None or fixed_size is not None:
        raise ValueError("format=pt2 exports inference only, without transform.fixed_size")
    height, width = image.shape[-2:]
    scale = torch.sym_min(self_min_size / torch.sym_min(height, width), self_max_size / torch.sym_max(height, width))
    # the new size as fresh (data-dependent) ints: carried through every later shape, the float expression above
    # would make the tracer's symbolic algebra take minutes
    size = torch.tensor([torch.sym_int(height * scale), torch.sym_int(width * scale)]).tolist()
    for side in size:
        torch._check(side >= 1)
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0], target


def _batch_images(self, images, size_divisible=32):
    """``[image]`` (one ``[3, H, W]``) as a ``[1, 3, H', W']`` batch, zero-padded at the bottom and the right to
    multiples of ``size_divisible``."""
    (image,) = images
    height, width = image.shape[-2:]
    return F.pad(image, (0, -width % size_divisible, 0, -height % size_divisible))[None]


def _batched_nms(boxes, scores, idxs, iou_threshold):
    """Indices ``[K]`` (best first) of the ``boxes`` ``[N, 4]`` that class-wise NMS keeps: each class ``idxs`` ``[N]``
    shifted by ``idxs * (largest coordinate + 1)``, one ``nms`` over ``scores`` ``[N]``."""
    largest = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()  # 0 without boxes
    return nms(boxes + (idxs.to(boxes) * (largest + 1))[:, None], scores, iou_threshold)


def _multiscale_roi_align(x_filtered, boxes, output_size, sampling_ratio, scales, mapper):
    """``[R, C, *output_size]``: each of the R boxes (``boxes``, one ``[R_i, 4]`` per image) pooled from the feature
    level that ``mapper`` assigns it (``x_filtered``: ``[N, C, H_l, W_l]`` per level, at ``scales``)."""
    rois = poolers._convert_to_roi_format(boxes)
    levels = mapper(boxes)
    result = x_filtered[0].new_zeros((rois.shape[0], x_filtered[0].shape[1], *output_size))
    for level, (feature, scale) in enumerate(zip(x_filtered, scales)):
        index = torch.where(levels == level)[0]
        result[index] = roi_align(feature, rois[index], output_size, scale, sampling_ratio).to(result.dtype)
    return result


def _decode(self, rel_codes, boxes):
    """``[N, K, 4]`` boxes from ``rel_codes`` ``[N, 4K]`` (K boxes per reference box) and the reference ``boxes``,
    one ``[N_i, 4]`` per image (N in all)."""
    return self.decode_single(rel_codes, torch.cat(boxes)).unflatten(1, (-1, 4))


def _nms_fake(dets, scores, iou_threshold):
    """The result of ``torchvision::nms`` for the tracer: ``[K]`` indices, K data-dependent and 0 or more."""
    return dets.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.long)


_SWAPS = (
    (rcnn_transform, "_resize_image_and_masks", _resize),
    (rcnn_transform.GeneralizedRCNNTransform, "batch_images", _batch_images),
    (box_ops, "batched_nms", _batched_nms),
    (poolers, "_multiscale_roi_align", _multiscale_roi_align),
    (det_utils.BoxCoder, "decode", _decode),
)


@contextlib.contextmanager
def exportable() -> Iterator[None]:
    """torchvision's detection code with the swaps of the module docstring, in this block only."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in _SWAPS]
    library = torch.library.Library("torchvision", "FRAGMENT")
    try:
        for owner, name, swap in _SWAPS:
            setattr(owner, name, swap)
        torch.library.register_fake("torchvision::nms", _nms_fake, lib=library)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
        library._destroy()  # torchvision's own fake nms is the one used again


def export_program(model: nn.Module, image: torch.Tensor) -> torch.export.ExportedProgram:
    """``model`` (a torchvision ``GeneralizedRCNN``) exported for inference on ``[image]``, ``image`` a float
    ``[3, H, W]`` example; the program takes any height and width (2 or more)."""
    model = model.eval()
    with torch.no_grad():
        model([image])  # the RoI pooler works out its feature scales on its first call, from concrete sizes
    height, width = torch.export.Dim("height", min=2), torch.export.Dim("width", min=2)
    with exportable():
        return torch.export.export(model, ([image],), dynamic_shapes=([{1: height, 2: width}],), strict=False)
