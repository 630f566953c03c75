"""fl-rpn: Focal Loss for Region Proposal Network (Chen, Song, Jiang, PRCV 2018) on torchvision."""

from .losses import objectness_probability, sigmoid_focal_loss, softmax_focal_loss
from .model import build_model
from .rpn import FocalLossRPN, TwoLogitRPNHead, init_objectness_prior, use_focal_rpn

__all__ = [
    "FocalLossRPN",
    "TwoLogitRPNHead",
    "build_model",
    "init_objectness_prior",
    "objectness_probability",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "use_focal_rpn",
]
__version__ = "0.1.0"
