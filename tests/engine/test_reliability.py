"""Reliability: bad config values, non-finite losses and weights, kills and pre-emption, safe resume.

Each test uses the tiny overrides of ``tests/conftest.py`` (6 synthetic images of 96x128, 2 iterations).
"""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from fl_rpn.config import compose_config
from fl_rpn.data import build_dataset
from fl_rpn.engine import build
from fl_rpn.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from fl_rpn.engine.distributed import DistInfo
from fl_rpn.engine.stream import TrainStream
from fl_rpn.engine.trainer import NonFiniteLossError, train
from fl_rpn.engine.validate import validate_config
from fl_rpn.errors import error_message
from fl_rpn.modeling.model import build_model

from ..conftest import FAST, free_port, start_app
from .conftest import inf_weight_after_step, nan_rpn_losses, train_with


def wait_for(path, proc, timeout=300):
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"finished before {path} appeared:\n{proc.communicate()[1][-3000:]}")
        assert time.monotonic() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.01)


def finite_state(ckpt):
    return all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# --- bad config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,key",
    [
        ("rpn.gamma=-0.5", "rpn.gamma"),
        ("rpn.gamma=abc", "rpn.gamma"),
        ("rpn.alpha=1.5", "rpn.alpha"),
        ("rpn.alpha=-0.1", "rpn.alpha"),
        ("rpn.prior_prob=0", "rpn.prior_prob"),
        ("rpn.prior_prob=1.0", "rpn.prior_prob"),
        ("rpn.loss_weight=0", "rpn.loss_weight"),
        ("rpn.loss_weight=-1", "rpn.loss_weight"),
        ("rpn.form=cosine", "rpn.form"),
        ("rpn.loss=hinge", "rpn.loss"),
        ("rpn.bg_iou_thresh=0.8", "rpn.bg_iou_thresh"),
        ("schedule.steps=[500,100]", "schedule.steps"),
        ("schedule.max_iters=0", "schedule.max_iters"),
        ("optim.lr=0", "optim.lr"),
        ("eval.evaluators=[coco,vco07]", "eval.evaluators"),
        ("check_images=yes", "check_images"),
        ("nonfinite=ignore", "nonfinite"),
        ("channels_last=yes", "channels_last"),
        ("compile=fast", "compile"),
    ],
)
def test_invalid_values_are_rejected_naming_the_key(override, key):
    with pytest.raises(ValueError, match=rf"config key {re.escape(key)}="):
        validate_config(compose_config([override]))


