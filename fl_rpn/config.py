"""Where the Hydra config lives, and composing it outside a Hydra app (tests, notebooks, scripts).

The configs are kept in ``conf/`` at the top of the repository. A built wheel carries a copy of them as
package data, ``fl_rpn/conf`` (``pyproject.toml`` maps ``conf`` there); a checkout or an editable install
reads the top-level ``conf/`` directly.
"""

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent


def find_conf_dir(package_dir: Path = PACKAGE_DIR) -> Path:
    """``<package>/conf`` in an installed wheel, else ``<checkout>/conf`` beside the package."""
    for candidate in (package_dir / "conf", package_dir.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"fl-rpn's configs are missing: neither {package_dir / 'conf'} (installed package) nor "
        f"{package_dir.parent / 'conf'} (checkout) holds train.yaml; reinstall fl-rpn"
    )


CONF_DIR = find_conf_dir()


def scale_iters(iterations: int, fraction: float) -> int:
    """``round(iterations x fraction)``: the ``${scale_iters:${.max_iters},0.75}`` of a schedule whose warm-up and
    lr steps follow its length (``conf/schedule/smoke.yaml``)."""
    return round(int(iterations) * float(fraction))


OmegaConf.register_new_resolver("scale_iters", scale_iters, replace=True)


def compose_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> DictConfig:
    """The composed root config with command-line style ``overrides`` (``["rpn=focal_sigmoid", ...]``)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name, overrides=list(overrides))
