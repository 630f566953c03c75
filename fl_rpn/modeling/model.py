"""``build_model(cfg)``: the only code that knows FasterRCNN's constructor; ``model.rpn`` is its RPN variant's.

Config groups read here (see ``conf/model`` and ``conf/rpn``):
    ``model.name``: ``r50_fpn`` (torchvision's fasterrcnn_resnet50_fpn layout), ``mbv3_fpn``
    (fasterrcnn_mobilenet_v3_large_fpn), ``mbv2_fpn`` (torchvision's ``mobilenet_backbone("mobilenet_v2", fpn=True)``
    in a ``FasterRCNN``; torchvision has no builder for it) or ``tiny_fpn`` (a small GroupNorm CNN for CPU runs and
    tests).
    ``model.backbone_weights``: null | a torchvision weights name | a local file path.
    ``channels_last`` / ``compile`` (root keys): applied by ``apply_speed_options`` where the trainer builds the model.
    ``model.detector``: keyword arguments of ``FasterRCNN`` (min_size, box_* ...), passed verbatim.
    ``rpn.*``: ``fl_rpn.modeling.rpn_registry.build_rpn`` builds the head (``rpn.head``) and the RPN around it from
    the keys every rpn option shares (``conf/_base/rpn.yaml``: IoU thresholds, top-n, NMS) and the variant's own;
    ``rpn.loss`` names the variant's builder: ``sampled``
    (``batch_size_per_image`` / ``positive_fraction`` / ``box_normalizer``: torchvision's ``RegionProposalNetwork``
    untouched for ``sampled``, ``BoxPositivesRPN`` for ``positives``) or ``focal`` (``FocalLossRPN`` with
    ``form`` / ``loss_weight`` / ``alpha`` / ``gamma`` / ``prior_prob`` / ``box_normalizer``, and for the
    ``sampled`` box normaliser the optional ``box_sample_size``, default 256).
"""

from collections import OrderedDict
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchvision.models import get_weight, mobilenet_v2, mobilenet_v3_large, resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    _mobilenet_extractor,
    _resnet_fpn_extractor,
)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import misc as misc_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..checks import check, check_choice
from ..errors import WeightsUnavailableError
from ..pretrained import FETCH_COMMANDS, check_cached_file, hub_checkpoints_dir
from .rpn_registry import build_rpn

__all__ = [
    "build_model", "build_backbone", "anchor_generator", "check_model_config", "fetch_backbone_weights",
    "apply_speed_options", "TinyBackbone", "COMPILE_MODES",
]  # fmt: skip


class TinyBackbone(nn.Sequential):
    """A 4-stage CNN with GroupNorm (trains from scratch with small batches).

    Input ``[N, 3, H, W]``; stage ``i`` (``layer1``..``layer4``) outputs ``[N, widths[i], H / 2^(i+2), W / 2^(i+2)]``.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), blocks_per_stage: int = 2) -> None:
        conv = partial(
            misc_ops.Conv2dNormActivation, kernel_size=3, norm_layer=lambda c: nn.GroupNorm(min(8, c // 4), c)
        )
        layers = OrderedDict(stem=conv(3, widths[0], stride=2))
        in_channels = widths[0]
        for i, width in enumerate(widths):
            blocks = [conv(in_channels, width, stride=2)]
            blocks += [conv(width, width) for _ in range(blocks_per_stage - 1)]
            layers[f"layer{i + 1}"] = nn.Sequential(*blocks)
            in_channels = width
        super().__init__(layers)


def _few(keys: list[str], what: str) -> str:
    return f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})" if keys else ""


def _load_local_weights(module: nn.Module, path: Path, what: str) -> None:
    """Load a state dict file into ``module``; a file of another architecture names the keys that do not match
    (missing and unexpected, a few of each with their counts) or differ in shape. The classifier may be absent."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"model.backbone_weights={path}: not a state dict but a {type(state).__name__}")
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(("fc.", "classifier."))]
    unexpected = [k for k in state if k not in own and not k.endswith(".num_batches_tracked")]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        found = [_few(missing, "keys missing"), _few(unexpected, "unexpected"), _few(reshaped, "of another shape")]
        raise ValueError(f"model.backbone_weights={path}: not a {what} state dict: {', '.join(filter(None, found))}")
    module.load_state_dict(state, strict=False)