def test_fp16_on_the_cpu_is_rejected_naming_the_key_before_reading_any_data(tmp_path, cache):
    cfg = compose_config([*FAST, "device=cpu", "amp=fp16", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"config key amp='fp16': fp16 needs CUDA \(its GradScaler\)"):
        train(cfg)
    assert not cache.exists() and not (tmp_path / "run").exists()


def test_sampled_rpn_values_are_checked_too():
    with pytest.raises(ValueError, match=r"config key rpn\.positive_fraction=0"):
        validate_config(compose_config(["rpn=sampled", "rpn.positive_fraction=0"]))


def test_train_rejects_a_bad_value_before_reading_any_data(tmp_path, cache):
    cfg = compose_config([*FAST, "rpn.alpha=2", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"config key rpn\.alpha=2: must be a number in \[0, 1\]"):
        train(cfg)
    assert not cache.exists() and not (tmp_path / "run").exists()


def test_unknown_nested_key_is_rejected():
    with pytest.raises(Exception, match=r"min_sizee") as info:  # Hydra's ConfigCompositionException
        compose_config(["model.detector.min_sizee=3"])
    assert "not in struct" in str(info.value.__cause__ or info.value)


# --- non-finite losses and weights -----------------------------------------------------------------------


def test_nonfinite_loss_stops_naming_iteration_and_terms_and_keeps_the_checkpoint(tmp_path, cache):
    cfg = compose_config([*FAST, "schedule.max_iters=4", f"output_dir={tmp_path}"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at iteration 2: .*loss_objectness=nan") as info:
        train_with(cfg, nan_rpn_losses({2}))
    assert "loss_rpn_box_reg=nan" in str(info.value) and str(tmp_path / "last.pt") in str(info.value)
    ckpt = load_checkpoint(tmp_path / "last.pt")  # iterations 0 and 1 finished and were saved
    assert ckpt["iteration"] == 2 and finite_state(ckpt)
    assert not (tmp_path / "metrics.json").exists()


def test_nonfinite_loss_before_any_checkpoint_says_so(tmp_path, cache):
    cfg = compose_config([*FAST, "schedule.max_iters=4", f"output_dir={tmp_path}"])
    with pytest.raises(NonFiniteLossError, match=r"at iteration 0: .*; no checkpoint was written yet$"):
        train_with(cfg, nan_rpn_losses({0}))
    assert not (tmp_path / "last.pt").exists()


def test_nonfinite_skip_mode_counts_skipped_steps(tmp_path, cache):
    cfg = compose_config([*FAST, "schedule.max_iters=3", "nonfinite=skip", f"output_dir={tmp_path}"])
    metrics = train_with(cfg, nan_rpn_losses({1}))
    assert metrics["train/skipped_steps"] == 1 and metrics["train/iterations"] == 3
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 3 and finite_state(ckpt)


def test_a_skipped_last_step_is_still_checkpointed(tmp_path, cache):
    cfg = compose_config([*FAST, "schedule.max_iters=3", "nonfinite=skip", f"output_dir={tmp_path}"])
    metrics = train_with(
        cfg, nan_rpn_losses({2})
    )  # checkpoint_every=1: iterations 1, 2 and the skipped 3 are each saved
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert metrics["train/iterations"] == ckpt["iteration"] == 3
    assert metrics["train/skipped_steps"] == ckpt["skipped_steps"] == 1
    assert [h["iteration"] for h in ckpt["history"]] == [1, 2]  # nothing to log for a skipped step


def test_skipped_steps_are_counted_across_a_resume(tmp_path, cache):
    train_with(compose_config([*FAST, "nonfinite=skip", f"output_dir={tmp_path}"]), nan_rpn_losses({1}))  # iteration 2
    assert load_checkpoint(tmp_path / "last.pt")["skipped_steps"] == 1
    cfg = compose_config([*FAST, "schedule.max_iters=4", "nonfinite=skip", "resume=true", f"output_dir={tmp_path}"])
    metrics = train_with(cfg, nan_rpn_losses({1}))  # the resumed run's second step: iteration 4
    assert metrics["train/skipped_steps"] == load_checkpoint(tmp_path / "last.pt")["skipped_steps"] == 2
    history = json.loads((tmp_path / "history.json").read_text())
    assert [(h["iteration"], h["skipped_steps"]) for h in history] == [(1, 0), (3, 1)]


def test_nonfinite_weights_are_never_written(tmp_path, cache):
    """A finite loss whose step blows the weights up: the save refuses and names the tensor."""
    cfg = compose_config([*FAST, "schedule.max_iters=3", f"output_dir={tmp_path}"])
    with pytest.raises(
        ValueError, match=r"refusing to write .*last\.pt: 1 model tensor\(s\) .*rpn\.head\.conv\.0\.0\.weight"
    ):
        train_with(cfg, inf_weight_after_step(2))
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 1 and finite_state(ckpt)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".last.pt")] == []


# --- checkpoints: atomic writes, kills, pre-emption ------------------------------------------------------


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "iteration": 1})
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # a zip header and nothing else
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "iteration": 2})
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = load_checkpoint(path)
    assert ckpt["iteration"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_a_full_disk_under_torchs_zip_writer_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch's zip writer turns the OSError of a full disk into a RuntimeError raised while handling it."""
    import errno

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "iteration": 1})

    def zip_writer_on_a_full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5666048 vs 5665936")  # noqa: B904

    monkeypatch.setattr(torch, "save", zip_writer_on_a_full_disk)
    with pytest.raises(OSError) as raised:
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "iteration": 2})
    assert raised.value.errno == errno.ENOSPC
    assert error_message(raised.value) == (
        f"OSError: [Errno 28] cannot write checkpoint {path} (No space left on device); the previous checkpoint is kept"
    )
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]

    def another_bug(obj, f, *args, **kwargs):
        raise RuntimeError("not a write failure")

    monkeypatch.setattr(torch, "save", another_bug)
    with pytest.raises(RuntimeError, match="not a write failure"):  # raised as it is, not dressed as a disk error
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "iteration": 2})


def test_a_truncated_checkpoint_is_reported_not_loaded(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "iteration": 1})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"checkpoint .*last\.pt cannot be read"):
        load_checkpoint(path)


