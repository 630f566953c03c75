"""``fl-rpn-export``: a trained detector as a torch.export program, plain torchvision, TorchScript or ONNX
(``fl_rpn.export``).

fl-rpn-export checkpoint=outputs/.../last.pt                      # model.pt2: torch.export.load(...).module()
fl-rpn-export checkpoint=outputs/.../last.pt format=torchvision   # model.pt (state dict) + model.json (settings)
fl-rpn-export checkpoint=outputs/.../last.pt format=torchscript   # model.ts: torch.jit.load, no Python classes
fl-rpn-export checkpoint=outputs/.../last.pt format=onnx          # model.onnx (opset 17): onnxruntime, ...
"""

import hydra
from omegaconf import DictConfig

from ..config import CONF_DIR
from ..errors import report_errors
from ..export import export_checkpoint
from .preflight import preflight


@hydra.main(config_path=str(CONF_DIR), config_name="export", version_base=None)
@report_errors
def export_app(cfg: DictConfig) -> None:
    export_checkpoint(cfg.checkpoint, cfg.format, cfg.out_dir, cfg.opset, tuple(cfg.image_size))


def main() -> None:
    preflight(
        "fl-rpn-export", "export",
        "a checkpoint as a program or state dict that loads without fl_rpn: format=pt2 (torch.export, the default), "
        "torchscript, onnx, or torchvision (a state dict for torchvision's own builder; not for tiny_fpn)",
        examples=["fl-rpn-export checkpoint=RUN/last.pt                       # model.pt2 + model.json",
                  "fl-rpn-export checkpoint=RUN/last.pt format=onnx out_dir=deploy/"],
        groups=[],
    )  # fmt: skip
    export_app()


if __name__ == "__main__":
    main()
