"""What the trainer adds to a bare training loop over the same model, optimizer, lr schedule and batches, interleaved.

Both arms come from one config (``fl_rpn.config.compose_config`` with ``--model``, ``--batch``, ``--size``,
``--device``, ``--seed`` and any further ``KEY=VALUE`` overrides; by default the synthetic set and the CPU demo's
schedule):

- ``trainer``: ``fl_rpn.engine.build.build_run`` on that config, every hook's ``before_train``, then per batch what
  ``fl_rpn.engine.trainer.run`` does once the batch is on the device: the run's ``TrainStep`` (autocast, the
  ``EventStorage`` of the RPN's statistics, the finiteness check, zero_grad, backward through the scaler, clipping
  when configured, SGD step), ``scheduler.step()``, ``state.advance`` and every hook's ``after_step``: pre-emption,
  stability (off by default), the metrics logger (window means, ``train.log``, TensorBoard and progress bar every
  ``schedule.log_every``), evaluation every ``schedule.eval_every`` (0 by default: only at the end, never reached
  here) and ``last.pt`` every ``schedule.checkpoint_every``, into a temporary run directory.
- ``bare``: ``fl_rpn.engine.build.build_trainable`` on the same config (model with its speed options, optimizer,
  lr schedule), given the trainer arm's initial weights, stepped by ``losses = model(images, targets); loss =
  sum(losses.values()); optimizer.zero_grad(); loss.backward(); optimizer.step(); scheduler.step()`` (under
  autocast when ``amp=bf16``).

Not ``run(state)`` itself: a whole run also starts its data loader and evaluates and checkpoints at its end, which
a bare loop over batches in memory does not do, and one run cannot be interleaved with another. Both arms go over
the same ``--iters`` batches, drawn once from the run's own ``TrainStream`` (training transforms) and held on the
device, so neither loading nor the copy to the device is timed. One sample is one pass over them; the arms
alternate, the start arm rotated every round, for ``--rounds`` rounds after ``--warmup`` untimed passes each.

Reported per arm: the median and the mean ms per step over the samples, and trainer / bare of the medians (target
<= 1.03) with the per-round paired ratios. The mean counts a sample holding a checkpoint in full; the median shows
the usual iteration.

    python experiments/benchmarks/trainer_overhead.py                          # tiny_fpn, CPU demo scale
    python experiments/benchmarks/trainer_overhead.py --model r50_fpn --size 800,1333 --batch 2 --device cuda
    python experiments/benchmarks/trainer_overhead.py stability.enabled=true stability.probe_every=10
"""

from __future__ import annotations

import argparse
import re
import tempfile

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
    shut_down,
    wait_for_quiet,
    write_numbers,
    write_section,
)

from fl_rpn.config import compose_config
from fl_rpn.engine.build import AMP_DTYPES, build_run, build_trainable
from fl_rpn.engine.trainer import run_iteration

TARGET = 1.03  # trainer / bare, median step time


def on_device(value, device: torch.device):
    return value.to(device) if torch.is_tensor(value) else value


def fixed_batches(state, iters: int) -> list:
    """The run's first ``iters`` batches from its own stream, on its device."""
    stream = state.stream.from_iteration(0)
    try:
        batches = [next(stream) for _ in range(iters)]
    finally:
        shut_down(stream)
    dev = state.device
    return [([on_device(im, dev) for im in images], [{k: on_device(v, dev) for k, v in t.items()} for t in targets])
            for images, targets in batches]  # fmt: skip


def trainer_pass(state, batches):
    """One pass of the trainer's per-iteration work (``fl_rpn.engine.trainer.run`` after the batch is on the device)."""

    def run() -> None:
        for images, targets in batches:
            run_iteration(state, images, targets)

    return run


