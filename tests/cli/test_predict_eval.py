"""fl-rpn-eval and fl-rpn-predict on a checkpoint alone: the data it was trained with unless the command line says
otherwise, and a prediction's count of detections explained (the best score below ``score_thresh``, the grey boxes)."""

import json
import re

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.io import decode_image

from fl_rpn.cli.eval import overrides_key, use_checkpoint_data
from fl_rpn.cli.predict import detection_summary, predict_images
from fl_rpn.config import compose_config
from fl_rpn.data import ensure_synthetic
from fl_rpn.engine.trainer import train

from ..conftest import TINY_DATA, TINY_RECALL, run_app


@pytest.fixture(scope="module")
def trained(module_cache, tmp_path_factory):
    """``last.pt`` of a 2-iteration run on the tiny synthetic set with 2 val images (not the 3 of ``TINY_DATA``),
    evaluated by proposal recall alone (not the default evaluators)."""
    run = tmp_path_factory.mktemp("run")
    train(compose_config([*TINY_RECALL, "dataset.val.num_images=2", f"cache_dir={module_cache}", f"output_dir={run}"]))
    return run / "last.pt"


def test_eval_evaluates_the_checkpoints_data_unless_the_command_line_chooses(trained, module_cache, tmp_path):
    common = [f"checkpoint={trained}", "num_workers=0"]
    proc = run_app(*common, f"hydra.run.dir={tmp_path / 'own'}", module="fl_rpn.cli.eval", cache=module_cache)
    assert (
        f"evaluating on dataset.val: synthetic val split, {module_cache}, 2 images (from the checkpoint); "
        "eval.evaluators=[proposal_recall] (from the checkpoint)" in proc.stdout
    )
    metrics = json.loads((tmp_path / "own" / "metrics.json").read_text())
    assert "proposal/AR@100" in metrics and "bbox/AP" not in metrics

    overrides = [*TINY_DATA, "eval.evaluators=[coco]", f"hydra.run.dir={tmp_path / 'cli'}"]
    proc = run_app(*common, *overrides, module="fl_rpn.cli.eval", cache=module_cache)
    assert (
        f"evaluating on dataset.val: synthetic val split, {module_cache}, 3 images (from the command line); "
        "eval.evaluators=[coco] (from the command line)" in proc.stdout
    )
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert "bbox/AP" in metrics and "proposal/AR@100" not in metrics


def test_a_new_data_root_moves_the_checkpoints_dataset_and_a_dataset_override_replaces_it():
    ckpt = {"config": {
        "data_root": "/old", "eval": {"evaluators": ["voc07", "coco"]},
        "dataset": {"name": "bccd", "root": "/old/bccd", "val": {"format": "voc", "root": "/old/bccd", "split": "val"}},
    }}  # fmt: skip
    cfg = compose_config(["checkpoint=x", "data_root=/new"], config_name="evaluate")
    assert use_checkpoint_data(cfg, ckpt, ["checkpoint=x", "data_root=/new"]) == (
        "the checkpoint's, moved to data_root=/new from the command line", "from the checkpoint",
    )  # fmt: skip
    assert cfg.dataset.val.root == "/new/bccd" and list(cfg.eval.evaluators) == ["voc07", "coco"]

    cfg = compose_config(["checkpoint=x", "dataset=coco128", "eval.evaluators=[coco]"], config_name="evaluate")
    before = OmegaConf.to_container(cfg.dataset)
    overrides = ["checkpoint=x", "dataset=coco128", "eval.evaluators=[coco]"]
    assert use_checkpoint_data(cfg, ckpt, overrides) == ("from the command line", "from the command line")
    assert OmegaConf.to_container(cfg.dataset) == before and list(cfg.eval.evaluators) == ["coco"]
    assert overrides_key(["+dataset.val.x=1"], "dataset") and not overrides_key(["datasets=1"], "dataset")


def test_detection_summary_gives_the_best_score_below_the_threshold():
    assert detection_summary(torch.tensor([0.7, 0.5, 0.2]), 0.5, 0.05) == "2 detections >= 0.5"
    assert detection_summary(torch.tensor([0.9]), 0.5, 0.05) == "1 detection >= 0.5"
    assert detection_summary(torch.tensor([0.3549, 0.1]), 0.5, 0.05) == "0 detections >= 0.5; best 0.35"
    assert detection_summary(torch.tensor([0.4999]), 0.5, 0.05) == "0 detections >= 0.5; best 0.49"  # not 0.50
    assert detection_summary(torch.zeros(0), 0.5, 0.05) == (
        "0 detections >= 0.5; none above the model's box_score_thresh 0.05"
    )


def test_predict_explains_zero_detections_labels_the_grey_boxes_and_uses_the_checkpoints_data(
    trained, module_cache, tmp_path, capsys
):
    val = compose_config([*TINY_DATA, "dataset.val.num_images=2"]).dataset.val  # the checkpoint's val split
    images_dir, _ = ensure_synthetic(module_cache, val.split, val.num_images, val.seed, image_size=list(val.image_size))
    val_images = sorted(images_dir.iterdir())
    height = decode_image(str(val_images[0])).shape[1]

    def run(name, *overrides):
        cfg = compose_config(
            [f"checkpoint={trained}", f"inputs=[{val_images[0]}]", f"out_dir={tmp_path / name}", *overrides],
            config_name="predict",
        )
        (path,) = predict_images(cfg, overrides=list(overrides))
        return decode_image(str(path)), capsys.readouterr().out

    plain, out = run("plain")
    # a 2-iteration model: no detection reaches 0.5, and the line says how far the best one is
    assert re.search(rf"{val_images[0].name} -> .*: 0 detections >= 0\.5; best 0\.[0-4]\d$", out, flags=re.M), out
    with_proposals, _ = run("proposals", "proposals_topk=20")
    strip, strip_with_legend = plain[:, height:], with_proposals[:, height:]
    assert len(strip) and (strip < 100).any() and (strip == 255).any()  # black text on white, under the image
    assert strip_with_legend.shape[1] > strip.shape[1]  # a second caption row: "grey: top-20 RPN proposals"

    drawn, out = run("gt", "ground_truth=true")
    assert f"ground truth from dataset.val: synthetic val split, {module_cache}, 2 images (from the checkpoint)" in out
    assert drawn.shape[2] > 2 * plain.shape[2]  # ground truth | gap | predictions
    _, out = run("gt_cli", "ground_truth=true", *TINY_DATA, f"cache_dir={module_cache}")  # another val split
    assert "3 images (from the command line)" in out and "(not in dataset.val synthetic: no ground truth drawn)" in out