def test_sigkill_then_resume_reaches_the_same_weights(tmp_path, cache):
    overrides = [*FAST, "device=cpu", "deterministic=true", "schedule.max_iters=4", "schedule.checkpoint_every=1"]
    run = tmp_path / "killed"
    proc = start_app(*overrides, f"hydra.run.dir={run}", cache=cache)
    wait_for(run / "last.pt", proc)
    proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: a node failure or an out-of-memory kill
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(run / "last.pt")["iteration"]
    assert 1 <= killed_at < 4

    resumed = start_app(*overrides, "resume=true", f"hydra.run.dir={run}", cache=cache)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from {run / 'last.pt'} at iteration {killed_at}" in (run / "train.log").read_text()

    straight = compose_config([*overrides, f"output_dir={tmp_path / 'straight'}"])
    train(straight)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(run / "last.pt")
    assert a["iteration"] == b["iteration"] == 4
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6, msg=k)


def test_sigterm_to_the_whole_job_checkpoints_and_exits_143(tmp_path, cache):
    """SLURM pre-emption signals every process of the job, DataLoader workers included."""
    run = tmp_path / "run"
    overrides = [*FAST, "num_workers=2", "schedule.max_iters=100", "schedule.checkpoint_every=50"]
    proc = start_app(*overrides, f"hydra.run.dir={run}", cache=cache, start_new_session=True)
    wait_for(run / "tb", proc)
    while "train:" not in (line := proc.stderr.readline()) or "1/100" not in line:  # an iteration finished
        assert line or proc.poll() is None, "exited early"
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    reached = int(re.search(r"SIGTERM: checkpoint written at iteration (\d+)", (run / "train.log").read_text())[1])
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["iteration"] == reached and 1 <= reached < 100
    assert not (run / "metrics.json").exists()
    logged = [h["iteration"] for h in json.loads((run / "history.json").read_text())]
    assert logged == list(range(1, reached + 1)) == [h["iteration"] for h in ckpt["history"]]  # log_every=1


def test_the_stream_is_the_same_from_any_iteration_with_or_without_workers(cache):
    """Across pass boundaries (3.5 batches per pass), with workers that live for the whole stream."""
    dataset = build_dataset(compose_config([*FAST, "dataset.train.num_images=7"]).dataset.train, train=True)
    stream = TrainStream(dataset, 2, 0, seed=3, group_aspect_ratio=True)
    assert stream.steps_per_pass == 3.5
    batches = stream.from_iteration(0)
    reference = [next(batches) for _ in range(10)]
    with_workers = TrainStream(dataset, 2, 2, seed=3, group_aspect_ratio=True)
    for start in (0, 3, 5):
        batches = with_workers.from_iteration(start)
        for (images, targets), (expected_images, expected_targets) in zip(batches, reference[start:]):
            assert [t["image_id"] for t in targets] == [t["image_id"] for t in expected_targets], start
            assert all(torch.equal(a, b) for a, b in zip(images, expected_images))  # the same flips


# --- logging and resuming ---------------------------------------------------------------------------------


