"""Training data pipeline on COCO128: loader images/s with 0 / 1 / 2 workers, against what the model consumes.

The dataset is ``fl_rpn.data.build_dataset`` on the coco128 train node
(``compose_config(["dataset=coco128", "data_root=..."]).dataset.train``) with the training transforms
(decode, random flip, to float, sanitize), batched by the trainer's own ``fl_rpn.engine.stream.TrainStream``
(aspect-ratio grouping); each loader sample starts a fresh ``from_iteration(0)`` and shuts its workers down at
the end, so it pays the workers' start-up once (the time to the first batch, reported apart).

Arms, interleaved per round: the loader with each worker count (``--epochs`` epochs each, images/s over
all of them, time to the first batch reported apart), and a ``--model`` (default ``tiny_fpn``) training
step (forward, backward, SGD) on a batch of real COCO128 images already in memory: the rate the model
consumes. Its model and optimizer are the trainer's (``fl_rpn.engine.build.build_trainable``, lr after
warm-up), stepped by a plain loop, not by the trainer's ``TrainStep``, as in the earlier measurements. On a
CPU, R50-FPN is estimated (``--model r50_fpn --device cuda`` measures it on a GPU): its FLOPs per training
image (``torch.utils.flop_counter``, forward + backward, at its 800x1333 resize) against tiny_fpn's, and for
a GPU the number of loader workers a given GPU rate needs.

    FL_RPN_DATA=/path/with/coco128 python experiments/benchmarks/data_pipeline.py
    python experiments/benchmarks/data_pipeline.py --data-root /path/with/coco128 --workers 0,2,4
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from _common import (
    add_common_arguments,
    file_digest,
    interleaved_times,
    load_average,
    markdown_table,
    median,
    provenance_lines,
    select_device,
    shut_down,
    synchronize,
    trainer_parts,
    wait_for_quiet,
    write_section,
)
from torchvision.io import ImageReadMode, decode_image

from fl_rpn import build_model
from fl_rpn.config import compose_config
from fl_rpn.data import build_dataset
from fl_rpn.engine.stream import TrainStream


def loader_arm(dataset, batch: int, workers: int, epochs: int, seed: int, first_batch: list[float]):
    def run() -> None:
        stream = TrainStream(dataset, batch, workers, seed, group_aspect_ratio=True)
        batches = stream.from_iteration(0)
        try:
            t0 = time.perf_counter()
            next(batches)
            first_batch.append(time.perf_counter() - t0)
            for _ in range(round(epochs * stream.steps_per_pass) - 1):
                next(batches)
        finally:
            shut_down(batches)

    return run


def model_arm(dataset, batch: int, rpn: str, seed: int, steps: int, model_name: str, device: torch.device):
    cfg = compose_config([f"model={model_name}", f"rpn={rpn}", f"batch_size={batch}"])
    parts = trainer_parts(cfg, dataset.meta.num_classes, device, seed)
    model, optimizer = parts.model, parts.optimizer
    # a fixed batch of real images (the first ones with boxes), decoded once
    samples = [dataset[i] for i in range(len(dataset))]
    samples = [s for s in samples if len(s[1]["boxes"])][:batch]
    images = [s[0] for s in samples]
    targets = [{"boxes": s[1]["boxes"], "labels": s[1]["labels"]} for s in samples]
    images_dev = [im.to(device) for im in images]
    targets_dev = [{k: v.to(device) for k, v in t.items()} for t in targets]

    def run() -> None:
        for _ in range(steps):
            loss = sum(model(images_dev, targets_dev).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        synchronize(device)

    return run, images, targets


def train_flops_per_image(model_name: str, num_classes: int, image: torch.Tensor, target: dict) -> int:
    """FLOPs of one training forward + backward on one image (the model resizes it as it would)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(compose_config([f"model={model_name}"]), num_classes=num_classes).train()
    with FlopCounterMode(display=False) as counter:
        sum(model([image], [target]).values()).backward()
    return counter.get_total_flops()


