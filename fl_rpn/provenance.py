"""Where a number came from: package version, commit, hardware, software, command, seed, dataset and schedule."""

import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torchvision
from omegaconf import DictConfig

from ._version import __version__

# The folder above the package: the project's checkout when run from source or an editable install,
# site-packages (or wherever pip put it) for an installed wheel.
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def is_own_checkout(root: Path) -> bool:
    """Whether ``root`` is this project's source tree: it holds a ``pyproject.toml`` with ``name = "fl-rpn"``."""
    try:
        text = (root / "pyproject.toml").read_text()
    except OSError:
        return False
    return re.search(r'^name\s*=\s*"fl-rpn"\s*$', text, flags=re.MULTILINE) is not None


def git_commit(root: Path = SOURCE_ROOT) -> str | None:
    """``<sha>`` of the checkout that holds the running code, with ``-dirty`` when code or config differs from it.

    ``None`` when the code is not run from the project's own git checkout: an installed wheel, or a source
    tree that is not a git repository (or sits inside another one). Git is asked only when ``root`` is the
    top of a git work tree and holds fl-rpn's ``pyproject.toml``, so a venv inside some other repository
    never records that repository's commit. ``"unknown"`` when that checkout's git cannot be read.

    Dirty means a tracked file differs from ``HEAD`` (staged or not), except non-``.py`` files under
    ``experiments/``: those are results and their write-ups (RESULTS.md, results.json, READMEs, CSVs, plots),
    which the experiment and benchmark scripts rewrite themselves, so they do not make a run's code differ.
    Untracked files are not looked at.
    """
    if not is_own_checkout(root):
        return None
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root.resolve():
        return None  # not a git checkout, or the sources were copied into another repository
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "diff", "--name-only", "--no-renames", "-z", "HEAD"], cwd=root, capture_output=True, text=True,
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
        "version": __version__,
        "commit": git_commit(),  # None for an installed copy: the version says which code ran
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
    }


def utc_now() -> str:
    """The time now in UTC, ISO 8601 to the second (``2026-12-07T18:12:47+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
