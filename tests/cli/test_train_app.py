"""The Hydra apps end to end on tiny synthetic data: train -> checkpoint -> resume -> eval -> predict."""

import json
from datetime import datetime, timezone

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_image

from fl_rpn.cli.predict import predict_images
from fl_rpn.config import compose_config
from fl_rpn.engine.checkpoint import load_checkpoint, model_from_checkpoint
from fl_rpn.engine.evaluate import predict
from fl_rpn.engine.trainer import train

from ..conftest import FAST, TINY, TINY_DATA, run_app


def test_train_resume_eval_predict_through_the_apps(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    run_app(*TINY, f"hydra.run.dir={run_dir}", cache=cache)
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["iteration"] == 2 and ckpt["meta"]["class_names"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("bbox/AP", "bbox/AP50", "bbox/APl", "proposal/AR@100", "proposal/AR@1000", "train/loss"):
        assert key in metrics
    assert metrics["train/iterations"] == 2
    assert metrics["provenance"]["rpn"] == "focal_softmax" and metrics["provenance"]["seed"] == 0
    started, finished = (datetime.fromisoformat(metrics["provenance"][k]) for k in ("started", "finished"))
    assert started <= finished <= datetime.now(timezone.utc)  # the commit is read at the start, the end is the end
    assert (run_dir / ".hydra" / "config.yaml").is_file() and list((run_dir / "tb").iterdir())
    resolved = (run_dir / "config_resolved.yaml").read_text()
    assert "${" not in resolved and f"output_dir: {run_dir}" in resolved and f"cache_dir: {cache}" in resolved
    assert "${" in (run_dir / ".hydra" / "config.yaml").read_text()  # Hydra keeps the interpolations

    # resume the same run directory to 4 iterations: it continues from 2
    run_app(*TINY, "schedule.max_iters=4", "resume=true", f"hydra.run.dir={run_dir}", cache=cache)
    assert load_checkpoint(run_dir / "last.pt")["iteration"] == 4
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["iteration"] for h in history] == [1, 2, 3, 4]  # the first segment's scalars come from last.pt

    eval_dir = tmp_path / "eval"
    run_app(
        f"checkpoint={run_dir / 'last.pt'}", *TINY_DATA, "eval.evaluators=[coco,proposal_recall,voc07]",
        "num_workers=0", f"hydra.run.dir={eval_dir}", module="fl_rpn.cli.eval", cache=cache,
    )  # fmt: skip
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    assert evaluated["iteration"] == 4 and "voc07/mAP" in evaluated and "voc07/AP/circle" in evaluated

    images = sorted((cache).rglob("*.png"))[:2]
    out = tmp_path / "pred"
    run_app(
        f"checkpoint={run_dir / 'last.pt'}", f"inputs=[{images[0]},{images[1]}]", f"out_dir={out}",
        "score_thresh=0.0", "proposals_topk=5", f"hydra.run.dir={tmp_path / 'p'}", module="fl_rpn.cli.predict",
        cache=cache,
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.png" for p in images)


def test_an_unknown_override_names_the_nearest_key(tmp_path):
    """Not Hydra's "To append to your config use +rpn.gama=3": the key does not exist, the nearest one is named."""
    proc = run_app("rpn.gama=3", f"hydra.run.dir={tmp_path / 'run'}", cache=tmp_path, check=False)
    assert proc.returncode == 1 and not (tmp_path / "run").exists()
    assert proc.stderr.strip().splitlines()[-1].startswith("fl-rpn-train: unknown config key rpn.gama (did you mean "
                                                            "rpn.gamma? ")  # fmt: skip
    assert "+rpn.gama" not in proc.stderr


def test_eval_records_the_checkpoints_seed_and_schedule_not_its_own_defaults(tmp_path, cache):
    from fl_rpn.cli.eval import evaluate_checkpoint

    overrides = [*FAST, "seed=3", "rpn=focal_sigmoid", "schedule.max_iters=1", f"output_dir={tmp_path / 'run'}"]
    train(compose_config(overrides))
    cfg = compose_config(
        [f"checkpoint={tmp_path / 'run' / 'last.pt'}", *TINY_DATA, "eval.evaluators=[]", "num_workers=0",
         f"output_dir={tmp_path / 'eval'}"], config_name="evaluate",
    )  # fmt: skip
    assert (cfg.seed, cfg.schedule.max_iters, cfg.rpn.name) == (0, 600, "focal_softmax")  # evaluate.yaml's defaults
    evaluate_checkpoint(cfg)
    recorded = json.loads((tmp_path / "eval" / "metrics.json").read_text())["provenance"]
    assert recorded["seed"] == 3 and recorded["rpn"] == "focal_sigmoid" and recorded["model"] == "tiny_fpn"
    assert recorded["schedule"] == "cpu_demo: 1 iterations x 2 images" and recorded["train_world_size"] == 1
    assert datetime.fromisoformat(recorded["finished"]) <= datetime.now(timezone.utc)
    assert recorded["dataset"] == "synthetic" and recorded["train_dataset"] == "synthetic"


def test_predict_reads_bmp_keeps_same_stem_inputs_apart_and_draws_proposals(tmp_path, cache):
    train(compose_config([*FAST, "schedule.max_iters=1", f"output_dir={tmp_path / 'run'}"]))
    checkpoint = tmp_path / "run" / "last.pt"
    png, other = sorted(cache.rglob("*.png"))[:2]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(png.read_bytes())
    Image.open(other).convert("RGB").save(tmp_path / "b" / "x.bmp")  # torchvision.io does not decode BMP

    def run(out, topk):
        overrides = [f"checkpoint={checkpoint}", f"inputs=[{tmp_path / 'a'},{tmp_path / 'b'}]", f"out_dir={out}",
                     "score_thresh=1.1", f"proposals_topk={topk}", "caption=false"]  # fmt: skip
        written = predict_images(compose_config(overrides, config_name="predict"))
        return {p.name: decode_image(str(p)) for p in written}

    plain = run(tmp_path / "plain", 0)
    assert sorted(plain) == ["x-0.png", "x-1.png"]  # same stem, different folders: both kept
    assert torch.equal(plain["x-1.png"], torch.from_numpy(np.array(Image.open(other).convert("RGB"))).permute(2, 0, 1))

    drawn = run(tmp_path / "drawn", 5)
    model, _ = model_from_checkpoint(checkpoint)
    for name, source in (("x-0.png", plain["x-0.png"]), ("x-1.png", plain["x-1.png"])):
        changed = (drawn[name] != source).any(0)
        assert changed.sum() > 20 and (drawn[name][:, changed] == 128).all()  # only grey proposal outlines
        (output,) = predict(model, [source.float() / 255])
        for x1, y1, _, _ in output["proposals"][:5].long().tolist():  # every box's corner is outlined
            assert (drawn[name][:, y1, x1] == 128).all()


def test_drawings_use_a_colour_per_class_and_labels_that_scale_with_the_image():
    from fl_rpn.cli.predict import PALETTE, draw_boxes, drawing_sizes

    assert drawing_sizes(torch.zeros(3, 96, 128)) == (1, 10)
    assert drawing_sizes(torch.zeros(3, 640, 960)) == (2, 16) and drawing_sizes(torch.zeros(3, 1280, 1280)) == (4, 32)
    rgb = [tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in PALETTE[:2]]
    for side in (320, 1280):
        image = torch.full((3, side, side), 255, dtype=torch.uint8)
        boxes = torch.tensor([[0.2, 0.3, 0.45, 0.8], [0.55, 0.3, 0.9, 0.8]]) * side
        drawn = draw_boxes(image, boxes, torch.tensor([1, 2]), ["circle 0.91", "square 0.50"])
        width, font_size = drawing_sizes(image)
        for (x1, y1, _, y2), colour in zip(boxes.long().tolist(), rgb):
            assert tuple(drawn[:, (y1 + y2) // 2, x1].tolist()) == colour  # the left edge, in the class colour
            # the filled label hangs from the box's top-left corner: about font_size rows of the class colour
            column = (drawn[:, y1 : y1 + 3 * font_size, x1 + width + 1] == torch.tensor(colour)[:, None]).all(0)
            assert 0.7 * font_size <= column.sum() <= 2 * font_size, (side, int(column.sum()))


def test_predict_reports_unreadable_inputs_goes_on_and_draws_the_ground_truth(tmp_path, cache):
    from fl_rpn.cli.predict import PALETTE
    from fl_rpn.data import build_dataset

    train(compose_config([*FAST, "schedule.max_iters=1", f"output_dir={tmp_path / 'run'}"]))
    val = build_dataset(compose_config(TINY).dataset.val, train=False)
    first, second = val.records[0], val.records[1]
    assert len(first.boxes) > 0
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "empty.jpg").write_bytes(b"")
    inputs = [first.file, tmp_path / "bad.png", second.file, tmp_path / "empty.jpg"]
    overrides = [f"checkpoint={tmp_path / 'run' / 'last.pt'}", f"inputs=[{','.join(map(str, inputs))}]",
                 f"out_dir={tmp_path / 'out'}", "score_thresh=1.1", "ground_truth=true", "caption=false",
                 *TINY_DATA]  # fmt: skip
    with pytest.raises(ValueError, match=r"^inputs: 2 of 4 images could not be read \(the other 2 were drawn") as e:
        predict_images(compose_config(overrides, config_name="predict"))
    assert "bad.png" in str(e.value) and "empty.jpg" in str(e.value)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted([f"{first.file.stem}.png", f"{second.file.stem}.png"])  # the ones after a bad one too
    drawing = decode_image(str(tmp_path / "out" / f"{first.file.stem}.png"))
    original = decode_image(str(first.file))
    height, width = original.shape[1:]
    assert tuple(drawing.shape) == (3, height, 2 * width + 8)  # ground truth | gap | predictions
    assert torch.equal(drawing[:, :, width + 8 :], original)  # score_thresh 1.1: no detection drawn on the right
    left = drawing[:, :, :width]
    x1, y1, x2, y2 = first.boxes[0].astype(int).tolist()
    hex_colour = PALETTE[int(first.labels[0]) - 1]
    colour = [int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]
    assert left[:, (y1 + y2) // 2, x1].tolist() == colour  # the ground-truth box in its class colour