_WEIGHT_ENUMS = {
    "resnet50": "ResNet50_Weights", "mobilenet_v3_large": "MobileNet_V3_Large_Weights",
    "mobilenet_v2": "MobileNet_V2_Weights",
}  # fmt: skip
_BACKBONES = {"r50_fpn": "resnet50", "mbv3_fpn": "mobilenet_v3_large", "mbv2_fpn": "mobilenet_v2", "tiny_fpn": None}


def cached_weights_file(enum) -> Path:
    """Where torchvision reads (and downloads) a weights enum's file: ``<hub dir>/checkpoints/<its URL's name>``."""
    return hub_checkpoints_dir() / enum.url.rsplit("/", 1)[-1]


def backbone_weights_source(model_cfg: DictConfig, need_file: bool = True):
    """What ``model.backbone_weights`` names: ``None``, a local file ``Path`` or a torchvision weights enum.

    Downloads nothing, so the config check (``fl_rpn.engine.validate``) calls it before any data is read; it reads
    only a weights name's file already in torch's hub cache, to refuse it if its sha256 does not start with the hash
    in its name (torch.hub checks that only when it downloads). ``need_file=False`` accepts a missing file and
    reads nothing (resuming: the checkpoint holds the weights).
    """
    weights, what = model_cfg.backbone_weights, _BACKBONES.get(model_cfg.name)
    if weights is None:
        return None
    if what is None:
        raise ValueError(f"model.backbone_weights: {model_cfg.name} has no pretrained weights; set it to null")
    path = Path(str(weights)).expanduser()
    if path.suffix in {".pt", ".pth", ".bin"} or path.exists():
        if need_file and not path.is_file():
            raise FileNotFoundError(f"model.backbone_weights: no such file {path}")
        return path
    try:
        enum = get_weight(weights if "." in weights else f"{_WEIGHT_ENUMS[what]}.{weights}")
    except (ValueError, KeyError, AttributeError) as e:
        enum, error = None, e
    if enum is None or type(enum).__name__ != _WEIGHT_ENUMS[what]:
        raise ValueError(
            f"model.backbone_weights={weights!r} is neither a file nor a torchvision weights name of {what} "
            f"(e.g. {_WEIGHT_ENUMS[what]}.IMAGENET1K_V1 or IMAGENET1K_V1)"
        ) from (error if enum is None else None)
    cached = cached_weights_file(enum)
    if need_file and cached.is_file():
        check_cached_file(cached)
    return enum


def _pretrained_backbone(constructor, model_cfg: DictConfig, what: str, load: bool) -> tuple[nn.Module, bool]:
    """Build ``constructor`` (resnet50 / mobilenet_v3_large / mobilenet_v2) from a weights name or a local file.

    Returns the module and whether it is a pretrained layout (then BatchNorm is frozen, as in torchvision).
    With ``load=False`` the pretrained layout is built but nothing is read or downloaded: a checkpoint is
    about to overwrite the weights.
    """
    if model_cfg.backbone_weights is None:
        return constructor(weights=None, norm_layer=nn.BatchNorm2d), False
    if not load:
        return constructor(weights=None, norm_layer=misc_ops.FrozenBatchNorm2d), True
    source = backbone_weights_source(model_cfg)
    if isinstance(source, Path):
        module = constructor(weights=None, norm_layer=misc_ops.FrozenBatchNorm2d)
        _load_local_weights(module, source, what)
        return module, True
    enum = source
    try:
        return constructor(weights=enum, norm_layer=misc_ops.FrozenBatchNorm2d), True
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise _weights_unavailable(enum, e) from e


def _weights_unavailable(enum, error: Exception) -> WeightsUnavailableError:
    cached = cached_weights_file(enum)
    command = FETCH_COMMANDS.get(cached.name)
    fetch = f"run {command} (it puts the file there) or put" if command else "put"
    return WeightsUnavailableError(
        f"could not download backbone weights {enum} from {enum.url} ({error}). Offline: {fetch} that file at "
        f"{cached}, or set model.backbone_weights=/path/to/{cached.name}"
    )


