"""What the Hydra commands do before Hydra runs (fl_rpn/cli/preflight.py): their --help, an unknown key named with
the nearest one, an unwritable run directory named; and the short-schedule warning with the smoke preset."""

import errno
import logging
import tempfile

import pytest

from fl_rpn.cli import preflight as pf
from fl_rpn.config import compose_config
from fl_rpn.engine.optim import short_schedule
from fl_rpn.engine.validate import validate_config

from ..conftest import run_app


def run_preflight(monkeypatch, capsys, *argv: str) -> tuple[int | None, str, str]:
    monkeypatch.setattr("sys.argv", ["fl-rpn-train", *argv])
    code = None
    try:
        pf.preflight("fl-rpn-train", "train", "train a detector", ["fl-rpn-train"], ["scale", "dataset", "rpn"])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_the_groups_a_user_picks_with_their_options_and_the_sibling_commands(monkeypatch, capsys):
    code, out, _ = run_preflight(monkeypatch, capsys, "--help")
    assert code == 0 and out.startswith("fl-rpn-train: train a detector\n")
    assert "  scale    a preset of dataset + model + schedule" in out and "bccd, bccd_pretrained, coco," in out
    assert "  rpn      the RPN loss" in out and "focal_sigmoid, focal_sigmoid_lr2, focal_softmax" in out
    assert "_base" not in out and "hydra/" not in out  # bases and Hydra's own groups are not options
    assert all(name in out for name in pf.COMMANDS) and "fl-rpn-train --cfg job" in out


def test_the_train_command_has_the_app_help(tmp_path):
    out = run_app("--help", cwd=tmp_path, cache=tmp_path / "cache").stdout
    assert "`scale=` picks a whole setting" in out and "  experiment  a sweep of the paper's ablations" in out
    assert "fl-rpn-train scale=bccd data_root=DIR rpn=sampled" in out and "_base" not in out


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("rpn.gama=3", "unknown config key rpn.gama (did you mean rpn.gamma? "),
        (
            "model.detector.min_sise=3",
            "unknown config key model.detector.min_sise (did you mean model.detector.min_size? ",
        ),
        ("batch_sise=3", "unknown config key batch_sise (did you mean batch_size? "),
    ],
)
def test_an_unknown_key_is_named_with_the_nearest_existing_one(monkeypatch, capsys, override, expected):
    code, _, err = run_preflight(monkeypatch, capsys, override)
    assert code == 1 and err.startswith(f"fl-rpn-train: {expected}") and "+" not in err


def test_known_keys_sweeps_and_additions_pass(monkeypatch, capsys, tmp_path):
    for argv in (["rpn.gamma=3"], ["-m", "rpn=focal_sigmoid,sampled", "seed=0,1"], ["+extra_key=1"],
                 ["rpn=sampled", "rpn.batch_size_per_image=128"], [f"hydra.run.dir={tmp_path}/new/run"]):  # fmt: skip
        assert run_preflight(monkeypatch, capsys, *argv) == (None, "", ""), argv


def test_an_unwritable_run_directory_is_one_line(monkeypatch, capsys, tmp_path):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    code, _, err = run_preflight(monkeypatch, capsys, f"hydra.run.dir={tmp_path}/run", "resume=true")
    assert code == 1 and err == (
        f"fl-rpn-train: cannot write the run directory {tmp_path}/run (Read-only file system): choose a writable one "
        "with hydra.run.dir=DIR (to go on from a checkpoint there: resume=PATH/last.pt hydra.run.dir=DIR)\n"
    )


def test_a_schedule_cut_short_is_warned_about_and_smoke_scales_with_its_length(caplog):
    with caplog.at_level(logging.WARNING, logger="fl_rpn.engine.optim"):
        validate_config(compose_config(["schedule.max_iters=40"]))  # the CPU demo: warm-up 50, steps 450 and 550
    assert "schedule.max_iters=40 ends before schedule.warmup_iters=50 and the lr step(s) [450, 550]" in caplog.text
    assert "this run stops during the warm-up; for a short whole run use schedule=smoke" in caplog.text
    assert "stops before its lr decays" in short_schedule(compose_config(["schedule.max_iters=500"]).schedule)
    for length, warmup, steps in ((40, 5, [30, 36]), (100, 12, [75, 90]), (1000, 125, [750, 900])):
        s = compose_config(["schedule=smoke", f"schedule.max_iters={length}"]).schedule
        assert (s.warmup_iters, list(s.steps), s.checkpoint_every) == (warmup, steps, length)
        assert short_schedule(s) is None
