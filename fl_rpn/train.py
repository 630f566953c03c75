"""``fl-rpn-train``: compose the config, train, evaluate, write ``metrics.json``.

fl-rpn-train                                   # the CPU demo (synthetic data, tiny_fpn, focal_softmax)
fl-rpn-train rpn=sampled model=r50_fpn dataset=coco schedule=coco_1x
fl-rpn-train -m rpn=sampled,focal_sigmoid,focal_softmax seed=0,1,2
"""

import hydra
from omegaconf import DictConfig

from .config import CONF_DIR
from .engine.trainer import train


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base=None)
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get("bbox/AP")  # the sweep objective, for Hydra's optimising sweepers


if __name__ == "__main__":
    main()
