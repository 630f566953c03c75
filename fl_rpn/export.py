"""A trained detector as plain torchvision, torch.export, TorchScript or ONNX; none needs fl_rpn to load.

fl-rpn-export checkpoint=outputs/.../last.pt                      # model.pt2 (torch.export) + model.json (settings)
fl-rpn-export checkpoint=outputs/.../last.pt format=torchvision   # model.pt: the state dict (not for tiny_fpn)
fl-rpn-export checkpoint=outputs/.../last.pt format=torchscript   # model.ts: torch.jit.load, no Python classes
fl-rpn-export checkpoint=outputs/.../last.pt format=onnx          # model.onnx (opset 17): onnxruntime, ...

``export_torchvision(model)`` swaps the ``FocalLossRPN`` for torchvision's own ``RegionProposalNetwork`` and
``RPNHead``. The sigmoid form's head already is torchvision's. The softmax form's two-logit objectness layer
(``[2A]`` channels, anchor-major: a0 background, a0 object, a1 background, ...) is folded into one logit per
anchor, weight and bias ``w_obj - w_bg``: exact, because proposals are scored with ``sigmoid(z_obj - z_bg)``.
Inference is unchanged (to float rounding); training the exported model further would use torchvision's
sampled RPN loss.

``model.json`` names the torchvision function that rebuilds the layout (``torchvision_builder``); for ``mbv2_fpn``,
which torchvision has no detector builder for, it is ``FasterRCNN`` and ``torchvision_backbone`` gives the
``mobilenet_backbone`` call that makes its backbone.
"""

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from ._version import __version__
from .modeling.rpn import BoxPositivesRPN, FocalLossRPN, rpn_settings

__all__ = ["export_torchvision", "fold_objectness", "torchvision_settings", "export_checkpoint", "FORMATS"]

FORMATS = {"torchvision": "model.pt", "pt2": "model.pt2", "torchscript": "model.ts", "onnx": "model.onnx"}


