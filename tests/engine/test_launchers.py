"""The Hydra launcher presets: SLURM resolves from sbatch's environment; submitit's local executor runs a DDP job."""

import json

from hydra import compose, initialize_config_dir
from hydra.utils import get_class

from fl_rpn.config import CONF_DIR

from ..conftest import TINY_RECALL, run_app

# 1 image per process, 2 processes: a 2-image global batch
SWEEP_JOB = [*TINY_RECALL, "device=cpu", "dataset.train.num_images=4", "dataset.val.num_images=2", "batch_size=1",
             "eval.batch_size=1"]  # fmt: skip


def hydra_launcher(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("train", overrides=list(overrides), return_hydra_config=True).hydra.launcher


def test_slurm_preset_takes_partition_and_account_from_sbatch_variables(monkeypatch):
    monkeypatch.setenv("SBATCH_PARTITION", "gpu")
    monkeypatch.setenv("SBATCH_ACCOUNT", "detection")
    launcher = hydra_launcher("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2")
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert (launcher.partition, launcher.account) == ("gpu", "detection")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)  # one task per GPU
    monkeypatch.delenv("SBATCH_PARTITION")
    assert hydra_launcher("hydra/launcher=slurm").partition is None  # sbatch's own default partition


def test_submitit_local_runs_each_sweep_job_as_a_ddp_job(tmp_path):
    sweep = tmp_path / "sweep"
    run_app("-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={sweep}",
            *SWEEP_JOB, cache=tmp_path / "cache", env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["provenance"]["world_size"] == 2 and metrics["train/iterations"] == 2
    assert "proposal/AR@100" in metrics
    log = (sweep / "0" / "train.log").read_text()
    assert log.count("train: 4 images, val: 2 images") == 1  # rank 0 alone writes train.log
