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

# Exit status after SIGTERM (pre-emption, scancel): what a shell reports for a process killed by SIGTERM,
# so that `fl-rpn-train ... && next-step` and job accounting do not take a pre-empted run for a finished one.
PREEMPTED_EXIT_CODE = 128 + 15


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
    if launched_by()[0] > 0:
        sys.argv[1:1] = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    # conf/hydra/launcher/{joblib,submitit_local}.yaml share their plugin's schema name; they are complete
    # configs (with _target_), so the deprecated automatic schema matching is harmless noise
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")
    train_app()


if __name__ == "__main__":
    main()
