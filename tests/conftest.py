"""Shared fixtures: the real Hydra config, composed with tiny overrides."""

import pytest
import torch

from fl_rpn.config import compose_config


@pytest.fixture
def compose_cfg():
    """``compose_cfg(*overrides)`` -> the composed root config (``conf/train.yaml``)."""

    def _compose(*overrides: str):
        return compose_config(overrides)

    return _compose


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
