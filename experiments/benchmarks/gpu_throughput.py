"""R50-FPN training throughput on a GPU: AMP bf16 vs fp32, channels_last on / off, and data loading overlapped.

Arms, interleaved in one process (the start arm rotated every round), each its own model, SGD optimizer and
``TrainStep``, built as the trainer builds them (``fl_rpn.engine.build.build_trainable`` on
``compose_config(["model=r50_fpn", "rpn=...", "batch_size=...", "amp=...", "channels_last=...", "compile=..."])``,
the same seed; the optimizer's lr is the base one, after warm-up):

- arms on a fixed synthetic batch already on the device (``--batch`` images at ``--size``; no I/O), by default
  bf16 / fp32 x channels_last on / off (``--arms``; ``bf16+cl+compile`` adds ``compile=--compile-mode``:
  ``torch.compile`` of the backbone + FPN and RPN head, as in training). What the model alone consumes.
- ``loader``: the ``--loader-amp`` / ``--loader-channels-last`` setting fed by real data: the project's
  dataset (``fl_rpn.data.build_dataset``: file read, PNG / JPEG decode, training transforms) batched by the
  trainer's ``TrainStream`` (``--workers`` worker processes, pinned memory on CUDA; built here rather than by
  ``build_run``, which would also need the dataset's val split and give the model the dataset's classes instead of
  ``--num-classes``, the fixed-batch arms'), images and targets copied with
  ``non_blocking=True``. ``--data synthetic`` (default) generates the project's synthetic set with images of
  ``--data-size`` (default: ``--size`` scaled to a 640-px long side, COCO-like, so the model resizes every
  image to ``--size`` and the arm computes on the same shapes as the fixed-batch arms); ``--data coco128``
  reads COCO128 (COCO json) from ``--data-root`` (image shapes then vary from batch to batch).
  Each sample starts a fresh stream (``TrainStream.from_iteration``) at the next unseen iteration and shuts its
  workers down at the end, so no batch is prefetched while the other arms run: the sample time includes worker
  start-up and the first batch (reported apart), which training pays once per stream. Also reported: the time
  the main process waited for batches after the first one; near zero means the loader keeps up with the model.

Each step is the trainer's own ``TrainStep``: autocast forward, loss sum, finiteness check, zero_grad, backward, SGD
step.
Reported per arm: median images/s over ``--rounds`` samples, against torchvision's reference recipe
(~9 images/s per V100) and the target of >= 40 images/s on one H100; peak CUDA memory over one sample.

Needs CUDA. Without a GPU it records "not measured" in RESULTS.md (unless the section already holds a
measurement, which it leaves alone) and exits. ``--device cpu`` runs the same code on the CPU for checking
the script only (e.g. ``--device cpu --model tiny_fpn --size 128,160 --batch 2 --steps 1 --rounds 1
--warmup 0 --workers 1 --data-images 8 --no-write``); it never writes RESULTS.md.

    python experiments/benchmarks/gpu_throughput.py                          # batch 8, 800x1333, cuda
    python experiments/benchmarks/gpu_throughput.py --data coco128 --data-root /path/with/coco128
    python experiments/benchmarks/gpu_throughput.py --rpn sampled --batch 4
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from _common import (
    add_common_arguments,
    command_line,
    file_digest,
    fmt_bytes,
    interleaved_times,
    load_average,
    markdown_table,
    median,
    peak_memory_bytes,
    provenance_lines,
    read_section,
    shut_down,
    synchronize,
    trainer_parts,
    wait_for_quiet,
    write_numbers,
    write_section,
)
from train_step import make_batch

from fl_rpn.config import compose_config
from fl_rpn.data import build_dataset
from fl_rpn.engine.step import TrainStep
from fl_rpn.engine.stream import TrainStream

TITLE = "5. GPU throughput, R50-FPN (`gpu_throughput.py`)"
REFERENCE_V100 = 9.0  # images/s per V100, torchvision's detection reference recipe (R50-FPN, 26 epochs)
TARGET_H100 = 40.0  # images/s on one H100, this project's target
NOT_MEASURED = "**Not measured"
DEFAULTS = {"model": "r50_fpn", "rpn": "focal_softmax", "batch": 8, "size": "800,1333"}


ARMS = ("bf16", "bf16+cl", "fp32", "fp32+cl", "bf16+cl+compile")  # --arms keys; cl = channels_last


def parse_arm(key: str) -> tuple[str, bool, bool]:
    """``"bf16+cl+compile"`` -> ``("bf16", True, True)``: amp, channels_last, torch.compile (``--compile-mode``)."""
    if key not in ARMS:
        raise SystemExit(f"--arms: unknown arm {key!r}; choose from {', '.join(ARMS)}")
    return key.split("+")[0], "+cl" in key, key.endswith("+compile")


def arm_name(amp: str, channels_last: bool, compiled: str | None = None) -> str:
    return f"{amp}, channels_last {'on' if channels_last else 'off'}" + (f", compile {compiled}" if compiled else "")


def build_arm(args, amp: str, channels_last: bool, size: tuple[int, int], device: torch.device, compiled=None):
    """The arm's ``TrainStep`` (its model and SGD optimizer), as the trainer builds it."""
    h, w = size
    overrides = [f"model={args.model}", f"rpn={args.rpn}", f"batch_size={args.batch}"]
    overrides += [f"model.detector.min_size={min(h, w)}", f"model.detector.max_size={max(h, w)}"]
    overrides += [f"amp={'bf16' if amp == 'bf16' else 'null'}", f"channels_last={str(channels_last).lower()}",
                  f"compile={compiled or 'null'}"]  # fmt: skip
    return trainer_parts(compose_config(overrides), args.num_classes, device, args.seed).step


