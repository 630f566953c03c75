"""Whole training step, sampled RPN vs FL-RPN (sigmoid, softmax): time and peak memory, interleaved.

Each arm is built as the trainer builds it, by ``fl_rpn.engine.build.build_trainable`` on
``fl_rpn.config.compose_config`` with the arm's overrides (``model=``, ``rpn=``, ``batch_size=``, the image size,
``amp=``, ``channels_last=``), all arms from the same seed; one step is its ``TrainStep``: forward in train mode
under autocast (losses), sum, the finiteness check, ``zero_grad``, ``backward`` (through the trainer's GradScaler,
enabled for fp16 only), SGD ``step`` (no clipping, the config's default), with the sampled RPN's anchor diagnostics
attached as the trainer attaches them. The optimizer's lr is the base one (after warm-up; no schedule is stepped).
The batch is a fixed set of synthetic tensors (no disk I/O): images uniform in [0, 1], 1-6 boxes per image of
8-50 % of the image side.

Where it deliberately differs from the trainer, on top of what ``build_trainable`` returns: ``--no-diagnostics``
takes the diagnostics off the sampled RPN again (its own sampler back, the head's forward hook removed);
``--same-state`` loads the sampled model's weights into every arm and sets the lr to 0.

    python experiments/benchmarks/train_step.py                                  # tiny_fpn, CPU demo scale
    python experiments/benchmarks/train_step.py --model r50_fpn --size 800,1333 --batch 2 --device cuda
    python experiments/benchmarks/train_step.py --profile                        # + torch.profiler tables

Peak memory: CUDA ``max_memory_allocated`` above the memory held before the step; CPU: peak of the
tensor bytes allocated (and not yet freed) during one step, from ``torch.profiler(profile_memory=True)``.
"""

from __future__ import annotations

import argparse

import torch
from _common import (
    add_common_arguments,
    fmt_bytes,
    interleaved_times,
    iqr,
    load_average,
    markdown_table,
    median,
    peak_memory_bytes,
    provenance_lines,
    select_device,
    synchronize,
    trainer_parts,
    wait_for_quiet,
    write_numbers,
    write_section,
)

from fl_rpn.config import compose_config
from fl_rpn.engine.build import Trainable
from fl_rpn.modeling.diagnostics import detach_anchor_diagnostics

ARMS = ("sampled", "focal_sigmoid", "focal_softmax")


