"""The EMA hook: the closed form of the average, the swap for evaluation, and ``ema=<decay>`` in a run."""

import json

import pytest
import torch
from torch import nn

from fl_rpn.config import compose_config
from fl_rpn.engine.checkpoint import load_checkpoint
from fl_rpn.engine.ema import EMA
from fl_rpn.engine.trainer import train

from ..conftest import TINY_RECALL


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2, dtype=torch.float64)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_the_average_after_n_updates_is_its_closed_form():
    """ema_n = d^n w_0 + (1 - d) sum_k d^(n-k) w_k; integer buffers are the latest value."""
    torch.manual_seed(0)
    model, decay = Tiny(), 0.9
    ema = EMA(model=model, decay=decay)
    w = [model.linear.weight.detach().clone()]
    for k in range(1, 6):
        with torch.no_grad():
            model.linear.weight.copy_(torch.randn(2, 3, dtype=torch.float64))
            model.count.fill_(k)
        w.append(model.linear.weight.detach().clone())
        ema.update()
    n = len(w) - 1
    expected = decay**n * w[0] + sum((1 - decay) * decay ** (n - k) * w[k] for k in range(1, n + 1))
    torch.testing.assert_close(ema.weights["linear.weight"], expected, rtol=1e-12, atol=1e-12)
    assert ema.weights["count"].item() == 5 and ema.updates == 5


def test_applied_swaps_the_average_in_and_restores_the_live_weights_exactly():
    torch.manual_seed(0)
    model = Tiny()
    ema = EMA(model=model, decay=0.5)
    with torch.no_grad():
        model.linear.weight.add_(1.0)
    ema.update()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied(model):
        assert torch.equal(model.linear.weight, ema.weights["linear.weight"])
        assert not torch.equal(model.linear.weight, live["linear.weight"])
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())


def test_decay_outside_the_open_unit_interval_is_refused():
    with pytest.raises(ValueError, match=r"config key ema=1\.0: must be null or a decay in \(0, 1\)"):
        train(compose_config([*TINY_RECALL, "ema=1.0", "output_dir=unused"]))


def test_a_run_with_ema_evaluates_checkpoints_and_resumes_the_average(tmp_path, cache):
    metrics = train(compose_config([*TINY_RECALL, "ema=0.5", f"output_dir={tmp_path / 'run'}"]))
    assert "proposal/AR@100" in metrics and "ema/proposal/AR@100" in metrics
    assert "ema/proposal/AR@100" in json.loads((tmp_path / "run" / "metrics.json").read_text())
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    saved = ckpt["hooks"]["ema"]
    assert saved["updates"] == 2 and saved["decay"] == 0.5 and set(saved["weights"]) == set(ckpt["model"])
    assert any(not torch.equal(saved["weights"][k], v) for k, v in ckpt["model"].items() if v.is_floating_point())

    # two more iterations from the checkpoint: the average continues from the saved one, not from the weights
    train(
        compose_config(
            [*TINY_RECALL, "ema=0.5", "schedule.max_iters=4", "resume=true", f"output_dir={tmp_path / 'run'}"]
        )
    )
    resumed = load_checkpoint(tmp_path / "run" / "last.pt")["hooks"]["ema"]
    train(compose_config([*TINY_RECALL, "ema=0.5", "schedule.max_iters=4", f"output_dir={tmp_path / 'straight'}"]))
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")["hooks"]["ema"]
    assert resumed["updates"] == straight["updates"] == 4
    for k, v in straight["weights"].items():
        torch.testing.assert_close(resumed["weights"][k], v, rtol=0, atol=1e-6, msg=k)


def test_a_checkpoint_without_ema_resumes_with_ema_from_its_weights(tmp_path, cache, caplog):
    """Also a checkpoint written before hooks existed (no ``hooks`` key at all)."""
    train(compose_config([*TINY_RECALL, "eval.evaluators=[]", f"output_dir={tmp_path}"]))
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt.pop("hooks") == {}
    torch.save(ckpt, tmp_path / "last.pt")
    with caplog.at_level("INFO", logger="fl_rpn.engine.ema"):
        train(compose_config([*TINY_RECALL, "eval.evaluators=[]", "ema=0.9", "schedule.max_iters=3", "resume=true",
                              f"output_dir={tmp_path}"]))  # fmt: skip
    assert "ema: the checkpoint holds no averaged weights; averaging from iteration 2" in caplog.text
    assert load_checkpoint(tmp_path / "last.pt")["hooks"]["ema"]["updates"] == 1