def load_dataset(args, size: tuple[int, int]):
    """The training split ``--data`` names, through the project's dataset builder (training transforms)."""
    if args.data == "coco128":
        root = Path(args.data_root).expanduser()
        if not (root / "coco128").is_dir():
            raise SystemExit(f"--data coco128: no coco128/ under {root}; set --data-root or FL_RPN_DATA")
        cfg = compose_config(["dataset=coco128", f"data_root={root}"])
    else:
        if args.data_size:
            dh, dw = (int(s) for s in args.data_size.split(","))
        else:  # the --size aspect at a 640-px long side
            scale = 640 / max(size)
            dh, dw = round(size[0] * scale), round(size[1] * scale)
        node = "dataset.train"
        cfg = compose_config(
            ["dataset=synthetic", f"{node}.num_images={args.data_images}", f"{node}.image_size=[{dh},{dw}]"]
        )
    return build_dataset(cfg.dataset.train, train=True, hflip_prob=cfg.hflip_prob), cfg


def loader_arm(stream: TrainStream, train_step: TrainStep, steps: int, device: torch.device, record: dict):
    """One sample: a fresh DataLoader from the next unseen iteration, ``steps`` training steps on its batches."""
    position = [0]

    def run() -> None:
        batches = stream.from_iteration(position[0])
        position[0] += steps
        waits = []
        try:
            for _ in range(steps):
                t0 = time.perf_counter()
                images, targets = next(batches)
                images = [im.to(device, non_blocking=im.is_pinned()) for im in images]
                targets = [{k: v.to(device, non_blocking=v.is_pinned()) if torch.is_tensor(v) else v
                            for k, v in t.items()} for t in targets]  # fmt: skip
                waits.append(time.perf_counter() - t0)
                train_step(images, targets)
        finally:
            shut_down(batches)  # nothing is prefetched while the other arms run
        synchronize(device)
        record["first"].append(waits[0])
        record["wait"].append(sum(waits[1:]) / max(steps - 1, 1))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default=DEFAULTS["model"], help="r50_fpn (the question) | mbv3_fpn | tiny_fpn")
    parser.add_argument("--rpn", default=DEFAULTS["rpn"], help="sampled | focal_sigmoid | focal_softmax")
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    parser.add_argument("--size", default=DEFAULTS["size"], help="H,W of the synthetic images (the model's resize)")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed sample of the fixed-batch arms")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved samples per arm")
    parser.add_argument("--warmup", type=int, default=2, help="untimed samples per arm first (cudnn autotune)")
    parser.add_argument("--data", choices=["synthetic", "coco128", "none"], default="synthetic",
                        help="data of the loader arm; none: no loader arm")  # fmt: skip
    parser.add_argument("--data-root", default=os.environ.get("FL_RPN_DATA", "data"),
                        help="folder holding coco128/ (--data coco128; default: $FL_RPN_DATA, else data/)")  # fmt: skip
    parser.add_argument("--data-images", type=int, default=256, help="images of the synthetic set")
    parser.add_argument("--data-size", help="H,W of the synthetic images (default: --size at a 640-px long side)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader worker processes of the loader arm")
    parser.add_argument("--loader-steps", type=int, default=30, help="steps per timed sample of the loader arm")
    parser.add_argument("--loader-amp", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--loader-channels-last", choices=["on", "off"], default="on")
    parser.add_argument(
        "--arms",
        default="bf16,bf16+cl,fp32,fp32+cl",
        help=f"fixed-batch arms, comma-separated, of {', '.join(ARMS)} (cl: channels_last)",
    )
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the +compile arm")
    add_common_arguments(parser)
    args = parser.parse_args()
    arms = [parse_arm(key.strip()) for key in args.arms.split(",")]  # (amp, channels_last, compiled)
    if args.data != "none" and (args.loader_amp, args.loader_channels_last == "on", False) not in arms:
        twin = args.loader_amp + ("+cl" if args.loader_channels_last == "on" else "")
        parser.error(f"--arms {args.arms} lacks {twin}, the fixed-batch arm the loader arm (--loader-amp "
                     f"{args.loader_amp}, --loader-channels-last {args.loader_channels_last}) is compared with; "
                     "add it, change the loader arm's settings, or pass --data none")  # fmt: skip

    variant = [f"{k}_{getattr(args, k)}".replace(",", "x") for k in DEFAULTS if getattr(args, k) != DEFAULTS[k]]
    section = "_".join(["gpu_throughput", *variant])
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("not measured: no GPU available in this environment")
        existing = read_section(section)
        if existing is not None and NOT_MEASURED not in existing:
            print(f"RESULTS.md [{section}] holds a measurement; left alone")
        elif not args.no_write:
            write_section(section, TITLE, [
                f"- command: `{command_line()}` (batch {args.batch}, {args.size}, rpn {args.rpn}; arms bf16 / fp32 x "
                "channels_last on / off, and the loader-fed arm)",
                "",
                f"{NOT_MEASURED}: no GPU available in this environment.** Run the command above on a CUDA machine; "
                "it fills this section with images/s and peak memory per arm.",
            ])  # fmt: skip
        return
    if device.type != "cuda" and not args.no_write:
        print("--device cpu checks the script only; RESULTS.md is left alone")
        args.no_write = True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    size = tuple(int(s) for s in args.size.split(","))
    load_before = wait_for_quiet(args.max_load, args.wait_for_load) if args.wait_for_load else load_average()
    print(f"load average: {load_before}; torch threads {torch.get_num_threads()}", flush=True)
    images, targets = make_batch(args.batch, size, args.num_classes, device, args.seed)

    samples, images_per_sample = {}, {}
    for amp, channels_last, compiled in arms:
        compiled = args.compile_mode if compiled else None
        train_step = build_arm(args, amp, channels_last, size, device, compiled)

        def sample(train_step=train_step) -> None:
            for _ in range(args.steps):
                train_step(images, targets)

        name = arm_name(amp, channels_last, compiled)
        samples[name], images_per_sample[name] = sample, args.batch * args.steps

    loader = None
    if args.data != "none":
        dataset, data_cfg = load_dataset(args, size)
        if dataset.meta.num_classes > args.num_classes:
            parser.error(f"--num-classes {args.num_classes} < the dataset's {dataset.meta.num_classes} classes")
        stream = TrainStream(
            dataset, args.batch, args.workers, args.seed, data_cfg.group_aspect_ratio, pin_memory=device.type == "cuda"
        )
        train_step = build_arm(args, args.loader_amp, args.loader_channels_last == "on", size, device)
        record = {"first": [], "wait": []}
        same = arm_name(args.loader_amp, args.loader_channels_last == "on")
        loader = f"{same}, loader ({args.workers} workers)"
        samples[loader] = loader_arm(stream, train_step, args.loader_steps, device, record)
        images_per_sample[loader] = args.batch * args.loader_steps

    times = interleaved_times(samples, args.rounds, device, warmup=args.warmup)
    if loader:  # warm-up samples are not part of the medians
        record = {k: v[args.warmup :] for k, v in record.items()}
    mem = {name: peak_memory_bytes(fn, device) for name, fn in samples.items()}
    load_after = load_average()

    rate = {name: images_per_sample[name] / median(times[name]) for name in samples}
    base = arm_name("fp32", False) if arm_name("fp32", False) in rate else next(iter(rate))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = []
    for name in samples:
        target = "met" if rate[name] >= TARGET_H100 else "missed"
        rows.append([
            name, f"{rate[name]:.1f}", f"{rate[name] / rate[base]:.2f}", f"{rate[name] / REFERENCE_V100:.1f}",
            f"{rate[name] / TARGET_H100:.2f} ({target})", fmt_bytes(mem[name]),
        ])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)

    lines = provenance_lines(device, load_before, load_after)
    lines += [
        f"- `{args.model}` (random init), rpn `{args.rpn}`, batch {args.batch}, {args.num_classes} classes; "
        f"fixed-batch arms: synthetic tensors at {size[0]}x{size[1]} already on the device, {args.steps} steps "
        f"per sample; {args.rounds} interleaved samples per arm after {args.warmup} warm-up samples; "
        + (
            "cudnn.benchmark on; TF32: cuDNN convolutions "
            f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'}, float32 matmul precision "
            f"`{torch.get_float32_matmul_precision()}` (torch's defaults: on, `highest`); peak memory = "
            "torch.cuda.max_memory_allocated over one sample"
            if device.type == "cuda"
            else "peak memory = peak tensor bytes over one sample (torch.profiler profile_memory)"
        ),
        f"- targets: torchvision's reference recipe ~{REFERENCE_V100:g} images/s per V100; this project's "
        f">= {TARGET_H100:g} images/s on one H100 (this run: {gpu})",
    ]
    if loader:
        first, wait = median(record["first"]), median(record["wait"])
        step_ms = 1e3 * median(times[same]) / args.steps
        shapes = "one shape" if len({(r.height, r.width) for r in dataset.records}) == 1 else "shapes vary by batch"
        shapes += " (cudnn autotunes each new one)" if shapes != "one shape" and device.type == "cuda" else ""
        digest = ""
        if args.data == "coco128":
            digest = f"; annotations sha256 {file_digest(data_cfg.dataset.train.annotations)}…"
        lines += [
            f"- loader arm: {len(dataset)} images of `{args.data}` ({_describe(dataset)}; {shapes}{digest}) through "
            f"`build_dataset` (decode + training transforms) and the trainer's `TrainStream` (aspect-ratio groups, "
            f"{args.workers} workers, pin_memory {'on' if device.type == 'cuda' else 'off (no CUDA)'}), "
            f"`non_blocking` copies; {args.loader_steps} steps per sample on a fresh stream. Median over samples: "
            f"first batch (worker start-up + first decode) {first * 1e3:.0f} ms; afterwards the main process "
            f"waited {wait * 1e3:.1f} ms per step for data, against {step_ms:.1f} ms per step of `{same}` "
            f"on the fixed batch; loader-fed / fixed-batch images/s = {rate[loader] / rate[same]:.2f}",
        ]
    write_numbers(args.json, device, {
        "model": args.model, "batch": args.batch, "size": list(size), "data": args.data,
        "images_per_second": rate, "peak_memory_bytes": mem, "base": base,
        "loader_wait_ms": median(record["wait"]) * 1e3 if loader else None,
    })  # fmt: skip
    header = ["arm", "images / s (median)", f"speed-up vs {base}", f"× reference ({REFERENCE_V100:g} / s per V100)",
              f"vs target ({TARGET_H100:g} / s, one H100)", "peak memory"]  # fmt: skip
    lines += ["", *markdown_table(header, rows)]
    print("\n".join(lines))
    if not args.no_write:
        write_section(section, TITLE, lines, script="gpu_throughput.py")


def _describe(dataset) -> str:
    sizes = sorted({(r.height, r.width) for r in dataset.records})
    if len(sizes) == 1:
        return f"{sizes[0][0]}x{sizes[0][1]}"
    heights, widths = [s[0] for s in sizes], [s[1] for s in sizes]
    return f"{len(sizes)} sizes, H {min(heights)}–{max(heights)}, W {min(widths)}–{max(widths)}"


if __name__ == "__main__":
    main()
