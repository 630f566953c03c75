"""bf16 autocast, channels_last and torch.compile on the CPU, through the real training loop (``train(cfg)``).

Step 0 of two runs with the same seed sees the same weights and the same batch, so ``history[0]`` (the losses of
the first step, logged with ``log_every=1``) of an fp32 run and of a bf16 run differ only by the autocast.
"""

import math
import os

import pytest
import torch

from fl_rpn.config import compose_config
from fl_rpn.engine.checkpoint import load_checkpoint
from fl_rpn.events import current_storage
from fl_rpn.modeling.model import apply_speed_options, build_model

from ..conftest import FAST
from .conftest import train_with

RUN = [*FAST, "device=cpu", "schedule.checkpoint_every=100"]  # schedule.max_iters: run()'s iters
FORMS = ["sampled", "focal_sigmoid", "focal_softmax", "focal_sigmoid_lr2"]
LOSSES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")
# Step-0 tolerances of bf16 vs fp32, relative. bf16 keeps 8 significant bits (rounding 2^-9 = 0.2 % per operand).
# - RPN terms: the anchors, their labels and box targets do not depend on the predictions, so only the rounding of
#   the head's logits moves these means over ~5e3 anchors: measured 2e-5 .. 2e-4; 2e-3 still fails a sum or a count
#   taken in bf16 (a count of 300 positives rounds to a multiple of 2 there, a sum over 5e3 anchors loses ~1 %).
# - RoI terms: computed on the proposals, whose order (top-n, NMS) the rounded scores change, so another set of
#   RoIs is sampled. At step 0 every anchor's score is near the prior (0.01), so which proposals survive is decided
#   by the rounding: measured 5e-4 .. 0.44 (focal_sigmoid's loss_box_reg, seed 0); 0.6 bounds that while a broken
#   head (a loss off by 2x or NaN) still fails.
BF16_RTOL = {"loss_objectness": 2e-3, "loss_rpn_box_reg": 2e-3, "loss_classifier": 0.6, "loss_box_reg": 0.6}
# channels_last / compile in fp32: other kernels, rounding only; the RoI terms again through the proposals' order
FP32_RTOL = {"loss_objectness": 1e-4, "loss_rpn_box_reg": 1e-4, "loss_classifier": 1e-2, "loss_box_reg": 1e-2}


def run(tmp_path, cache, *overrides, iters=1, prepare=None):
    cfg = compose_config([*RUN, f"cache_dir={cache}", f"schedule.max_iters={iters}", *overrides,
                          f"output_dir={tmp_path}"])  # fmt: skip
    train_with(cfg, *([prepare] if prepare else []))
    return load_checkpoint(tmp_path / "last.pt")


@pytest.fixture
def recorded():
    """``(seen, prepare)``: ``prepare(state)`` records what the model computes inside the real training steps (not
    the evaluation after them) into ``seen``: dtypes of the head's output, of the RPN's losses and statistics, and
    the layout of the first convolution's weight."""
    seen: dict[str, list] = {"head": [], "rpn_losses": [], "stats": [], "nhwc": []}

    def prepare(state):
        model = state.model

        def on_head(module, args, out):
            if module.training:  # not the evaluation after training
                seen["head"].append(out[0][0].dtype)

        def on_rpn(module, args, out):
            if module.training:
                seen["rpn_losses"].append({k: v.dtype for k, v in out[1].items()})
                stats = current_storage().scalars()  # the step's, put during this forward pass
                seen["stats"].append({k.removeprefix("rpn/"): v.dtype for k, v in stats.items()})

        def on_conv(module, args, out):
            if module.training:
                seen["nhwc"].append(module.weight.is_contiguous(memory_format=torch.channels_last))

        model.rpn.head.register_forward_hook(on_head)
        model.rpn.register_forward_hook(on_rpn)
        next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)).register_forward_hook(on_conv)

    return seen, prepare


