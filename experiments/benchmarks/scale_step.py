"""Training step time of the scale presets, interleaved: what one iteration of `scale=<preset>` costs on this CPU.

Each arm is a list of config overrides (a scale preset, plus changes), built as the trainer builds it
(``fl_rpn.engine.build.build_trainable`` via ``_common.trainer_parts``) with the layout a pretrained backbone implies
(frozen BatchNorm, torchvision's trainable layers) but without reading weights, which do not change the time. One
step is the arm's ``TrainStep`` on a fixed batch of ``--batch`` synthetic images of ``--image`` pixels (BCCD's
640x480 by default; each model resizes them as its config says), 1-6 boxes per image. Arms are interleaved, the start
arm rotated every round; reported: the median and interquartile range of the step time, the ratio to the first arm,
and the projected length of a run of the arm's schedule (``schedule.max_iters`` x the median step, without the
evaluations).

    python experiments/benchmarks/scale_step.py --threads 1     # scale=bccd (tiny_fpn) vs scale=bccd_pretrained
    python experiments/benchmarks/scale_step.py --threads 1 --arms 'scale=bccd;scale=coco128_pretrained'
"""

from __future__ import annotations

import argparse

import torch
from _common import (
    add_common_arguments,
    fmt_ms,
    interleaved_times,
    iqr,
    load_average,
    markdown_table,
    median,
    provenance_lines,
    trainer_parts,
    wait_for_quiet,
    write_numbers,
    write_section,
)

from fl_rpn.config import compose_config

DEFAULT_ARMS = (
    "scale=bccd",  # tiny_fpn from scratch, the real-image studies so far
    "scale=bccd_pretrained",  # mbv2_fpn with ImageNet weights: 128 RoIs, 256-d box head
    "scale=bccd_pretrained model.box_head_dim=1024 model.detector.box_batch_size_per_image=512",  # torchvision's
)


def make_batch(batch: int, size: tuple[int, int], seed: int):
    """``batch`` images ``[3, H, W]`` uniform in [0, 1] with 1-6 boxes of 8-50 % of the shorter side each."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, h, w, generator=g))
        n = int(torch.randint(1, 7, (1,), generator=g))
        side = torch.empty(n).uniform_(0.08, 0.5, generator=g) * min(h, w)
        x0 = torch.rand(n, generator=g) * (w - side)
        y0 = torch.rand(n, generator=g) * (h - side)
        boxes = torch.stack([x0, y0, x0 + side, y0 + side], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, 4, (n,), generator=g)})
    return images, targets


def make_arm(overrides: list[str], batch: int, seed: int, images, targets):
    """``(one step, schedule.max_iters, model name)`` of the arm's config."""
    cfg = compose_config([*overrides, f"batch_size={batch}", "device=cpu"])
    parts = trainer_parts(cfg, 3, torch.device("cpu"), seed, load_backbone_weights=False)

    def step() -> None:
        parts.step(images, targets)

    return step, cfg.schedule.max_iters, cfg.model.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default=";".join(DEFAULT_ARMS), help="arms separated by ';', each 'KEY=VALUE ...'")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image", default="480,640", help="H,W of the synthetic images before the model's resize")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    add_common_arguments(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = wait_for_quiet(args.max_load, args.wait_for_load) if args.wait_for_load else load_average()
    size = tuple(int(v) for v in args.image.split(","))
    images, targets = make_batch(args.batch, size, args.seed)
    arms, lengths, models = {}, {}, {}
    for arm in args.arms.split(";"):
        arms[arm], lengths[arm], models[arm] = make_arm(arm.split(), args.batch, args.seed, images, targets)
    times = interleaved_times(arms, args.rounds, torch.device("cpu"), warmup=args.warmup)
    first = median(times[next(iter(arms))])
    rows = []
    for arm, ts in times.items():
        low, high = iqr(ts)
        minutes = lengths[arm] * median(ts) / 60
        rows.append([f"`{arm}`", models[arm], fmt_ms(median(ts)), f"{fmt_ms(low)}–{fmt_ms(high)}",
                     f"{median(ts) / first:.2f}", f"{lengths[arm]} × → {minutes:.0f} min"])  # fmt: skip
    lines = [
        f"Batch {args.batch} synthetic images of {size[1]}×{size[0]} px (each model resizes them as its config "
        f"says), {args.rounds} interleaved rounds after {args.warmup} warm-up step(s) per arm; the trainer's "
        "`TrainStep`, the pretrained layout without its weights.",
        "",
        *markdown_table(["arm", "model", "median step (ms)", "IQR (ms)", "× first", "schedule, projected"], rows),
        "",
        *provenance_lines(torch.device("cpu"), load_before, load_average()),
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section("scale_step", "10. Training step time per scale preset (`scale_step.py`)", lines, "scale_step.py")
    write_numbers(args.json, torch.device("cpu"), {"median_s": {arm: median(ts) for arm, ts in times.items()}})


if __name__ == "__main__":
    main()