def per_image_breakdown(dataset, n: int) -> tuple[float, float]:
    """Mean ms per image in the main process: file read + JPEG decode, and the whole ``dataset[i]``."""
    idx = list(range(min(n, len(dataset))))
    t0 = time.perf_counter()
    for i in idx:
        decode_image(str(dataset.records[i].file), mode=ImageReadMode.RGB)
    decode = (time.perf_counter() - t0) / len(idx)
    t0 = time.perf_counter()
    for i in idx:
        dataset[i]
    item = (time.perf_counter() - t0) / len(idx)
    return decode * 1e3, item * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=os.environ.get("FL_RPN_DATA", "data"),
                        help="folder holding coco128/ (default: $FL_RPN_DATA, else data/)")  # fmt: skip
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1, help="epochs of 128 images per loader sample")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved samples per arm (median reported)")
    parser.add_argument("--model-steps", type=int, default=4, help="training steps per model sample")
    parser.add_argument("--rpn", default="focal_softmax", help="rpn config of the model arm")
    parser.add_argument("--model", default="tiny_fpn", help="model of the model arm (r50_fpn: --device cuda)")
    parser.add_argument("--device", default="cpu", help="where the model arm trains: cpu | cuda | cuda:N")
    parser.add_argument("--no-r50-estimate", action="store_true", help="skip the R50-FPN FLOP count (~1 min)")
    parser.add_argument("--gpu-rates", default="25,50,100", help="GPU images/s to size the worker pool for")
    add_common_arguments(parser)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.data_root).expanduser()
    if not (root / "coco128").is_dir():
        parser.error(f"no coco128/ under {root}; set --data-root or FL_RPN_DATA")
    cfg = compose_config(["dataset=coco128", f"data_root={root}"])
    dataset = build_dataset(cfg.dataset.train, train=True, hflip_prob=cfg.hflip_prob)
    workers = [int(w) for w in args.workers.split(",")]
    load_before = wait_for_quiet(args.max_load, args.wait_for_load) if args.wait_for_load else load_average()
    print(f"load average: {load_before}; torch threads {torch.get_num_threads()}; {len(dataset)} images", flush=True)

    decode_ms, item_ms = per_image_breakdown(dataset, len(dataset))  # also warms the page cache
    first_batch = {w: [] for w in workers}
    arms = {f"loader, {w} workers": loader_arm(dataset, args.batch, w, args.epochs, args.seed, first_batch[w])
            for w in workers}  # fmt: skip
    device = select_device(args.device)
    model_run, images, targets = model_arm(
        dataset, args.batch, args.rpn, args.seed, args.model_steps, args.model, device
    )
    model_arm_name = f"{args.model} train step"
    arms[model_arm_name] = model_run
    times = interleaved_times(arms, args.rounds, torch.device("cpu"), warmup=0)  # the model arm syncs itself
    load_after = load_average()

    images_per_sample = {name: args.epochs * len(dataset) for name in arms}
    images_per_sample[model_arm_name] = args.model_steps * args.batch
    rate = {name: images_per_sample[name] / median(t) for name, t in times.items()}
    model_rate = rate[model_arm_name]
    rows = []
    for w in workers:
        name = f"loader, {w} workers"
        first_ms = median(first_batch[w]) * 1e3
        rows.append([name, f"{rate[name]:.1f}", f"{first_ms:.0f}", f"{rate[name] / model_rate:.1f}"])
    rows.append([f"{model_arm_name} on {device.type} (images in memory)", f"{model_rate:.1f}", "–", "1.0"])

    lines = provenance_lines(device, load_before, load_after)
    sizes = sorted({tuple(im.shape[1:]) for im in images})
    sides = [side for r in dataset.records for side in (r.height, r.width)]
    lines += [
        f"- data: `$FL_RPN_DATA/coco128` train2017, {len(dataset)} images ({min(sides)}–{max(sides)} px), COCO json "
        f"(sha256 {file_digest(cfg.dataset.train.annotations)}…); "
        f"training transforms (flip p={cfg.hflip_prob}); batch {args.batch}; loader = the trainer's `TrainStream` "
        f"(a fresh stream per sample); {args.epochs} epoch(s) per loader sample, {args.rounds} interleaved rounds",
        f"- main process, per image: read + JPEG decode {decode_ms:.1f} ms, whole `dataset[i]` (decode + "
        f"transforms + target) {item_ms:.1f} ms",
        f"- model arm: `{args.model}` + `{args.rpn}` on {device.type}, batch {args.batch} of real COCO128 images "
        f"{sizes} (resized by the model as configured), {args.model_steps} steps per sample",
        "",
        *markdown_table(["arm", "images / s (median)", "first batch ms", f"× {args.model} consumption"], rows),
    ]
    if not args.no_r50_estimate and args.model == "tiny_fpn":
        num_classes = dataset.meta.num_classes
        one = {"boxes": targets[0]["boxes"], "labels": targets[0]["labels"]}
        tiny_flops = train_flops_per_image("tiny_fpn", num_classes, images[0], one)
        r50_flops = train_flops_per_image("r50_fpn", num_classes, images[0], one)
        r50_cpu = model_rate * tiny_flops / r50_flops
        best_loader = max(rate[f"loader, {w} workers"] for w in workers)
        per_worker = rate[f"loader, {workers[-1]} workers"] / max(workers[-1], 1)
        gpu_rates = [float(r) for r in args.gpu_rates.split(",")]
        lines += [
            "",
            f"R50-FPN by estimate: a training forward + backward costs {r50_flops / 1e9:.0f} GFLOP per image at its "
            f"800x1333 resize vs {tiny_flops / 1e9:.2f} GFLOP for tiny_fpn at 256x320 "
            f"({r50_flops / tiny_flops:.0f}x; `torch.utils.flop_counter`, image {tuple(images[0].shape[1:])}). "
            f"At tiny_fpn's achieved FLOP rate this CPU would train R50-FPN at ~{r50_cpu:.2g} images/s, "
            f"{best_loader / r50_cpu:.0f}x below what the best loader arm delivers. On a GPU the loader is the "
            f"question: at ~{per_worker:.0f} images/s per worker (the {workers[-1]}-worker arm), a GPU training at "
            + ", ".join(f"{r:g} images/s needs ≥ {r / per_worker:.1f} workers" for r in gpu_rates)
            + " (these GPU rates are assumptions to size against, not measurements; see gpu_throughput.py).",
        ]
    for name, r in rate.items():
        print(f"{name}: {r:.1f} images/s", flush=True)
    print("\n".join(lines[-3:]))
    if not args.no_write:
        name, title = "data_pipeline", "3. Data pipeline on COCO128 (`data_pipeline.py`)"
        if args.threads:
            name, title = (
                f"{name}_threads{args.threads}",
                f"{title}, {args.threads} torch thread(s) in the main process",
            )
        write_section(name, title, lines, script="data_pipeline.py")


if __name__ == "__main__":
    main()