def step0(ckpt) -> dict[str, float]:
    return {k: ckpt["history"][0][k] for k in LOSSES}


@pytest.mark.parametrize("rpn", FORMS)
def test_bf16_autocast_trains_every_rpn_form_on_the_cpu(tmp_path, module_cache, recorded, rpn):
    recorded, prepare = recorded
    fp32 = step0(run(tmp_path / "fp32", module_cache, f"rpn={rpn}"))
    ckpt = run(tmp_path / "bf16", module_cache, f"rpn={rpn}", "amp=bf16", iters=3, prepare=prepare)

    assert [h["iteration"] for h in ckpt["history"]] == [1, 2, 3]
    for h in ckpt["history"]:  # every step's losses are finite
        assert all(math.isfinite(h[k]) for k in (*LOSSES, "loss")), h
    bf16 = step0(ckpt)
    print(rpn, "step-0 |bf16 / fp32 - 1|:", {k: f"{abs(bf16[k] / fp32[k] - 1):.1e}" for k in LOSSES})
    for k in LOSSES:
        assert bf16[k] == pytest.approx(fp32[k], rel=BF16_RTOL[k]), (k, bf16[k], fp32[k])
    assert bf16 != fp32  # autocast was on: some loss moved

    # inside the real step: the convolutions ran in bf16, the RPN's losses and statistics stayed in float32
    assert recorded["head"] == [torch.bfloat16] * 3
    assert all(d == torch.float32 for losses in recorded["rpn_losses"] for d in losses.values())
    assert all(d == torch.float32 for stats in recorded["stats"] for d in stats.values())
    assert len(recorded["stats"]) == 3 and "positive_anchors_per_image" in recorded["stats"][0]
    if rpn != "sampled":  # the focal loss's normaliser (the loss's own dtype: tests/test_rpn.py, under autocast)
        assert "focal_normalizer" in recorded["stats"][0]


def test_channels_last_gives_the_losses_of_the_default_layout(tmp_path, module_cache, recorded):
    recorded, prepare = recorded
    default = run(tmp_path / "nchw", module_cache, iters=2, prepare=prepare)
    assert recorded["nhwc"] == [False, False]
    recorded["nhwc"].clear()
    nhwc = run(tmp_path / "nhwc", module_cache, "channels_last=true", iters=2, prepare=prepare)
    assert recorded["nhwc"] == [True, True]  # the weights really were in NHWC inside the step
    for before, after in zip(default["history"], nhwc["history"]):
        for k in LOSSES:
            assert after[k] == pytest.approx(before[k], rel=FP32_RTOL[k]), k
    assert nhwc["model"].keys() == default["model"].keys()


def test_compile_keeps_parameters_and_state_dict_keys():
    cfg = compose_config(["rpn=focal_softmax"])
    model = build_model(cfg, num_classes=3)
    keys, params = list(model.state_dict()), list(model.parameters())
    apply_speed_options(model, channels_last=True, compile_mode="max-autotune")  # lazy: nothing compiles yet
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in model.state_dict())
    assert all(a is b for a, b in zip(model.parameters(), params))  # the optimizer may be built before or after
    assert model.backbone.body.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"config key compile='fast'"):
        apply_speed_options(model, compile_mode="fast")


@pytest.mark.skipif(not os.environ.get("FL_RPN_TEST_COMPILE"), reason="FL_RPN_TEST_COMPILE=1: compiling takes minutes")
def test_compiled_training_gives_the_eager_losses(tmp_path, module_cache):
    eager = run(tmp_path / "eager", module_cache, iters=2)
    compiled = run(tmp_path / "compiled", module_cache, "compile=default", iters=2)
    for before, after in zip(eager["history"], compiled["history"]):
        for k in LOSSES:
            assert after[k] == pytest.approx(before[k], rel=FP32_RTOL[k]), k
    assert compiled["model"].keys() == eager["model"].keys()