def fetch_backbone_weights(model_cfg: DictConfig) -> None:
    """Make sure a torchvision weights name of ``model.backbone_weights`` is in torch's hub cache, downloading it if
    not, so that weights that cannot be had fail before any data is read (the trainer calls this first)."""
    source = backbone_weights_source(model_cfg)
    if source is None or isinstance(source, Path) or cached_weights_file(source).is_file():
        return
    try:
        source.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as e:
        raise _weights_unavailable(source, e) from e


def _trainable_layers(requested: int | None, trained: bool, all_layers: int) -> int:
    """torchvision's rule: a randomly initialised backbone trains every layer, a trained one 3 by default."""
    if not trained:
        return all_layers
    return 3 if requested is None else requested


def build_backbone(model_cfg: DictConfig, load_weights: bool = True) -> nn.Module:
    """Backbone + FPN with ``out_channels``; returns an ``OrderedDict`` of feature maps per level.

    ``load_weights=False`` builds the layout that ``model.backbone_weights`` implies without reading them.
    """
    name = model_cfg.name
    trainable = model_cfg.get("trainable_backbone_layers")
    if name == "r50_fpn":
        body, trained = _pretrained_backbone(resnet50, model_cfg, "resnet50", load_weights)
        return _resnet_fpn_extractor(body, _trainable_layers(trainable, trained, all_layers=5))
    if name in ("mbv3_fpn", "mbv2_fpn"):  # torchvision's mobilenet_backbone(..., fpn=True): 2 levels + max pool
        what = _BACKBONES[name]
        constructor = mobilenet_v3_large if name == "mbv3_fpn" else mobilenet_v2
        body, trained = _pretrained_backbone(constructor, model_cfg, what, load_weights)
        returned = model_cfg.get("returned_layers")  # mbv2_fpn only; null: torchvision's last two stages
        return _mobilenet_extractor(body, True, _trainable_layers(trainable, trained, all_layers=6),
                                    returned_layers=None if returned is None else list(returned))  # fmt: skip
    if name == "tiny_fpn":
        backbone_weights_source(model_cfg)  # null, or the error
        widths = tuple(model_cfg.widths)
        body = TinyBackbone(widths)
        return BackboneWithFPN(
            body,
            return_layers={f"layer{i + 1}": str(i) for i in range(len(widths))},
            in_channels_list=list(widths),
            out_channels=model_cfg.fpn_channels,
            extra_blocks=LastLevelMaxPool(),
        )
    raise ValueError(f"model.name must be one of {', '.join(_BACKBONES)}; got {name!r}")


def anchor_generator(model_cfg: DictConfig) -> AnchorGenerator:
    """``model.anchor_sizes`` (one tuple per feature level) x ``model.aspect_ratios``; null sizes: torchvision's
    FasterRCNN default, one size per level from 32 to 512 with ratios 0.5, 1, 2."""
    sizes = model_cfg.get("anchor_sizes")
    sizes = ((32,), (64,), (128,), (256,), (512,)) if sizes is None else tuple(tuple(s) for s in sizes)
    ratios = tuple(model_cfg.get("aspect_ratios") or (0.5, 1.0, 2.0))
    return AnchorGenerator(sizes, (ratios,) * len(sizes))


