"""The built wheel carries its configs and runs from anywhere; provenance of an installed copy has no commit."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import fl_rpn
from fl_rpn.config import CONF_DIR, find_conf_dir
from fl_rpn.provenance import git_commit

from .conftest import TINY, TINY_DATA

ROOT = Path(__file__).resolve().parents[1]
SMALLER = ["dataset.train.num_images=4", "dataset.val.num_images=2"]  # than TINY's 6 / 3: this test runs 5 apps


def git(cwd, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd, check=True,
        capture_output=True, timeout=60,
    )  # fmt: skip


def test_pyproject_lists_every_package_folder():
    tomllib = pytest.importorskip("tomllib")
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    code = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fl_rpn").rglob("__init__.py")}
    conf = {".".join(("fl_rpn", *d.relative_to(ROOT).parts)) for d in [CONF_DIR, *CONF_DIR.rglob("*")] if d.is_dir()}
    assert packages == code | conf


def test_configs_are_found_in_an_installed_package_and_in_a_checkout(tmp_path):
    installed, checkout = tmp_path / "site-packages" / "fl_rpn", tmp_path / "checkout" / "fl_rpn"
    for conf in (installed / "conf", checkout.parent / "conf", installed.parent / "conf"):
        conf.mkdir(parents=True)
        (conf / "train.yaml").write_text("seed: 0\n")
    checkout.mkdir()
    assert find_conf_dir(installed) == installed / "conf"  # its own copy first, not site-packages/conf
    assert find_conf_dir(checkout) == checkout.parent / "conf"
    with pytest.raises(FileNotFoundError, match=r"neither .*nowhere/fl_rpn/conf \(installed package\)"):
        find_conf_dir(tmp_path / "nowhere" / "fl_rpn")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_only_of_fl_rpns_own_checkout(tmp_path):
    other = tmp_path / "other"  # some repository that happens to hold a copy of the package (a venv, vendored code)
    (other / "lib").mkdir(parents=True)
    (other / "pyproject.toml").write_text('[project]\nname = "something-else"\n')
    (other / "lib" / "pyproject.toml").write_text('[project]\nname = "fl-rpn"\n')  # a copied source tree
    git(other, "init", "-q")
    git(other, "add", "-A")
    git(other, "commit", "-qm", "x")
    assert git_commit(other) is None  # not fl-rpn's pyproject
    assert git_commit(other / "lib") is None  # fl-rpn's, but not the top of the git tree
    assert git_commit(tmp_path / "no-such-dir") is None

    own = tmp_path / "fl-rpn"
    (own / "fl_rpn").mkdir(parents=True)
    (own / "pyproject.toml").write_text('[project]\nname = "fl-rpn"\nversion = "0"\n')
    (own / "fl_rpn" / "x.py").write_text("a = 1\n")
    git(own, "init", "-q")
    git(own, "add", "-A")
    git(own, "commit", "-qm", "x")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=own, capture_output=True, text=True).stdout.strip()
    assert git_commit(own) == sha and len(sha) == 40
    (own / "fl_rpn" / "x.py").write_text("a = 2\n")
    assert git_commit(own) == sha + "-dirty"


def copy_sources(dest: Path) -> Path:
    """What the wheel is built from (pyproject, README, LICENSE, conf/, fl_rpn/), outside this checkout so
    that building leaves nothing (build/, *.egg-info) in it."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("conf", "fl_rpn"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


def test_the_built_wheel_runs_every_app_from_outside_the_repository(tmp_path):
    """Build the wheel, install it (not editable) into a new venv inside an unrelated git repository, and
    train, check the data, evaluate, predict and export from a folder there, with a user's config folder.

    The new venv reuses this environment's packages (torch, ...) through a ``.pth`` file: ``venv
    --system-site-packages`` would give the base interpreter's, not this venv's. Nothing is downloaded.
    """
    src = copy_sources(tmp_path / "src")
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(dist), str(src)], check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = dist.glob("fl_rpn-*.whl")
    assert wheel.name == f"fl_rpn-{fl_rpn.__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    yamls = {f"fl_rpn/conf/{p.relative_to(CONF_DIR).as_posix()}" for p in CONF_DIR.rglob("*.yaml")}
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fl_rpn").rglob("*.py")}
    assert yamls <= names and modules <= names and "fl_rpn/conf/train.yaml" in names
    assert f"fl_rpn-{fl_rpn.__version__}.dist-info/licenses/LICENSE" in names

    outer = tmp_path / "unrelated-repo"  # provenance must not record this repository's commit
    outer.mkdir()
    (outer / "README").write_text("x\n")
    if shutil.which("git"):
        git(outer, "init", "-q")
        git(outer, "add", "-A")
        git(outer, "commit", "-qm", "x")
    venv = outer / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    bin_dir = venv / "bin"
    python = bin_dir / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    Path(site, "parent-env.pth").write_text("\n".join(sorted(ours)) + "\n")  # appended after the venv's own
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", "--no-index", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip

    work = outer / "work"
    (work / "myconf" / "dataset").mkdir(parents=True)  # a user's own option of one of our groups
    (work / "myconf" / "dataset" / "mine.yaml").write_text("defaults: [synthetic, _self_]\nname: mine\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(FL_RPN_CACHE=str(tmp_path / "cache"), HYDRA_FULL_ERROR="1", PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")

    def run(*cmd):
        proc = subprocess.run([*cmd], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (
            f"{cmd[:2]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
        return proc.stdout

    run(str(bin_dir / "fl-rpn-train"), "--config-dir", "myconf", "dataset=mine", *TINY, *SMALLER, "hydra.run.dir=run")
    prov = json.loads((work / "run" / "metrics.json").read_text())["provenance"]
    assert prov["version"] == fl_rpn.__version__ and prov["commit"] is None and prov["dataset"] == "mine"
    assert (work / "run" / "last.pt").is_file()
    sources = {
        s["provider"]: s["path"] for s in OmegaConf.load(work / "run/.hydra/hydra.yaml").hydra.runtime.config_sources
    }
    assert sources["main"] == f"{site}/fl_rpn/conf" and sources["command-line"].endswith("myconf")  # the wheel's copy

    run(str(python), "-m", "fl_rpn.cli.check_data", *TINY_DATA, *SMALLER, "hydra.run.dir=check")
    run(
        str(bin_dir / "fl-rpn-eval"),
        "checkpoint=run/last.pt",
        *TINY_DATA,
        *SMALLER,
        "num_workers=0",
        "hydra.run.dir=eval",
    )
    assert "bbox/AP" in json.loads((work / "eval" / "metrics.json").read_text())
    image = sorted((tmp_path / "cache").rglob("*.png"))[0]
    run(
        str(bin_dir / "fl-rpn-predict"),
        "checkpoint=run/last.pt",
        f"inputs=[{image}]",
        "out_dir=pred",
        "hydra.run.dir=p",
    )
    assert (work / "pred" / f"{image.stem}.png").is_file()
    run(str(bin_dir / "fl-rpn-export"), "checkpoint=run/last.pt", "format=torchscript", "out_dir=deploy")
    assert json.loads((work / "deploy" / "model.json").read_text())["class_names"]
    assert (work / "deploy" / "model.ts").is_file()
