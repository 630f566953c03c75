"""What the tests share: the tiny run's overrides, the composed config, caches, subprocess runners, ports, images.

Constants and plain functions are imported (``from .conftest import TINY, run_app`` in ``tests/``,
``from ..conftest import ...`` one folder down; ``--import-mode=importlib`` names this module ``tests.conftest``);
fixtures are requested by name as usual.

- ``TINY``: a run of 2 iterations on 6 train / 3 val synthetic images of 96x128, evaluated with the default
  evaluators; ``FAST``: the same without evaluation; ``TINY_RECALL``: evaluated by proposal recall alone;
  ``TINY_DATA``: the data part alone (what fl-rpn-eval / check_data / predict take); ``write_tiny_data(cache)``
  generates that data up front (to spoil an image before a run reads it).
- ``compose_cfg``: the real Hydra config (``conf/train.yaml``) with overrides.
- ``cache`` (a fresh ``FL_RPN_CACHE`` for one test, set in the environment) and ``module_cache`` (one folder for a
  module's tests, so the synthetic set is generated once).
- ``run_app`` / ``start_app``: a console script (``python -m fl_rpn.cli.train``, ``python -c CODE`` or ``python
  SCRIPT``) in a subprocess, waited for or running; ``app_env`` is their environment.
- ``free_port``: a TCP port for a DDP rendezvous that no other xdist worker hands out.
- ``write_image`` / ``image_writer``: a uniform PNG or JPEG image on disk.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torchvision.io import write_jpeg, write_png

from fl_rpn.config import compose_config

# -- the tiny run ----------------------------------------------------------------------------------------------------
TINY_DATA = [
    "dataset.train.num_images=6", "dataset.val.num_images=3",
    "dataset.train.image_size=[96,128]", "dataset.val.image_size=[96,128]",
]  # fmt: skip
TINY = [
    *TINY_DATA,
    "model.detector.min_size=96", "model.detector.max_size=128",
    "batch_size=2", "num_workers=0", "eval.batch_size=2",
    "schedule.max_iters=2", "schedule.warmup_iters=1", "schedule.steps=[]",
    "schedule.log_every=1", "schedule.checkpoint_every=1",
]  # fmt: skip
FAST = [*TINY, "eval.evaluators=[]"]
TINY_RECALL = [*TINY, "eval.evaluators=[proposal_recall]"]


def write_tiny_data(cache: Path) -> tuple[list[Path], list[Path]]:
    """The synthetic train / val splits of ``TINY`` in ``cache``, as a run would generate them; their image files."""
    from fl_rpn.data import ensure_synthetic

    cfg = compose_config(TINY_DATA)
    splits = []
    for node in (cfg.dataset.train, cfg.dataset.val):
        images, _ = ensure_synthetic(cache, node.split, node.num_images, node.seed, image_size=list(node.image_size))
        splits.append(sorted(images.iterdir()))
    return splits[0], splits[1]


@pytest.fixture
def compose_cfg():
    """``compose_cfg(*overrides)`` -> the composed root config (``conf/train.yaml``)."""

    def _compose(*overrides: str):
        return compose_config(overrides)

    return _compose


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """``tmp_path / "cache"``, the ``FL_RPN_CACHE`` of this test (in-process runs generate their data there)."""
    monkeypatch.setenv("FL_RPN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory) -> Path:
    """One cache folder for a module's tests: the synthetic data is generated once (pass it as ``cache_dir=`` or
    set ``FL_RPN_CACHE`` to it in the test)."""
    return tmp_path_factory.mktemp("cache")


# -- subprocesses ----------------------------------------------------------------------------------------------------
def app_env(cache: Path, full_error: bool = True, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with ``FL_RPN_CACHE=cache``; ``HYDRA_FULL_ERROR=1`` (full tracebacks) or, without
    ``full_error``, unset (the one-line errors a user sees); then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["FL_RPN_CACHE"] = str(cache)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    env.update(extra or {})
    return env


TRAIN_APP = "fl_rpn.cli.train"


def app_command(args, module: str = TRAIN_APP, code: str | None = None, script: Path | None = None) -> list[str]:
    """``python -m module *args``, ``python -c code *args`` (a seam patched before the app runs) or ``python script
    *args``."""
    if script is not None:
        return [sys.executable, str(script), *args]
    return [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", module, *args]


def run_app(*args: str, cache: Path, module: str = TRAIN_APP, code: str | None = None, script: Path | None = None,
            full_error: bool = True, env: dict[str, str] | None = None, timeout: float = 600, check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:  # fmt: skip
    """Run a console script to its end (see ``app_command`` and ``app_env``); its output is captured and
    ``.seconds`` is its wall time. ``check``: a non-zero exit fails the test with the end of the output."""
    command = app_command(args, module, code, script)
    t0 = time.monotonic()
    proc = subprocess.run(command, env=app_env(cache, full_error, env), capture_output=True, text=True,
                          timeout=timeout, **kwargs)  # fmt: skip
    proc.seconds = time.monotonic() - t0
    if check and proc.returncode != 0:
        name = script.name if script is not None else module if code is None else "python -c"
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def start_app(*args: str, cache: Path, module: str = TRAIN_APP, code: str | None = None, full_error: bool = True,
              env: dict[str, str] | None = None, **popen) -> subprocess.Popen:  # fmt: skip
    """Start a console script (see ``run_app``) and return at once: text stdout and stderr are pipes unless
    ``popen`` says otherwise."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen(app_command(args, module, code), env=app_env(cache, full_error, env), text=True, **popen)


# -- ports -----------------------------------------------------------------------------------------------------------
_PORTS_PER_WORKER = 500
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a DDP rendezvous (``MASTER_PORT``, ``tcp://``).

    Each pytest-xdist worker (``PYTEST_XDIST_WORKER=gw<N>``) probes its own block of 500 ports in 10000-19999, so two
    workers never hand out the same one, and no port is handed out twice in a process: a port picked but not yet bound
    by the processes it was meant for cannot go to another test. The range lies below the ephemeral ports the system
    assigns (32768 and up on Linux) and the 20000-59999 that ``launched_by`` derives from a job id.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = 10000 + (int(worker) if worker.isdigit() else 0) % 20 * _PORTS_PER_WORKER
    for port in range(first, first + _PORTS_PER_WORKER):
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {first}-{first + _PORTS_PER_WORKER - 1}")


# -- images on disk --------------------------------------------------------------------------------------------------
def write_image(path: Path, width: int, height: int, value: int = 128) -> torch.Tensor:
    """Write a uniform uint8 RGB image (PNG or JPEG by suffix); return its [3, H, W] tensor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = torch.full((3, height, width), value, dtype=torch.uint8)
    (write_jpeg if path.suffix == ".jpg" else write_png)(image, str(path))
    return image


@pytest.fixture
def image_writer():
    """``write_image``, as a fixture."""
    return write_image
