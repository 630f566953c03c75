"""Where the Hydra config lives, and composing it outside a Hydra app (tests, notebooks, scripts)."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> DictConfig:
    """The composed root config with command-line style ``overrides`` (``["rpn=focal_sigmoid", ...]``)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name, overrides=list(overrides))
