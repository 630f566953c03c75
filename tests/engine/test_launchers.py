"""The Hydra launcher presets: SLURM resolves from sbatch's environment; submitit's local executor runs a DDP job."""

import json
import os
import subprocess
import sys

from hydra import compose, initialize_config_dir
from hydra.utils import get_class

from fl_rpn.config import CONF_DIR

# 1 image per process, 2 processes: a 2-image global batch
TINY = [
    "device=cpu", "dataset.train.num_images=4", "dataset.val.num_images=2",
    "dataset.train.image_size=[96,128]", "dataset.val.image_size=[96,128]",
    "model.detector.min_size=96", "model.detector.max_size=128", "batch_size=1", "num_workers=0",
    "eval.batch_size=1", "eval.evaluators=[proposal_recall]", "schedule.max_iters=2", "schedule.warmup_iters=1",
    "schedule.steps=[]", "schedule.log_every=1",
]  # fmt: skip


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
    env = {**os.environ, "FL_RPN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "fl_rpn.train", "-m", "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={sweep}", *TINY,
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["provenance"]["world_size"] == 2 and metrics["train/iterations"] == 2
    assert "proposal/AR@100" in metrics
    log = (sweep / "0" / "train.log").read_text()
    assert log.count("train: 4 images, val: 2 images") == 1  # rank 0 alone writes train.log
