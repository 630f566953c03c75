"""fl-rpn: Focal Loss for Region Proposal Network (Chen, Song, Jiang, PRCV 2018) on torchvision."""

from ._version import __version__
from .export import export_torchvision
from .modeling.losses import objectness_probability, sigmoid_focal_loss, softmax_focal_loss
from .modeling.model import build_model
from .modeling.rpn import FocalLossRPN, TwoLogitRPNHead, init_objectness_prior, use_focal_rpn

__all__ = [
    "__version__",
    "FocalLossRPN",
    "TwoLogitRPNHead",
    "build_model",
    "export_torchvision",
    "init_objectness_prior",
    "objectness_probability",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "use_focal_rpn",
]
