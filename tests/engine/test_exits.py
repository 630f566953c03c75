"""Every way a run can fail exits promptly, with its message and a non-zero status: real subprocesses, timed out.

Errors raised in DataLoader workers (which ignore SIGTERM) used to leave the process waiting for them forever
in multiprocessing's exit handler. Each case runs the console script as a subprocess on the tiny synthetic set
of ``TINY`` (6 train / 3 val images of 96x128), with DataLoader workers and the progress bar on, and fails
if it does not exit within ``TIMEOUT`` seconds. Expected errors print one line (``TypeName: message``) without a
traceback and exit 1; Ctrl-C exits 130.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from fl_rpn.config import compose_config
from fl_rpn.engine.checkpoint import load_checkpoint, remove_orphaned_temporaries, save_checkpoint
from fl_rpn.engine.trainer import NonFiniteLossError, train
from fl_rpn.errors import WeightsUnavailableError, error_message, report_errors

from ..conftest import FAST, TINY_DATA, run_app, start_app, write_tiny_data
from .conftest import DDP_TINY, inf_weight_after_step, launch_ddp, nan_rpn_losses, train_with

TIMEOUT = 120  # seconds; a run of these takes 15-30 s on a busy 2-core machine, a hang never ends
CLI = [*FAST, "schedule.max_iters=6"]  # 3 batches per epoch: every train image is loaded within 3 iterations

# the full-disk and diverging-weights seams: patched in the subprocess, the app then runs as fl-rpn-train does
RUN_APP = "import sys; sys.argv[0] = 'fl-rpn-train'; from fl_rpn.cli.train import main; main()"
FULL_DISK = (
    "import errno, torch\n"
    "def save(obj, f, *args, **kwargs):\n"
    "    f.write(b'PK\\x03\\x04')\n"
    "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
    "torch.save = save\n"
)
INF_WEIGHT_AT_STEP_2 = (
    "import torch\n"
    "from torch.optim.optimizer import register_optimizer_step_post_hook\n"
    "steps = []\n"
    "def poison(optimizer, args, kwargs):\n"
    "    steps.append(1)\n"
    "    if len(steps) == 2:\n"
    "        with torch.no_grad():\n"
    "            optimizer.param_groups[0]['params'][0].view(-1)[0] = float('inf')\n"
    "register_optimizer_step_post_hook(poison)\n"
)


def spoil(file, kind):
    if kind == "truncated":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    elif kind == "zero_bytes":
        file.write_bytes(b"")
    elif kind == "not_an_image":
        file.write_text("<html>404 not found</html>")
    elif kind == "other_size":  # as an EXIF-rotated photo would decode: 128x96 instead of 96x128
        Image.fromarray(np.zeros((128, 96, 3), np.uint8)).save(file, format="PNG")


EXPECTED = {
    "truncated": "cannot be decoded",
    "zero_bytes": "cannot be decoded",
    "not_an_image": "cannot be decoded",
    "other_size": "is 96x128 (WxH) but its annotations say 128x96",
}


def run(*args, cache, env=None, **kwargs):
    """A console script (``run_app``: ``module=``, or ``code=`` with the args) as a user starts it: without
    HYDRA_FULL_ERROR, on one thread, its exit status left to the test."""
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    return run_app(*args, cache=cache, full_error=False, env=env, timeout=TIMEOUT, check=False, **kwargs)


def assert_clear_error(proc, message, status=1):
    """Exit ``status``, ``message`` on stderr, and no traceback or chained exceptions."""
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    for noise in ("Traceback", "direct cause", "During handling"):
        assert noise not in proc.stderr, proc.stderr[-3000:]


# --- bad images, raised in a DataLoader worker -------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_a_truncated_train_image_exits_with_its_message(tmp_path, cache, workers):
    train_images, _ = write_tiny_data(cache)
    spoil(train_images[3], "truncated")
    run_dir = tmp_path / "run"
    proc = run(*CLI, f"num_workers={workers}", f"hydra.run.dir={run_dir}", cache=cache)
    assert_clear_error(proc, f"ValueError: Image {train_images[3]} cannot be decoded")
    assert (" (in DataLoader worker process" in proc.stderr) == (workers > 0)
    assert f"ValueError: Image {train_images[3]} cannot be decoded" in (run_dir / "train.log").read_text()


@pytest.mark.parametrize("kind", ["zero_bytes", "not_an_image", "other_size"])
def test_an_unreadable_train_image_exits_with_its_message(tmp_path, cache, kind):
    train_images, _ = write_tiny_data(cache)
    spoil(train_images[2], kind)
    proc = run(*CLI, "num_workers=2", f"hydra.run.dir={tmp_path / 'run'}", cache=cache)
    assert_clear_error(proc, f"ValueError: Image {train_images[2]} ")
    assert EXPECTED[kind] in proc.stderr


def test_a_bad_val_image_stops_the_run_before_training_and_leaves_no_run_directory(tmp_path, cache):
    _, val_images = write_tiny_data(cache)
    spoil(val_images[1], "truncated")
    run_dir = tmp_path / "outputs" / "2026-01-01" / "10-00-00"
    proc = run(*CLI, "num_workers=2", f"hydra.run.dir={run_dir}", cache=cache)
    assert_clear_error(proc, "ValueError: the data has problems; nothing was trained")
    assert f"{val_images[1]}: not a readable image" in proc.stderr and "dataset.val" in proc.stderr
    assert not (tmp_path / "outputs" / "2026-01-01").exists()  # nothing but Hydra's files was in it


def test_bad_images_skip_drops_and_counts_unreadable_images(tmp_path, cache, caplog):
    train_images, val_images = write_tiny_data(cache)
    spoil(train_images[1], "truncated")
    spoil(train_images[4], "other_size")
    spoil(val_images[0], "zero_bytes")
    cfg = compose_config([*FAST, "schedule.max_iters=6", "bad_images=skip", f"output_dir={tmp_path}"])
    with caplog.at_level("WARNING", logger="fl_rpn.engine"):
        metrics = train(cfg)  # every train image is loaded: none of the bad ones is
    assert metrics["train/iterations"] == 6
    assert metrics["train/bad_images_skipped"] == 2 and metrics["eval/bad_images_skipped"] == 1
    assert "dataset.train: 2 image(s) skipped" in caplog.text and str(train_images[4]) in caplog.text
    assert json.loads((tmp_path / "metrics.json").read_text())["eval/bad_images_skipped"] == 1


def test_eval_with_a_bad_val_image_exits_with_its_message(tmp_path, cache):
    _, val_images = write_tiny_data(cache)
    train(compose_config([*FAST, "schedule.max_iters=1", f"output_dir={tmp_path / 'run'}"]))
    spoil(val_images[2], "not_an_image")
    proc = run(
        f"checkpoint={tmp_path / 'run' / 'last.pt'}", *TINY_DATA, "num_workers=2", "eval.batch_size=1",
        f"hydra.run.dir={tmp_path / 'eval'}", cache=cache, module="fl_rpn.cli.eval",
    )  # fmt: skip
    assert_clear_error(proc, f"ValueError: Image {val_images[2]} cannot be decoded")


def test_two_processes_exit_when_one_rank_meets_a_bad_image(tmp_path, cache):
    """Under DDP the failing rank exits, and the other one, waiting in a collective, exits too."""
    train_images, _ = write_tiny_data(cache)
    spoil(train_images[0], "truncated")
    overrides = [*DDP_TINY, "schedule.max_iters=6", "num_workers=2"]
    rank_overrides = {"0": [f"hydra.run.dir={tmp_path / 'run'}"]}
    # launch_ddp fails on a time-out (180 s): a rank waiting forever
    codes, outputs, _ = launch_ddp(tmp_path, "ddp", cache, overrides, rank_overrides=rank_overrides, check=False)
    assert codes[0] != 0 and codes[1] != 0, codes
    assert any(f"Image {train_images[0]} cannot be decoded" in out for out in outputs)


LEFT_RUNNING = """
import sys, torch
from torch.utils.data import DataLoader
from fl_rpn.data.build import ignore_sigterm
loader = DataLoader(list(range(100)), batch_size=1, num_workers=2, worker_init_fn=ignore_sigterm)
batches = iter(loader)
next(batches)  # the workers are up; the iterator stays referenced, so nothing shuts them down
sys.exit(1)
"""


def test_workers_left_running_are_killed_at_exit():
    """The safety net: workers that ignore SIGTERM and were not shut down do not keep the process from exiting."""
    proc = subprocess.run([sys.executable, "-c", LEFT_RUNNING], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stderr[-3000:]


# --- non-finite numbers ------------------------------------------------------------------------------------------


def test_a_nonfinite_loss_with_nonfinite_stop_exits_with_its_message(tmp_path, cache):
    write_tiny_data(cache)
    proc = run(*CLI, "num_workers=2", "optim.lr=1e6", f"hydra.run.dir={tmp_path / 'run'}", cache=cache)
    assert_clear_error(proc, "NonFiniteLossError: non-finite loss at iteration 2: ")
    assert f"the last good checkpoint is {tmp_path / 'run' / 'last.pt'}" in proc.stderr


def test_refusing_to_write_nonfinite_weights_under_nonfinite_skip_exits_with_its_message(tmp_path, cache):
    write_tiny_data(cache)
    run_dir = tmp_path / "run"
    proc = run(*CLI, "num_workers=2", "nonfinite=skip", f"hydra.run.dir={run_dir}", cache=cache,
               code=INF_WEIGHT_AT_STEP_2 + RUN_APP)  # fmt: skip
    assert_clear_error(proc, f"ValueError: refusing to write {run_dir / 'last.pt'}: 1 model tensor(s) are not finite")
    assert load_checkpoint(run_dir / "last.pt")["iteration"] == 1


def test_nonfinite_skip_stops_once_the_weights_are_not_finite(tmp_path, cache):
    """The weights turn infinite between checkpoints: every later loss is NaN, skipping them cannot recover."""
    cfg = compose_config([*FAST, "schedule.max_iters=6", "schedule.checkpoint_every=100", "nonfinite=skip",
                          f"output_dir={tmp_path}"])  # fmt: skip
    with pytest.raises(
        NonFiniteLossError,
        match=r"at iteration 2: .*, and 1 model tensor\(s\) are not finite "
        r"\(e\.g\. rpn\.head\.conv\.0\.0\.weight\): training diverged and nonfinite=skip cannot",
    ):
        train_with(cfg, inf_weight_after_step(2))  # fmt: skip
    assert not (tmp_path / "last.pt").exists()


def test_nonfinite_skip_stops_after_ten_skipped_steps_in_a_row(tmp_path, cache):
    cfg = compose_config([*FAST, "schedule.max_iters=20", "nonfinite=skip", f"output_dir={tmp_path}"])
    with pytest.raises(NonFiniteLossError, match=r"at iteration 10: .*10 steps in a row were skipped"):
        train_with(cfg, nan_rpn_losses(set(range(1, 100))))
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 10  # the skipped steps were still saved


# --- a full disk while writing a checkpoint -----------------------------------------------------------------------


def test_a_full_disk_on_the_first_checkpoint_exits_naming_the_file(tmp_path, cache):
    write_tiny_data(cache)
    run_dir = tmp_path / "run"
    proc = run(*CLI, "num_workers=2", f"hydra.run.dir={run_dir}", cache=cache, code=FULL_DISK + RUN_APP)
    assert_clear_error(proc, f"OSError: [Errno 28] cannot write checkpoint {run_dir / 'last.pt'} (No space left")
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".last")) == []


def test_a_full_disk_on_resume_exits_naming_the_file_and_train_log_has_the_run(tmp_path, cache):
    write_tiny_data(cache)
    run_dir = tmp_path / "run"
    first = run(*FAST, "num_workers=2", f"hydra.run.dir={run_dir}", cache=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["iteration"] for h in history] == [1, 2]
    assert f"iteration 2: loss={history[1]['loss']:.4g}, " in log  # the logged losses, each log_every
    assert "final metrics:" in log and "train/iterations" in log

    proc = run(*FAST, "schedule.max_iters=4", "resume=true", "num_workers=2", f"hydra.run.dir={run_dir}",
               cache=cache, code=FULL_DISK + RUN_APP)  # fmt: skip
    message = f"OSError: [Errno 28] cannot write checkpoint {run_dir / 'last.pt'} (No space left on device)"
    assert_clear_error(proc, message)
    assert message in (run_dir / "train.log").read_text()  # the error text too
    assert load_checkpoint(run_dir / "last.pt")["iteration"] == 2


def test_orphaned_temporary_checkpoints_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is free now
    orphan, alive = tmp_path / f".last.pt.tmp-{dead.pid}", tmp_path / f".last.pt.tmp-{os.getppid()}"
    orphan.write_bytes(b"PK half a checkpoint")
    alive.write_bytes(b"PK being written")
    save_checkpoint(tmp_path / "last.pt", {"model": {"w": torch.ones(1)}, "iteration": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.pt", alive.name])
    assert remove_orphaned_temporaries(tmp_path / "last.pt") == []


# --- signals -----------------------------------------------------------------------------------------------------


def test_ctrl_c_during_training_exits_130(tmp_path, cache):
    write_tiny_data(cache)
    overrides = [*FAST, "num_workers=2", "schedule.max_iters=1000", f"hydra.run.dir={tmp_path / 'run'}"]
    # SIGINT back to its default in the child: a pytest started in the background (or by some runners) passes
    # it on ignored, and Python then installs no KeyboardInterrupt handler
    proc = start_app(*overrides, cache=cache, full_error=False, env={"OMP_NUM_THREADS": "1"}, start_new_session=True,
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        while "train:" not in (line := proc.stderr.readline()) or "2/1000" not in line:
            assert line or proc.poll() is None, "exited early"
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted (Ctrl-C)" in err and "Traceback" not in err
    assert time.monotonic() - t0 < 30


def test_sigterm_logs_the_partial_window(tmp_path, cache):
    """log_every=100 and a SIGTERM after 3 iterations: the 3 steps are in the history of the checkpoint."""

    def sigterm_at_the_third_step(model):
        calls = []

        def hook(module, args, output):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler sets its flag
            return output

        model.rpn.register_forward_hook(hook)

    cfg = compose_config([*FAST, "schedule.max_iters=50", "schedule.log_every=100", "schedule.checkpoint_every=100",
                          f"output_dir={tmp_path}"])  # fmt: skip
    assert train_with(cfg, lambda state: sigterm_at_the_third_step(state.model)) == {
        "preempted": True,
        "train/iterations": 3,
    }
    history = load_checkpoint(tmp_path / "last.pt")["history"]
    assert [h["iteration"] for h in history] == [3] and history[0]["loss"] > 0
    assert json.loads((tmp_path / "history.json").read_text()) == history


# --- one clear message in every console script --------------------------------------------------------------------


def test_a_bad_config_value_is_one_line_and_a_failed_start_leaves_no_folder(tmp_path, cache):
    run_dir = tmp_path / "outputs" / "2026-01-01" / "10-00-00"
    proc = run(*FAST, "rpn.alpha=2", f"hydra.run.dir={run_dir}", cache=cache)
    assert_clear_error(proc, "ValueError: config key rpn.alpha=2: must be a number in [0, 1]")
    assert proc.seconds < TIMEOUT and not (tmp_path / "outputs" / "2026-01-01").exists()
    full = run(*FAST, "rpn.alpha=2", f"hydra.run.dir={run_dir}", cache=cache,
               env={"HYDRA_FULL_ERROR": "1"})  # fmt: skip
    assert full.returncode == 1 and "Traceback" in full.stderr and "config key rpn.alpha=2" in full.stderr


@pytest.mark.parametrize(
    "module,args,message",
    [
        (
            "fl_rpn.cli.eval",
            ["checkpoint=/nonexistent/last.pt"],
            "FileNotFoundError: checkpoint /nonexistent/last.pt does",
        ),
        ("fl_rpn.cli.predict", ["checkpoint=/nonexistent/last.pt", "inputs=[x.png]"], "FileNotFoundError: checkpoint"),
        ("fl_rpn.cli.check_data", ["rpn.gamma=-1"], "ValueError: config key rpn.gamma=-1: must be a number >= 0"),
        ("fl_rpn.cli.report", ["/nonexistent/multirun"], "fl-rpn-report: "),
    ],
)
def test_every_console_script_prints_its_expected_errors_in_one_line(tmp_path, cache, module, args, message):
    proc = run(*args, f"hydra.run.dir={tmp_path / 'run'}" if module != "fl_rpn.cli.report" else "--out=x",
               cache=cache, module=module)  # fmt: skip
    assert_clear_error(proc, message)


def test_a_chained_expected_error_prints_without_its_cause(capsys):
    @report_errors
    def task():
        try:
            raise OSError("urlopen error [Errno -3] Temporary failure in name resolution")
        except OSError as e:
            raise WeightsUnavailableError("could not download backbone weights X. Offline: put that file at Y") from e

    with pytest.raises(SystemExit) as exit_info:
        task()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err == "WeightsUnavailableError: could not download backbone weights X. Offline: put that file at Y\n"


def test_a_worker_error_gives_the_workers_own_message():
    text = (
        "Caught ValueError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in read\nRuntimeError: bad png\n\nThe above exception was the direct cause of the '
        'following exception:\n\nTraceback (most recent call last):\n  File "y.py"\nValueError: Image a.png cannot '
        "be decoded: bad png; PIL: truncated\n"
    )
    expected = "ValueError: Image a.png cannot be decoded: bad png; PIL: truncated (in DataLoader worker process 1)"
    assert error_message(ValueError(text)) == expected
    assert error_message(OSError(errno.ENOSPC, "No space left")) == "OSError: [Errno 28] No space left"