def build_model(cfg: DictConfig, num_classes: int, *, load_backbone_weights: bool = True) -> FasterRCNN:
    """A torchvision ``FasterRCNN`` for the composed root config ``cfg`` (``conf/train.yaml``), checked by
    ``check_model_config`` and ``check_rpn_config`` (``fl_rpn.engine.validate.validate_config`` runs both).

    Built in one direction: the backbone, the anchor generator, then the RPN (its head first, then the ``rpn.loss``
    variant around it: ``build_rpn``), and ``FasterRCNN`` around those parts. ``FasterRCNN`` takes the head and the
    anchor generator but builds torchvision's RPN itself, so that RPN is replaced by the variant's, made of the same
    parts: one head per model.

    Args:
        num_classes: object classes of the dataset (the predictor gets ``num_classes + 1`` with background).
        load_backbone_weights: ``False`` when a checkpoint will supply every weight (resume, eval, predict):
            the layout ``model.backbone_weights`` implies (frozen BatchNorm, trainable layers) is kept, but
            nothing is downloaded or read.
    """
    model_cfg = cfg.model
    backbone = build_backbone(model_cfg, load_backbone_weights)
    anchors = anchor_generator(model_cfg)
    rpn = build_rpn(cfg.rpn, anchors, backbone.out_channels)
    detector_kwargs = OmegaConf.to_container(model_cfg.detector, resolve=True)
    if model_cfg.get("box_head_dim") is not None:  # FasterRCNN hard-codes 1024 for its own head
        resolution = 7  # FasterRCNN's default MultiScaleRoIAlign output size
        detector_kwargs["box_head"] = TwoMLPHead(backbone.out_channels * resolution**2, model_cfg.box_head_dim)
        detector_kwargs["box_predictor"] = FastRCNNPredictor(model_cfg.box_head_dim, num_classes + 1)
    else:
        detector_kwargs["num_classes"] = num_classes + 1
    model = FasterRCNN(backbone, rpn_anchor_generator=anchors, rpn_head=rpn.head, **detector_kwargs)
    model.rpn = rpn
    return model


def check_model_config(cfg: DictConfig) -> None:
    """``model.name`` and ``model.backbone_weights`` (null, a torchvision weights name, or an existing file; a weights
    name's cached file must have its hash). A resumed run (``resume``) may name a file that is gone: the checkpoint
    holds the weights."""
    check_choice("model.name", cfg.model.name, list(_BACKBONES))
    sizes = cfg.model.get("anchor_sizes")
    if sizes is not None:  # one RPN head serves every level: the same number of anchors per location
        check(len({len(s) for s in sizes}) == 1, "model.anchor_sizes", [list(s) for s in sizes],
              "every level must have as many sizes as the others (one RPN head serves them all)")  # fmt: skip
    if cfg.model.name == "mbv2_fpn":
        check_mobilenet_levels(cfg.model)
    resuming = cfg.get("resume") not in (False, None, "false")
    backbone_weights_source(cfg.model, need_file=not resuming)


def check_mobilenet_levels(model_cfg: DictConfig) -> None:
    """``model.returned_layers``: null or increasing stage numbers in 0..5 of MobileNetV2's six (2: stride 8,
    3: 16, 4 and 5: 32); the FPN gives one map per returned stage plus a max-pool map, and ``model.anchor_sizes``
    needs one tuple per map (torchvision would fail at the first step with an unrelated message)."""
    returned = model_cfg.get("returned_layers")
    if returned is not None:
        stages = list(returned)
        ok = bool(stages) and all(isinstance(k, int) and 0 <= k <= 5 for k in stages) and stages == sorted(set(stages))
        check(ok, "model.returned_layers", stages, "must be null or increasing stage numbers in 0..5")
    levels = len(returned if returned is not None else (4, 5)) + 1
    sizes = model_cfg.get("anchor_sizes")
    if sizes is not None:
        check(len(sizes) == levels, "model.anchor_sizes", [list(s) for s in sizes],
              f"must have one list per feature map: {levels} (model.returned_layers + the max-pool level)")  # fmt: skip


COMPILE_MODES = (None, "default", "max-autotune")  # config key compile -> torch.compile(mode=...)


def apply_speed_options(model: FasterRCNN, *, channels_last: bool = False, compile_mode: str | None = None) -> None:
    """Speed options of the root config, in place; the parameters and the ``state_dict`` keys stay the same.

    ``channels_last``: every 4-d weight in NHWC layout, so the convolutions (which take the layout from their
    weight) run in NHWC, what tensor cores prefer; the padded ``[N, 3, H, W]`` image batch stays NCHW.
    ``compile_mode``: ``torch.compile`` the forward of the backbone + FPN and of the RPN head in place
    (``nn.Module.compile``), so no ``_orig_mod.`` prefix enters the checkpoint keys. The anchor matching, NMS and
    RoI heads stay eager (dynamic shapes). The first steps are slow while it compiles, once per new input shape.
    """
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"config key compile={compile_mode!r}: must be null, 'default' or 'max-autotune'")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile_mode is not None:
        model.backbone.compile(mode=compile_mode)
        model.rpn.head.compile(mode=compile_mode)
