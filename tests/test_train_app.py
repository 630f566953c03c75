"""The Hydra apps end to end on tiny synthetic data: train -> checkpoint -> resume -> eval -> predict."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fl_rpn.engine.checkpoint import load_checkpoint
from fl_rpn.engine.trainer import train

TINY = [
    "dataset.train.num_images=6", "dataset.val.num_images=3",
    "dataset.train.image_size=[96,128]", "dataset.val.image_size=[96,128]",
    "model.detector.min_size=96", "model.detector.max_size=128",
    "batch_size=2", "num_workers=0", "eval.batch_size=2",
    "schedule.max_iters=2", "schedule.warmup_iters=1", "schedule.steps=[]",
    "schedule.log_every=1", "schedule.checkpoint_every=1",
]  # fmt: skip


def run_app(module, *overrides, cache_dir, check=True):
    env = {**os.environ, "FL_RPN_CACHE": str(cache_dir), "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *overrides], capture_output=True, text=True, env=env, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_train_resume_eval_predict_through_the_apps(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    run_app("fl_rpn.train", *TINY, f"hydra.run.dir={run_dir}", cache_dir=cache)
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["iteration"] == 2 and ckpt["meta"]["class_names"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("bbox/AP", "bbox/AP50", "bbox/APl", "proposal/AR@100", "proposal/AR@1000", "train/loss"):
        assert key in metrics
    assert metrics["train/iterations"] == 2
    assert metrics["provenance"]["rpn"] == "focal_softmax" and metrics["provenance"]["seed"] == 0
    assert (run_dir / ".hydra" / "config.yaml").is_file() and list((run_dir / "tb").iterdir())

    # resume the same run directory to 4 iterations: it continues from 2
    run_app("fl_rpn.train", *TINY, "schedule.max_iters=4", "resume=true", f"hydra.run.dir={run_dir}", cache_dir=cache)
    assert load_checkpoint(run_dir / "last.pt")["iteration"] == 4
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["iteration"] for h in history] == [1, 2, 3, 4]  # the first segment's scalars come from last.pt

    eval_dir = tmp_path / "eval"
    run_app(
        "fl_rpn.eval", f"checkpoint={run_dir / 'last.pt'}", *TINY[:4], "eval.evaluators=[coco,proposal_recall,voc07]",
        "num_workers=0", f"hydra.run.dir={eval_dir}", cache_dir=cache,
    )  # fmt: skip
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    assert evaluated["iteration"] == 4 and "voc07/mAP" in evaluated and "voc07/AP/circle" in evaluated

    images = sorted((cache).rglob("*.png"))[:2]
    out = tmp_path / "pred"
    run_app(
        "fl_rpn.predict", f"checkpoint={run_dir / 'last.pt'}", f"inputs=[{images[0]},{images[1]}]",
        f"out_dir={out}", "score_thresh=0.0", "proposals_topk=5", f"hydra.run.dir={tmp_path / 'p'}", cache_dir=cache,
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.png" for p in images)


def test_unknown_override_is_rejected_by_hydra(tmp_path):
    proc = run_app("fl_rpn.train", "rpn.gama=3", f"hydra.run.dir={tmp_path}", cache_dir=tmp_path, check=False)
    assert proc.returncode != 0
    assert "Could not override 'rpn.gama'" in proc.stderr and "Key 'gama' is not in struct" in proc.stderr
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("rpn", ["sampled", "focal_sigmoid"])
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(compose_cfg, tmp_path, monkeypatch, rpn):
    monkeypatch.setenv("FL_RPN_CACHE", str(tmp_path / "cache"))
    overrides = [*TINY, f"rpn={rpn}", "eval.evaluators=[]", "schedule.checkpoint_every=2"]
    straight = compose_cfg(*overrides, "schedule.max_iters=4", f"output_dir={tmp_path / 'a'}")
    train(straight)
    first = compose_cfg(*overrides, "schedule.max_iters=2", f"output_dir={tmp_path / 'b'}")
    train(first)
    resumed = compose_cfg(*overrides, "schedule.max_iters=4", "resume=true", f"output_dir={tmp_path / 'b'}")
    train(resumed)
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