def make_batch(batch: int, size: tuple[int, int], num_classes: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, h, w, generator=g).to(device))
        n = int(torch.randint(1, 7, (1,), generator=g))
        side = torch.empty(n, 2).uniform_(0.08, 0.5, generator=g) * torch.tensor([w, h])
        x0 = torch.rand(n, generator=g) * (w - side[:, 0])
        y0 = torch.rand(n, generator=g) * (h - side[:, 1])
        boxes = torch.stack([x0, y0, x0 + side[:, 0], y0 + side[:, 1]], dim=1)
        labels = torch.randint(1, num_classes + 1, (n,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def same_state_as(model, sampled_state: dict[str, torch.Tensor]) -> None:
    """Give ``model`` the weights of the sampled-RPN model; a two-logit objectness layer gets background
    logits 0 and object logits the sampled layer's, so ``z_object - z_background`` is the same logit."""
    state = dict(sampled_state)
    own = model.state_dict()
    for key in ("rpn.head.cls_logits.weight", "rpn.head.cls_logits.bias"):
        if own[key].shape[0] == 2 * state[key].shape[0]:
            two = torch.zeros_like(own[key])
            two[1::2] = state[key]
            state[key] = two
    model.load_state_dict(state)


def make_arm(arm: str, args, num_classes: int, device: torch.device) -> Trainable:
    """The arm's model, optimizer and ``TrainStep``, built as the trainer builds them, then ``--same-state`` and
    ``--no-diagnostics`` on top."""
    speed = [f"amp={args.amp or 'null'}", f"channels_last={str(args.channels_last).lower()}"]
    parts = trainer_parts(compose_config(arm_overrides(arm, args) + speed), num_classes, device, args.seed)
    if args.same_state:
        sampled = trainer_parts(compose_config(arm_overrides("sampled", args)), num_classes, device, args.seed)
        same_state_as(parts.model, sampled.model.state_dict())
        for group in parts.optimizer.param_groups:  # the full backward still runs; the weights, hence proposals
            group["lr"] = 0.0  # and RoIs, stay the same
    if args.no_diagnostics:
        detach_anchor_diagnostics(parts.model.rpn)
    return parts


def arm_overrides(arm: str, args) -> list[str]:
    """``arm``: an rpn preset, or ``preset/head`` with an ``rpn.head.kind`` (``focal_softmax/decoupled``)."""
    rpn, _, head = arm.partition("/")
    overrides = [f"model={args.model}", f"rpn={rpn}", f"batch_size={args.batch}"]
    if head:
        overrides.append(f"rpn.head.kind={head}")
    if args.size:
        overrides += [f"model.detector.min_size={args.size[0]}", f"model.detector.max_size={args.size[1]}"]
    return overrides


def profile_table(step, device: torch.device, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_fpn", help="tiny_fpn | mbv3_fpn | r50_fpn (conf/model)")
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--size", default="256,320", help="H,W of the images (also min_size,max_size); '' keeps "
                        "the model config's resize")  # fmt: skip
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--arms", default=",".join(ARMS), help="rpn presets, each optionally /HEAD (rpn.head.kind), "
                        "e.g. sampled,sampled/decoupled")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per arm (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per arm first")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--amp", choices=["bf16", "fp16"], help="autocast dtype (fp16: CUDA only)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-diagnostics", action="store_true", help="do not attach the sampled RPN's diagnostics")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per arm")
    parser.add_argument("--same-state", action="store_true", help="every arm has the sampled model's weights "
                        "(softmax: background logit 0) and lr 0, so all see the same proposals and RoIs at every "
                        "step: what remains is the cost of the RPN loss itself")  # fmt: skip
    add_common_arguments(parser)
    args = parser.parse_args()
    args.size = tuple(int(s) for s in args.size.split(",")) if args.size else None

    device = select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.amp == "fp16" and device.type != "cuda":
        parser.error("--amp fp16 needs CUDA (the trainer's GradScaler); use bf16 here")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    load_before = wait_for_quiet(args.max_load, args.wait_for_load) if args.wait_for_load else load_average()
    print(f"load average: {load_before}; torch threads {torch.get_num_threads()}", flush=True)

    h, w = args.size or (800, 1333)
    images, targets = make_batch(args.batch, (h, w), args.num_classes, device, args.seed)
    steps, anchors = {}, {}
    for arm in arms:
        parts = make_arm(arm, args, args.num_classes, device)
        model = parts.model
        steps[arm] = lambda step=parts.step: step(images, targets)
        # anchors per step: what the RPN loss sees
        with torch.no_grad():
            image_list, _ = model.transform(images, None)
            feats = list(model.backbone(image_list.tensors).values())
            anchors[arm] = sum(a.shape[0] for a in model.rpn.anchor_generator(image_list, feats))
    times = interleaved_times(steps, args.rounds, device, warmup=args.warmup)
    mem = {arm: peak_memory_bytes(steps[arm], device) for arm in arms}
    load_after = load_average()

    base = arms[0]
    rows = []
    for arm in arms:
        t = median(times[arm])
        lo, hi = iqr(times[arm])
        rows.append([
            arm, f"{t * 1e3:.1f}", f"{lo * 1e3:.1f}–{hi * 1e3:.1f}", f"{args.batch / t:.2f}",
            f"{t / median(times[base]):.3f}", fmt_bytes(mem[arm]), f"{mem[arm] / mem[base]:.3f}", f"{anchors[arm]:,}",
        ])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)

    # paired ratios: round r of arm X against round r of the baseline (same moment, same load)
    paired = {}
    for arm in arms[1:]:
        ratios = [a / b for a, b in zip(times[arm], times[base])]
        paired[arm] = (median(ratios), *iqr(ratios))

    header = ["arm", "median ms / step", "IQR ms", "images / s", f"time / {base}", "peak step memory",
              f"memory / {base}", "anchors / step"]  # fmt: skip
    lines = provenance_lines(device, load_before, load_after)
    lines += [
        f"- model `{args.model}`, batch {args.batch} at {h}x{w}, {args.num_classes} classes, fixed synthetic "
        f"tensors; amp {args.amp or 'off'}, channels_last {'on' if args.channels_last else 'off'}, "
        f"sampled-RPN diagnostics {'off' if args.no_diagnostics else 'on (as the trainer)'}; "
        + (
            "every arm with the sampled model's weights and lr 0 (the same proposals and RoIs in every step); "
            if args.same_state
            else ""
        )
        + f"{args.rounds} interleaved steps per arm after {args.warmup} warm-up steps; memory = peak tensor bytes "
        "during one step above those held before it "
        + ("(torch.cuda.max_memory_allocated)" if device.type == "cuda" else "(torch.profiler profile_memory)"),
        "",
        *markdown_table(header, rows),
        "",
        f"Per-round paired time ratios (each step against the {base} step of the same round), median "
        "[interquartile range]: "
        + ", ".join(f"{arm} {r:.3f} [{lo:.3f}–{hi:.3f}]" for arm, (r, lo, hi) in paired.items()),
    ]
    write_numbers(args.json, device, {
        "model": args.model, "batch": args.batch, "size": [h, w], "amp": args.amp,
        "median_ms": {arm: median(times[arm]) * 1e3 for arm in arms}, "peak_memory_bytes": mem,
        "time_ratio_paired": {arm: r for arm, (r, _, _) in paired.items()},
        "memory_ratio": {arm: mem[arm] / mem[base] for arm in arms}, "base": base,
    })  # fmt: skip
    if args.profile:
        for arm in arms:
            print(f"\n=== {arm}: 3 steps ===\n" + profile_table(steps[arm], device, 25))
    if not args.no_write:
        # one section per setting, so that e.g. an amp or a CUDA run does not replace the CPU demo's numbers
        variant = {
            args.model: not (args.model == "tiny_fpn" and device.type == "cpu"),
            device.type: device.type != "cpu",
            str(args.amp): bool(args.amp),
            "channels_last": args.channels_last,
            "nodiag": args.no_diagnostics,
            "same_state": args.same_state,
            "heads": any("/" in arm for arm in arms),
            f"threads{args.threads}": bool(args.threads),
        }
        name = "_".join(["train_step", *(k for k, on in variant.items() if on)])
        title = f"2. Whole training step, `{args.model}` on {device.type.upper()} (`train_step.py`)"
        title += "".join(
            f", {text}"
            for text, on in ((f"amp {args.amp}", args.amp), ("channels_last", args.channels_last),
                             ("without diagnostics", args.no_diagnostics),
                             ("same weights and proposals in every arm", args.same_state),
                             ("RPN heads compared", any("/" in arm for arm in arms)),
                             (f"{args.threads} torch thread(s)", args.threads))
            if on
        )  # fmt: skip
        write_section(name, title, lines, script="train_step.py")


if __name__ == "__main__":
    main()