def test_under_submitit_only_rank_zero_writes_train_log(tmp_path, cache):
    """submitit runs Hydra's job setup in every rank (not ``fl_rpn.cli.train.main``): each opens the same train.log."""
    run, port = tmp_path / "run", str(free_port())
    code = "import sys; sys.argv[0] = 'fl-rpn-train'; from fl_rpn.cli.train import train_app; train_app()"
    procs = []
    for rank in (0, 1):
        env = {
            "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "1", "SUBMITIT_LOCAL_GLOBALID": str(rank),
            "SUBMITIT_LOCAL_LOCALID": str(rank), "SUBMITIT_LOCAL_NTASKS": "2", "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        overrides = [*FAST, "device=cpu", "batch_size=1", f"hydra.run.dir={run}"]
        procs.append(start_app(*overrides, cache=cache, code=code, env=env, stderr=subprocess.STDOUT))
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    log = (run / "train.log").read_text()
    assert log.count("dataset.train: 6 images") == 1 and log.count("[INFO] - train: 6 images") == 1
    assert log.count("synthetic train split") == 1  # a reader's line: rank 0's, though both ranks read the data
    assert "synthetic train split" not in out and "dataset.train: 6 images" not in out  # rank 1's console


def test_ranks_above_zero_pass_only_the_readers_errors_while_the_data_is_read(caplog):
    """Every rank reads the same files: a reader's warning (a degenerate box, a reused COCO id) is rank 0's alone."""
    reader = logging.getLogger("fl_rpn.data.records")
    for rank, expected in ((0, ["a warning", "an error"]), (1, ["an error"])):
        caplog.clear()
        with caplog.at_level(logging.INFO), build.quiet_below_error(DistInfo(rank, 2), "fl_rpn.data"):
            reader.warning("a warning")
            reader.error("an error")
        assert [r.getMessage() for r in caplog.records] == expected
    assert logging.getLogger("fl_rpn.data").level == logging.NOTSET  # restored


def test_drop_file_logging_keeps_the_console(tmp_path, monkeypatch):
    root = logging.getLogger()
    file_handler, console = logging.FileHandler(tmp_path / "train.log"), logging.StreamHandler(sys.stdout)
    monkeypatch.setattr(root, "handlers", [file_handler, console])
    build.drop_file_logging()
    assert root.handlers == [console] and file_handler.stream is None  # closed


def test_resume_true_without_a_checkpoint_warns_and_starts_from_scratch(tmp_path, cache, caplog):
    cfg = compose_config([*FAST, "schedule.max_iters=1", "resume=true", f"output_dir={tmp_path}"])
    with caplog.at_level(logging.WARNING, logger="fl_rpn.engine"):
        train(cfg)
    assert f"resume=true but {tmp_path / 'last.pt'} does not exist: training from scratch" in caplog.text
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 1


def test_fp16_resumes_a_checkpoint_written_without_it(tmp_path, cache, monkeypatch):
    """A run without fp16 saves an empty GradScaler state, which an enabled GradScaler refuses to load.

    fp16 needs CUDA; on the CPU an enabled CPU GradScaler stands in for the one ``amp=fp16`` builds.
    """
    train(compose_config([*FAST, "schedule.max_iters=1", f"output_dir={tmp_path}"]))
    assert load_checkpoint(tmp_path / "last.pt")["scaler"] == {}
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: real("cpu", enabled=True))
    train(compose_config([*FAST, "resume=true", f"output_dir={tmp_path}"]))
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 2 and ckpt["scaler"]["scale"] == 2.0**16 and finite_state(ckpt)


# --- safe loading and resuming ---------------------------------------------------------------------------


def test_a_checkpoint_of_another_rpn_or_model_lists_the_mismatched_keys():
    sigmoid = build_model(compose_config(["rpn=focal_sigmoid"]), num_classes=5)
    softmax = build_model(compose_config(["rpn=focal_softmax"]), num_classes=5)
    with pytest.raises(ValueError, match=r"does not fit this model") as info:
        load_model_state(softmax, sigmoid.state_dict(), "sigmoid.pt")
    message = str(info.value)
    assert "rpn.head.cls_logits.weight: checkpoint (3, 64, 1, 1) vs model (6, 64, 1, 1)" in message
    assert "rpn.head.cls_logits.bias: checkpoint (3,) vs model (6,)" in message

    mobile = build_model(compose_config(["model=mbv3_fpn"]), num_classes=5)
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): ") as info:
        load_model_state(mobile, sigmoid.state_dict(), "tiny.pt")
    assert "unexpected keys" in str(info.value)


@pytest.mark.parametrize(
    "first,then,expected",
    [
        ("rpn=focal_sigmoid", "rpn=focal_softmax", "rpn.form: checkpoint 'sigmoid', now 'softmax'"),
        ("rpn=sampled", "rpn=focal_sigmoid", "rpn.loss: checkpoint 'sampled', now 'focal'"),  # same shapes
        ("rpn.gamma=2.0", "rpn.gamma=1.0", "rpn.gamma: checkpoint 2.0, now 1.0"),
        ("model.fpn_channels=64", "model.fpn_channels=32", "model.fpn_channels: checkpoint 64, now 32"),
    ],
)
def test_resume_with_another_model_or_rpn_config_fails(tmp_path, cache, first, then, expected):
    train(compose_config([*FAST, first, "schedule.max_iters=1", f"output_dir={tmp_path}"]))
    before = (tmp_path / "last.pt").read_bytes()
    cfg = compose_config([*FAST, then, "schedule.max_iters=2", "resume=true", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"cannot resume from .*last\.pt: it was trained with another config") as info:
        train(cfg)
    assert expected in str(info.value)
    assert (tmp_path / "last.pt").read_bytes() == before
