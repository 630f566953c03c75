"""Where a number came from: commit, hardware, software, command, seed, dataset and schedule."""

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torchvision
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """``<sha>`` of the checkout, with ``-dirty`` when code or config differs from it; ``unknown`` outside git.

    Dirty means a tracked file differs from ``HEAD`` (staged or not), except non-``.py`` files under
    ``experiments/``: those are results and their write-ups (RESULTS.md, results.json, READMEs, CSVs, plots),
    which the experiment and benchmark scripts rewrite themselves, so they do not make a run's code differ.
    Untracked files are not looked at.
    """
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "diff", "--name-only", "--no-renames", "-z", "HEAD"], cwd=REPO, capture_output=True, text=True,
            check=True, timeout=10,
        ).stdout.split("\0")  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    dirty = any(p and not (p.startswith("experiments/") and not p.endswith(".py")) for p in changed)
    return sha + ("-dirty" if dirty else "")


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def schedule_text(cfg: DictConfig | dict, world_size: int) -> str:
    """``"cpu_demo: 600 iterations x 4 images"`` (the global batch) from a root config or its saved dict."""
    schedule = cfg["schedule"]
    return f"{schedule['name']}: {schedule['max_iters']} iterations x {cfg['batch_size'] * world_size} images"


def trained_with(checkpoint: dict) -> dict[str, Any]:
    """What a checkpoint was trained with, from the config and RNG states saved in it: seed, dataset, model, rpn,
    schedule (with its global batch: one RNG state per rank) and world size."""
    config, world_size = checkpoint["config"], max(len(checkpoint.get("rng") or []), 1)
    return {
        "seed": config["seed"], "train_dataset": config["dataset"]["name"], "model": config["model"]["name"],
        "rpn": config["rpn"]["name"], "schedule": schedule_text(config, world_size), "train_world_size": world_size,
    }  # fmt: skip


def provenance(cfg: DictConfig, world_size: int = 1) -> dict[str, Any]:
    return {
        "commit": git_commit(),
        "hardware": hardware(),
        "world_size": world_size,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "seed": cfg.seed,
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "rpn": cfg.rpn.name,
        "schedule": schedule_text(cfg, world_size),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
