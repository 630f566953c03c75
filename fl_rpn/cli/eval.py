"""``fl-rpn-eval``: evaluate a saved checkpoint on any dataset config, write ``metrics.json``."""

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from ..config import CONF_DIR
from ..data import build_dataset
from ..engine.checkpoint import model_from_checkpoint
from ..engine.distributed import DistInfo
from ..engine.trainer import run_evaluation, select_device
from ..errors import report_errors
from ..evaluation import summarize, without_per_class
from ..provenance import provenance, trained_with


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, float]:
    device = select_device(cfg.device)
    model, ckpt = model_from_checkpoint(cfg.checkpoint)
    val_set = build_dataset(cfg.dataset.val, train=False)
    trained_classes = ckpt["meta"]["class_names"]
    if val_set.meta.class_names != trained_classes:
        raise ValueError(
            f"dataset {cfg.dataset.name} has classes {val_set.meta.class_names[:5]}... but checkpoint "
            f"{cfg.checkpoint} was trained on {trained_classes[:5]}..."
        )
    metrics = run_evaluation(cfg, model.to(device), val_set, device, dist_info=DistInfo())
    record = {**metrics, "checkpoint": str(cfg.checkpoint), "iteration": ckpt.get("iteration")}
    # the run's own fields (commit, hardware, command, dataset evaluated on) and the checkpoint's training: its
    # seed, model, rpn and schedule, not the defaults that eval.yaml composes
    record["provenance"] = {**provenance(cfg), **trained_with(ckpt)}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(record, indent=2, default=str))
    print(summarize(without_per_class(metrics)))
    return metrics


@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base=None)
@report_errors
def main(cfg: DictConfig) -> None:
    torch.set_grad_enabled(False)
    evaluate_checkpoint(cfg)


if __name__ == "__main__":
    main()