def fold_objectness(cls_logits: nn.Conv2d) -> nn.Conv2d:
    """The ``[N, A, Hi, Wi]`` object-minus-background logit layer of a ``[N, 2A, Hi, Wi]`` two-logit one."""
    two_a = cls_logits.out_channels
    if two_a % 2:
        raise ValueError(f"a two-logit objectness layer needs an even number of channels, got {two_a}")
    folded = nn.Conv2d(cls_logits.in_channels, two_a // 2, kernel_size=cls_logits.kernel_size)
    folded.to(cls_logits.weight.device, cls_logits.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(cls_logits.weight[1::2] - cls_logits.weight[0::2])
        folded.bias.copy_(cls_logits.bias[1::2] - cls_logits.bias[0::2])
    return folded


def _torchvision_rpn(rpn: FocalLossRPN) -> RegionProposalNetwork:
    old = rpn.head
    tower = getattr(old, "conv", None)
    normed = tower is not None and any(isinstance(m, nn.GroupNorm) for m in tower.modules())
    if tower is None or normed or tower[0][0].in_channels != old.cls_logits.in_channels:  # RPNHead keeps C
        raise ValueError(
            f"this model's RPN head ({type(old).__name__}: rpn.head.kind decoupled or shared_matched, a width other "
            "than the features' or norm group) has no torchvision RPNHead form; only the default rpn.head exports"
        )
    head = RPNHead(old.cls_logits.in_channels, old.bbox_pred.out_channels // 4, conv_depth=len(old.conv))
    head.to(old.bbox_pred.weight.device, old.bbox_pred.weight.dtype)
    head.conv.load_state_dict(old.conv.state_dict())
    head.bbox_pred.load_state_dict(old.bbox_pred.state_dict())
    cls_logits = fold_objectness(old.cls_logits) if rpn.form == "softmax" else old.cls_logits
    head.cls_logits.load_state_dict(cls_logits.state_dict())
    settings = rpn_settings(rpn)
    settings["anchor_generator"] = copy.deepcopy(settings["anchor_generator"])
    # torchvision's sampler defaults: the focal RPN samples nothing
    return RegionProposalNetwork(**settings, head=head, batch_size_per_image=256, positive_fraction=0.5)


def export_torchvision(model: GeneralizedRCNN) -> GeneralizedRCNN:
    """A copy of ``model`` (Faster / Mask / Keypoint R-CNN) in eval mode whose ``rpn`` is torchvision's own.

    A ``FocalLossRPN`` becomes a ``RegionProposalNetwork`` with an ``RPNHead`` (the softmax form folded, see
    the module docstring); a ``BoxPositivesRPN`` (``rpn=sampled_boxpos``, which differs from torchvision's only in
    its training loss) becomes torchvision's own class with the same parts and sampler; a model with torchvision's RPN
    (``rpn=sampled``) is copied as is. ``model`` is not changed. Every other module is already torchvision's, except a
    ``tiny_fpn`` backbone (``TinyBackbone``).
    """
    if not isinstance(model, GeneralizedRCNN):
        raise TypeError(f"export_torchvision expects a torchvision GeneralizedRCNN, got {type(model).__name__}")
    rpn = model.rpn
    if not isinstance(rpn, FocalLossRPN | BoxPositivesRPN) and type(rpn) is not RegionProposalNetwork:
        raise ValueError(
            f"model.rpn is a {type(rpn).__name__}: only FocalLossRPN, BoxPositivesRPN and torchvision's "
            "RegionProposalNetwork export"
        )
    exported = copy.deepcopy(model)
    if isinstance(rpn, FocalLossRPN):
        exported.rpn = _torchvision_rpn(exported.rpn)
    elif isinstance(rpn, BoxPositivesRPN):
        sampler = rpn.fg_bg_sampler
        exported.rpn = RegionProposalNetwork(
            **rpn_settings(exported.rpn), head=exported.rpn.head, batch_size_per_image=sampler.batch_size_per_image,
            positive_fraction=sampler.positive_fraction,
        )  # fmt: skip
    return exported.eval()


def torchvision_settings(model: GeneralizedRCNN) -> dict[str, Any]:
    """What torchvision's ``FasterRCNN`` constructor needs, besides the backbone, to rebuild ``model``'s layout.

    ``num_classes`` (with background), ``anchor_sizes`` and ``aspect_ratios`` (one list per feature level, for
    ``AnchorGenerator``), ``box_head_dim`` (``TwoMLPHead`` width; torchvision's default is 1024) and ``kwargs``:
    the remaining keyword arguments, read from the model (``min_size``, ``rpn_nms_thresh``, ``box_score_thresh``...).
    """
    rpn, roi, transform = model.rpn, model.roi_heads, model.transform
    sampler, top_n = rpn.fg_bg_sampler, rpn_settings(rpn)
    kwargs = {
        "min_size": list(transform.min_size), "max_size": transform.max_size,
        "image_mean": list(transform.image_mean), "image_std": list(transform.image_std),
        "rpn_pre_nms_top_n_train": top_n["pre_nms_top_n"]["training"],
        "rpn_pre_nms_top_n_test": top_n["pre_nms_top_n"]["testing"],
        "rpn_post_nms_top_n_train": top_n["post_nms_top_n"]["training"],
        "rpn_post_nms_top_n_test": top_n["post_nms_top_n"]["testing"],
        "rpn_nms_thresh": rpn.nms_thresh, "rpn_score_thresh": rpn.score_thresh,
        "rpn_fg_iou_thresh": rpn.proposal_matcher.high_threshold,
        "rpn_bg_iou_thresh": rpn.proposal_matcher.low_threshold,
        "rpn_batch_size_per_image": sampler.batch_size_per_image if sampler else 256,
        "rpn_positive_fraction": sampler.positive_fraction if sampler else 0.5,
        "box_score_thresh": roi.score_thresh, "box_nms_thresh": roi.nms_thresh,
        "box_detections_per_img": roi.detections_per_img,
        "box_fg_iou_thresh": roi.proposal_matcher.high_threshold,
        "box_bg_iou_thresh": roi.proposal_matcher.low_threshold,
        "box_batch_size_per_image": roi.fg_bg_sampler.batch_size_per_image,
        "box_positive_fraction": roi.fg_bg_sampler.positive_fraction,
        "bbox_reg_weights": list(roi.box_coder.weights),
    }  # fmt: skip
    generator = rpn.anchor_generator
    return {
        "num_classes": roi.box_predictor.cls_score.out_features,
        "anchor_sizes": [list(s) for s in generator.sizes],
        "aspect_ratios": [list(r) for r in generator.aspect_ratios],
        "box_head_dim": getattr(getattr(roi.box_head, "fc7", None), "out_features", None),
        "kwargs": kwargs,
    }


# model.name -> torchvision's builder with the same layout (tiny_fpn's backbone is fl_rpn's own). mbv2_fpn has no
# ready builder: FasterRCNN(backbone, ...) with the backbone from torchvision's public mobilenet_backbone, called
# with torchvision_backbone's keyword arguments (weights=None; its default FrozenBatchNorm2d is BatchNorm2d at
# inference and loads a BatchNorm2d state dict).
TORCHVISION_BUILDERS = {
    "r50_fpn": "fasterrcnn_resnet50_fpn", "mbv3_fpn": "fasterrcnn_mobilenet_v3_large_fpn", "mbv2_fpn": "FasterRCNN",
}  # fmt: skip


def torchvision_backbone(model_cfg: dict) -> dict[str, Any] | None:
    """The torchvision call that rebuilds the backbone of a model without a ready builder (``mbv2_fpn``: its
    ``returned_layers`` included when set), or None."""
    if model_cfg["name"] != "mbv2_fpn":
        return None
    kwargs = {"backbone_name": "mobilenet_v2", "weights": None, "fpn": True}
    if model_cfg.get("returned_layers") is not None:
        kwargs["returned_layers"] = list(model_cfg["returned_layers"])
    return {"builder": "torchvision.models.detection.backbone_utils.mobilenet_backbone", "kwargs": kwargs}


def export_checkpoint(
    checkpoint: str | Path, fmt: str, out_dir: str | Path, opset: int = 17, image_size: tuple[int, int] = (320, 320)
) -> Path:
    """Write ``checkpoint``'s model as ``out_dir/model.{pt,pt2,ts,onnx}`` and its settings as ``out_dir/model.json``.

    ``torchvision``: the ``state_dict`` of ``export_torchvision(model)`` (refused for a model without a torchvision
    builder, such as ``tiny_fpn``: nothing but fl_rpn could load it); ``pt2``: ``torch.export`` of it
    (``fl_rpn.pt2``); ``torchscript``: ``torch.jit.script`` of it; ``onnx``: the TorchScript-based ONNX exporter at
    ``opset``. ``pt2`` and ``onnx`` trace on one random ``[3, *image_size]`` image (the image height and width stay
    dynamic). Returns the model file's path.
    """
    from .engine.checkpoint import model_from_checkpoint
    from .pt2 import export_program

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    model, ckpt = model_from_checkpoint(checkpoint)
    model_name = ckpt["config"]["model"]["name"]
    if fmt == "torchvision" and model_name not in TORCHVISION_BUILDERS:
        others = [f for f in FORMATS if f != "torchvision"]
        raise ValueError(
            f"format=torchvision cannot deploy model={model_name}: model.pt would be a state dict that only a "
            f"torchvision builder of the same layout can load, and {model_name}'s backbone is fl_rpn's own (only "
            f"fl_rpn could load it). Use format={', '.join(others[:-1])} or {others[-1]}: each holds the whole "
            "program, which torch (onnxruntime for onnx) loads without fl_rpn. Nothing was written."
        )
    exported = export_torchvision(model.cpu())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FORMATS[fmt]
    image = torch.rand(3, *image_size, generator=torch.Generator().manual_seed(0))  # what pt2 and onnx trace on
    if fmt == "torchvision":
        torch.save(exported.state_dict(), path)
    elif fmt == "pt2":
        torch.export.save(export_program(exported, image), path)
    elif fmt == "torchscript":
        torch.jit.script(exported).save(str(path))
    else:
        torch.onnx.export(
            exported, ([image],), str(path), opset_version=opset, dynamo=False,
            input_names=["image"], output_names=["boxes", "labels", "scores"],
            dynamic_axes={"image": [1, 2], "boxes": [0], "labels": [0], "scores": [0]},
        )  # fmt: skip
    settings = {
        "format": fmt, "file": path.name, "fl_rpn_version": __version__, "checkpoint": str(checkpoint),
        "model": model_name, "rpn": ckpt["config"]["rpn"]["name"],
        "torchvision_builder": TORCHVISION_BUILDERS.get(model_name),
        "torchvision_backbone": torchvision_backbone(ckpt["config"]["model"]),
        "class_names": list(ckpt["meta"]["class_names"]), **torchvision_settings(exported),
    }  # fmt: skip
    (out_dir / "model.json").write_text(json.dumps(settings, indent=2))
    print(f"{checkpoint} -> {path} ({fmt}), settings in {out_dir / 'model.json'}")
    return path