def bare_pass(parts, batches, device: torch.device, amp_dtype):
    """One pass of the plain loop over the same batches."""
    model, optimizer, scheduler = parts.model, parts.optimizer, parts.scheduler

    def run() -> None:
        for images, targets in batches:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                losses = model(images, targets)
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_fpn", help="tiny_fpn | mbv3_fpn | r50_fpn (conf/model)")
    parser.add_argument("--batch", type=int, default=4, help="images per step (batch_size)")
    parser.add_argument("--size", default="256,320", help="min_size,max_size of the model's resize")
    parser.add_argument("--iters", type=int, default=20, help="batches, i.e. steps per sample")
    parser.add_argument("--rounds", type=int, default=10, help="timed samples per arm")
    parser.add_argument("--warmup", type=int, default=1, help="untimed samples per arm first")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="further config overrides, both arms")
    add_common_arguments(parser)
    args = parser.parse_args()
    h, w = (int(s) for s in args.size.split(","))
    device = select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="trainer_overhead-") as run_dir:
        own = [f"model={args.model}", f"batch_size={args.batch}", f"model.detector.min_size={h}",
               f"model.detector.max_size={w}", f"device={args.device}", f"seed={args.seed}", "num_workers=0",
               f"output_dir={run_dir}"]  # fmt: skip
        cfg = compose_config(own + args.overrides)
        total = (args.warmup + args.rounds) * args.iters
        if total > cfg.schedule.max_iters:
            parser.error(f"(--warmup + --rounds) x --iters = {total} trainer iterations, more than the schedule's "
                         f"{cfg.schedule.max_iters}: pass schedule.max_iters={total} or fewer rounds")  # fmt: skip
        if cfg.amp == "fp16":
            parser.error("amp=fp16: the bare loop has no GradScaler; use amp=bf16 or null")
        load_before = wait_for_quiet(args.max_load, args.wait_for_load) if args.wait_for_load else load_average()
        print(f"load average: {load_before}; torch threads {torch.get_num_threads()}", flush=True)

        state = build_run(cfg)
        batches = fixed_batches(state, args.iters)
        bare = build_trainable(cfg, state.train_set.meta.num_classes, device=state.device)
        bare.model.load_state_dict(state.model.state_dict())
        bare.model.train()
        state.model.train()
        arms = {"bare": bare_pass(bare, batches, state.device, AMP_DTYPES[cfg.amp]),
                "trainer": trainer_pass(state, batches)}  # fmt: skip
        try:
            for hook in state.hooks:
                hook.before_train(state)
            times = interleaved_times(arms, args.rounds, state.device, warmup=args.warmup)
        finally:
            for hook in state.hooks:
                hook.close()
        load_after = load_average()

    per_step = {arm: [t / args.iters for t in ts] for arm, ts in times.items()}
    ratio = median(per_step["trainer"]) / median(per_step["bare"])
    paired = [a / b for a, b in zip(times["trainer"], times["bare"])]
    rows = []
    for arm, ts in per_step.items():
        lo, hi = iqr(ts)
        rows.append([arm, f"{median(ts) * 1e3:.1f}", f"{lo * 1e3:.1f}–{hi * 1e3:.1f}", f"{sum(ts) / len(ts) * 1e3:.1f}",
                     f"{args.batch / median(ts):.2f}", f"{median(ts) / median(per_step['bare']):.3f}"])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
    verdict = "met" if ratio <= TARGET else "missed"
    print(f"trainer / bare: {ratio:.3f} (target <= {TARGET}: {verdict})")

    schedule = cfg.schedule
    header = ["arm", "median ms / step", "IQR ms", "mean ms / step", "images / s", "median / bare"]
    lines = provenance_lines(device, load_before, load_after)
    lines += [
        f"- model `{args.model}`, batch {args.batch}, resize {h},{w}, dataset `{cfg.dataset.name}`; "
        f"{args.iters} fixed batches from the run's stream, on the device, per sample; {args.rounds} interleaved "
        f"samples per arm after {args.warmup} warm-up sample(s); the trainer's hooks: "
        f"{', '.join(type(hook).__name__ for hook in state.hooks)}, logging every {schedule.log_every}, checkpoint "
        f"every {schedule.checkpoint_every} iterations"
        + (f"; overrides `{' '.join(args.overrides)}`" if args.overrides else ""),
        "",
        *markdown_table(header, rows),
        "",
        f"trainer / bare (medians): **{ratio:.3f}** (target <= {TARGET}: {verdict}); per-round paired ratios, median "
        f"[interquartile range]: {median(paired):.3f} [{iqr(paired)[0]:.3f}–{iqr(paired)[1]:.3f}]",
    ]
    write_numbers(args.json, device, {
        "model": args.model, "batch": args.batch, "size": [h, w], "iters": args.iters, "overrides": args.overrides,
        "median_ms_per_step": {arm: median(ts) * 1e3 for arm, ts in per_step.items()},
        "mean_ms_per_step": {arm: sum(ts) / len(ts) * 1e3 for arm, ts in per_step.items()},
        "ratio": ratio, "ratio_paired": median(paired), "target": TARGET,
    })  # fmt: skip
    if not args.no_write:
        variant = {args.model: args.model != "tiny_fpn", device.type: device.type != "cpu",
                   f"threads{args.threads}": bool(args.threads),
                   re.sub(r"\W+", "_", "_".join(args.overrides)).strip("_"): bool(args.overrides)}  # fmt: skip
        name = "_".join(["trainer_overhead", *(k for k, on in variant.items() if on)])
        title = f"8. Trainer overhead over a bare loop, `{args.model}` on {device.type.upper()} (`trainer_overhead.py`)"
        title += f", {args.threads} torch thread(s)" if args.threads else ""
        write_section(name, title, lines, script="trainer_overhead.py")


if __name__ == "__main__":
    main()
