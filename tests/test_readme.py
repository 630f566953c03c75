"""The README's Python snippets run as written, offline (no weights are downloaded)."""

import re

import pytest

from fl_rpn.config import CONF_DIR

README = CONF_DIR.parent / "README.md"


def python_blocks() -> list[str]:
    """The README's ```python blocks, except those that open with ``# needs:`` (files made by another step,
    such as the deployment recipe, which tests/test_export.py runs on files it exports itself)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if not b.startswith("# needs:")]


def test_every_python_snippet_runs_offline(monkeypatch, tmp_path):
    import torch.hub
    import torchvision.models._api

    def offline(url, *args, **kwargs):
        raise AssertionError(f"a README snippet downloads {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached either
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    blocks = python_blocks()
    assert blocks, "no ```python block in the README"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    model = namespace.get("model")
    if model is not None:  # the last snippet's model is the swapped Mask R-CNN
        from fl_rpn import FocalLossRPN

        assert isinstance(model.rpn, FocalLossRPN)


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn"])
def test_the_snippet_names_the_offline_arguments(name):
    assert any(f"{name}(weights=None, weights_backbone=None" in block for block in python_blocks())
