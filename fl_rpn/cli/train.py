"""``fl-rpn-train``: compose the config, train, evaluate, write ``metrics.json``.

fl-rpn-train                                   # the CPU demo (synthetic data, tiny_fpn, focal_softmax)
fl-rpn-train rpn=sampled model=r50_fpn dataset=coco schedule=coco_1x
fl-rpn-train -m rpn=sampled,focal_sigmoid,focal_softmax seed=0,1,2
"""

import sys
import warnings

import hydra
from omegaconf import DictConfig

from ..config import CONF_DIR
from ..engine.distributed import launched_by
from ..engine.trainer import train
from ..errors import report_errors
from .preflight import preflight

# Exit status after SIGTERM (pre-emption, scancel): what a shell reports for a process killed by SIGTERM,
# so that `fl-rpn-train ... && next-step` and job accounting do not take a pre-empted run for a finished one.
PREEMPTED_EXIT_CODE = 128 + 15
COMMANDS_SUMMARY = (
    "train a two-stage detector with a focal-loss RPN (or torchvision's sampled RPN), evaluate it and write "
    "metrics.json.\n`scale=` picks a whole setting (dataset + model + schedule + image size); `dataset=` swaps only "
    "the data and keeps the rest (the CPU demo's schedule, for instance)"
)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base=None)
@report_errors
def train_app(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    if metrics.get("preempted"):  # SIGTERM: a checkpoint was written, the run is not finished
        sys.exit(PREEMPTED_EXIT_CODE)
    return metrics.get("bbox/AP")  # the sweep objective, for Hydra's optimising sweepers


def main() -> None:
    """Under torchrun or srun, ranks > 0 make no run directory and write no Hydra files (they log to stdout):
    ``train`` hands them rank 0's run directory, which may be named for another second."""
    preflight(
        "fl-rpn-train", "train", COMMANDS_SUMMARY,
        examples=["fl-rpn-train                                    # the CPU demo: synthetic data, minutes",
                  "fl-rpn-train scale=bccd data_root=DIR rpn=sampled   # BCCD, the sampled-RPN baseline",
                  "fl-rpn-train -m experiment=prcv2018_table_b_box scale=bccd data_root=DIR   # the ablation sweep"],
        groups=["scale", "dataset", "model", "rpn", "schedule", "eval", "optim", "experiment"],
    )  # fmt: skip
    if launched_by()[0] > 0:
        sys.argv[1:1] = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    # conf/hydra/launcher/{joblib,submitit_local}.yaml share their plugin's schema name; they are complete
    # configs (with _target_), so the deprecated automatic schema matching is harmless noise
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")
    train_app()


if __name__ == "__main__":
    main()
