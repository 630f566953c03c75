"""R50-FPN training throughput on a GPU: AMP bf16 vs fp32, channels_last on / off (4 arms, interleaved).

Each arm is its own model (``compose_config(["model=r50_fpn", "rpn=..."])`` + ``fl_rpn.build_model``, same
seed) and SGD optimizer, trained on a fixed synthetic batch (``--batch`` images at ``--size``; no I/O) with
the trainer's step: autocast forward, loss sum, finiteness check, zero_grad, backward, SGD step. Reported:
median images/s over ``--rounds`` samples of ``--steps`` steps each, and peak CUDA memory per step.

Needs CUDA. Without a GPU it records "not measured" in RESULTS.md and exits (``--device cpu`` runs the
same code on the CPU, for checking the script only: minutes per step at 800x1333).

    python experiments/benchmarks/gpu_throughput.py                          # batch 8, 800x1333, cuda
    python experiments/benchmarks/gpu_throughput.py --rpn sampled --batch 4
"""

from __future__ import annotations

import argparse
import itertools

import torch
from _common import (
    fmt_bytes,
    interleaved_times,
    load_average,
    markdown_table,
    median,
    peak_memory_bytes,
    provenance_lines,
    synchronize,
    write_section,
)
from train_step import make_batch, make_step

from fl_rpn import build_model
from fl_rpn.config import compose_config
from fl_rpn.engine.optim import build_optimizer

TITLE = "5. GPU throughput, R50-FPN (`gpu_throughput.py`)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rpn", default="focal_softmax", help="sampled | focal_sigmoid | focal_softmax")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", default="800,1333", help="H,W of the synthetic images (the model's resize)")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed sample")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved samples per arm")
    parser.add_argument("--warmup", type=int, default=2, help="untimed samples per arm first (cudnn autotune)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        lines = [
            f"- command: `python experiments/benchmarks/gpu_throughput.py` (batch {args.batch}, {args.size}, "
            f"rpn {args.rpn}; arms bf16 / fp32 x channels_last on / off)",
            "",
            "**Not measured: no GPU available in this environment.** Run the command above on a CUDA machine; "
            "it fills this section with images/s and peak memory per arm.",
        ]
        print("not measured: no GPU available in this environment")
        if not args.no_write:
            write_section("gpu_throughput", TITLE, lines)
        return
    torch.backends.cudnn.benchmark = True
    h, w = (int(s) for s in args.size.split(","))
    load_before = load_average()
    images, targets = make_batch(args.batch, (h, w), args.num_classes, device, args.seed)

    steps, arms = {}, {}
    for amp, channels_last in itertools.product(("bf16", "fp32"), (False, True)):
        name = f"{amp}, channels_last {'on' if channels_last else 'off'}"
        overrides = ["model=r50_fpn", f"rpn={args.rpn}", f"batch_size={args.batch}"]
        overrides += [f"model.detector.min_size={min(h, w)}", f"model.detector.max_size={max(h, w)}"]
        cfg = compose_config(overrides)
        torch.manual_seed(args.seed)
        model = build_model(cfg, num_classes=args.num_classes).to(device).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg.optim, cfg.rpn.cls_lr_mult, args.batch)
        dtype = torch.bfloat16 if amp == "bf16" else None

        one_step = make_step(model, optimizer, images, targets, device, dtype)

        def step(one_step=one_step) -> None:
            for _ in range(args.steps):
                one_step()

        steps[name] = step
        arms[name] = (amp, channels_last)
    times = interleaved_times(steps, args.rounds, device, warmup=args.warmup)
    mem = {}
    for name, fn in steps.items():
        synchronize(device)
        mem[name] = peak_memory_bytes(fn, device)
    base = "fp32, channels_last off"
    rows = []
    for name in steps:
        ips = args.batch * args.steps / median(times[name])
        rows.append([name, f"{ips:.1f}", f"{median(times[base]) / median(times[name]):.2f}", fmt_bytes(mem[name])])
        print(" | ".join(rows[-1]), flush=True)
    lines = provenance_lines(device, load_before, load_average())
    lines += [
        f"- R50-FPN (random init), rpn `{args.rpn}`, batch {args.batch} at {h}x{w} synthetic, {args.num_classes} "
        f"classes; {args.rounds} interleaved samples of {args.steps} steps per arm after {args.warmup} warm-up "
        "samples; cudnn.benchmark on; peak memory = torch.cuda.max_memory_allocated over one sample",
        "",
        *markdown_table(["arm", "images / s (median)", "speed-up vs fp32", "peak memory"], rows),
    ]
    if not args.no_write:
        write_section("gpu_throughput", TITLE, lines)


if __name__ == "__main__":
    main()
