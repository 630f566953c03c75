"""What the stability and gradient-conflict diagnostics (``stability.enabled``, ``stability.probe_every``) cost per
training step: the trainer's step (``TrainStep``) with no monitor, with the window statistics only
(``probe_every=0``) and with the conflict probe every ``--probe-every`` iterations (the study's 10), interleaved.

One timed sample is a block of ``--log-every`` iterations (one logging window: the probes it holds and the window
statistics at its end), so the per-step times are block means, not medians that would hide the probe iterations.
Each arm is built as the trainer builds it: ``fl_rpn.engine.build.build_trainable`` on ``compose_config`` with the
arm's ``stability.enabled`` / ``stability.probe_every`` overrides, and its ``StabilityMonitor`` picked from the
trainer's own hooks (``fl_rpn.engine.build.build_hooks``), driven through its ``before_train`` / ``after_step`` on a
``TrainState`` of those parts; there is no TensorBoard writer (one ``add_scalar`` per diagnostic per window).
Where it deliberately differs from the trainer: every arm starts from the same weights with lr 0 (set on top of
what ``build_trainable`` returns; no schedule is stepped), so all see the same proposals and RoIs at every step and
what differs is the monitor alone. Batch: ``train_step.py``'s fixed synthetic tensors.

    python experiments/benchmarks/stability_cost.py                          # tiny_fpn, focal_softmax, shared
    python experiments/benchmarks/stability_cost.py --rpn sampled --head decoupled
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import (
    add_common_arguments,
    interleaved_times,
    iqr,
    load_average,
    markdown_table,
    median,
    provenance_lines,
    select_device,
    trainer_parts,
    wait_for_quiet,
    write_numbers,
    write_section,
)
from train_step import make_batch

from fl_rpn.config import compose_config
from fl_rpn.engine.build import build_hooks
from fl_rpn.engine.distributed import SINGLE_PROCESS
from fl_rpn.engine.hooks import Preemption, TrainState
from fl_rpn.engine.stability import StabilityMonitor


def make_block(overrides: list[str], args, images, targets, device, probe_every: int | None):
    """``--log-every`` trainer iterations as a no-argument callable; ``probe_every`` None: no monitor."""
    stability = ["stability.enabled=false"] if probe_every is None else \
        ["stability.enabled=true", f"stability.probe_every={probe_every}"]  # fmt: skip
    cfg = compose_config(overrides + stability)
    parts = trainer_parts(cfg, args.num_classes, device, args.seed)
    for group in parts.optimizer.param_groups:
        group["lr"] = 0.0
    state = TrainState(
        cfg=cfg, model=parts.model, optimizer=parts.optimizer, scheduler=parts.scheduler, scaler=parts.scaler,
        step=parts.step, dist_info=SINGLE_PROCESS, device=device, output_dir=Path("."), train_set=None, val_set=None,
        start_iter=0, iteration=0, max_iters=10**9, log_every=cfg.schedule.log_every, history=[],
    )  # fmt: skip
    monitors = [h for h in build_hooks(cfg, state, Preemption(), {}) if isinstance(h, StabilityMonitor)]
    for monitor in monitors:
        monitor.before_train(state)

    def block() -> None:
        for _ in range(args.log_every):
            state.output = parts.step(images, targets, iteration=state.iteration)
            state.advance(len(images))
            for monitor in monitors:
                monitor.after_step(state)

    return block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_fpn")
    parser.add_argument("--rpn", default="focal_softmax", help="rpn preset (conf/rpn)")
    parser.add_argument("--head", default="shared", help="rpn.head.kind: shared | decoupled | shared_matched")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", default="256,320", help="H,W of the images (also min_size,max_size)")
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--log-every", type=int, default=20, help="iterations per logging window = per sample")
    parser.add_argument("--probe-every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8, help="timed blocks per arm")
    parser.add_argument("--warmup", type=int, default=1, help="untimed blocks per arm first")
    parser.add_argument("--device", default="cpu")
    add_common_arguments(parser)
    args = parser.parse_args()
    h, w = (int(s) for s in args.size.split(","))

    device = select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = wait_for_quiet(args.max_load, args.wait_for_load) if args.wait_for_load else load_average()
    print(f"load average: {load_before}; torch threads {torch.get_num_threads()}", flush=True)
    overrides = [f"model={args.model}", f"rpn={args.rpn}", f"rpn.head.kind={args.head}", f"batch_size={args.batch}",
                 f"model.detector.min_size={h}", f"model.detector.max_size={w}",
                 f"schedule.log_every={args.log_every}"]  # fmt: skip
    images, targets = make_batch(args.batch, (h, w), args.num_classes, device, args.seed)
    arms = {"off": None, "window statistics": 0, f"+ probe every {args.probe_every}": args.probe_every}
    blocks = {name: make_block(overrides, args, images, targets, device, pe) for name, pe in arms.items()}
    times = interleaved_times(blocks, args.rounds, device, warmup=args.warmup)
    load_after = load_average()

    base = "off"
    rows, ratios = [], {}
    for name in arms:
        per_step = [t / args.log_every for t in times[name]]
        paired = [a / b for a, b in zip(times[name], times[base])]
        ratios[name] = (median(paired), *iqr(paired))
        lo, hi = iqr(per_step)
        rows.append([name, f"{median(per_step) * 1e3:.1f}", f"{lo * 1e3:.1f}–{hi * 1e3:.1f}",
                     f"{ratios[name][0]:.3f} [{ratios[name][1]:.3f}–{ratios[name][2]:.3f}]"])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
    header = ["monitor", "median ms / step", "IQR ms", "paired time / off, median [IQR]"]
    lines = provenance_lines(device, load_before, load_after)
    lines += [
        f"- model `{args.model}`, `rpn={args.rpn}`, `rpn.head.kind={args.head}`, batch {args.batch} at {h}x{w}, "
        f"fixed synthetic tensors, lr 0 (the same proposals in every arm); one sample = a block of "
        f"{args.log_every} iterations (one logging window), {args.rounds} interleaved blocks per arm after "
        f"{args.warmup} warm-up block(s)",
        "",
        *markdown_table(header, rows),
    ]
    write_numbers(args.json, device, {
        "model": args.model, "rpn": args.rpn, "head": args.head, "batch": args.batch, "size": [h, w],
        "median_ms_per_step": {n: median(times[n]) / args.log_every * 1e3 for n in arms},
        "time_ratio_paired": {n: r for n, (r, _, _) in ratios.items()},
    })  # fmt: skip
    if not args.no_write:
        name = f"stability_cost_{args.rpn}_{args.head}" + (f"_threads{args.threads}" if args.threads else "")
        title = (f"7. Stability diagnostics' cost, `{args.model}` `{args.rpn}` `{args.head}` head on "
                 f"{device.type.upper()} (`stability_cost.py`)")  # fmt: skip
        write_section(name, title, lines, script="stability_cost.py")


if __name__ == "__main__":
    main()
