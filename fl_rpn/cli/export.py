"""``fl-rpn-export``: a trained detector as plain torchvision, TorchScript or ONNX (``fl_rpn.export``).

fl-rpn-export checkpoint=outputs/.../last.pt                      # model.pt (state dict) + model.json (settings)
fl-rpn-export checkpoint=outputs/.../last.pt format=torchscript   # model.ts: torch.jit.load, no Python classes
fl-rpn-export checkpoint=outputs/.../last.pt format=onnx          # model.onnx (opset 17): onnxruntime, ...
"""

import hydra
from omegaconf import DictConfig

from ..config import CONF_DIR
from ..export import export_checkpoint


@hydra.main(config_path=str(CONF_DIR), config_name="export", version_base=None)
def main(cfg: DictConfig) -> None:
    export_checkpoint(cfg.checkpoint, cfg.format, cfg.out_dir, cfg.opset, tuple(cfg.image_size))


if __name__ == "__main__":
    main()
