"""RPN loss alone, sampled vs focal, against the number of anchors: forward + backward time and peak memory.

Arms (all on the same inputs, interleaved in one process):
  sampled        torchvision's ``RegionProposalNetwork.compute_loss`` with its
                 ``BalancedPositiveNegativeSampler`` (256 anchors per image at 1:1, BCE), untouched.
  sampled+diag   the same, observed by ``fl_rpn.modeling.diagnostics.attach_anchor_diagnostics`` as the trainer
                 does (the logged statistics of the sampled anchors; the logits the head hook would keep in a
                 forward pass are handed to it directly); informative only.
  focal_sigmoid  ``FocalLossRPN(form="sigmoid").compute_loss`` ([R, 1] logits).
  focal_softmax  ``FocalLossRPN(form="softmax").compute_loss`` ([R, 2] logits).
  focal_*-nodiag with ``--nodiag``: the focal arms with ``fl_rpn.modeling.rpn.anchor_statistics`` replaced by a no-op
                 for the call (what the loss costs without the per-step diagnostics it records).
  focal_*@REV    with ``--baseline REV``: the same arms built from ``fl_rpn/`` (and ``conf/``) as they are at
                 git revision REV (before / after an optimisation, measured interleaved).

Inputs as the RPN sees them: ``R`` anchors split over ``--images`` images, float labels with ~0.1 %
positives (1), ~70 % negatives (0) and the rest ignored (-1), random regression targets; logits and
box deltas are leaf tensors that require grad, so backward stops at them (the head is not included). Every call
runs inside an ``fl_rpn.events.EventStorage``, as in the trainer's step, so the statistics are computed.

Time: median seconds of ``loss_objectness + loss_rpn_box_reg`` forward + ``backward()``.
Memory: peak tensor bytes allocated during one forward + backward above the inputs (CUDA:
``max_memory_allocated``; CPU: running sum of the allocation / free events of ``torch.profiler``
with ``profile_memory=True`` -- tracemalloc does not see torch's allocator).

    python experiments/benchmarks/rpn_loss.py                       # CPU, 10k .. 2M anchors
    python experiments/benchmarks/rpn_loss.py --device cuda --anchors 10000,1000000,2000000,5000000
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
from _common import (
    add_common_arguments,
    count_large_ops,
    fmt_bytes,
    fmt_ms,
    interleaved_times,
    iqr,
    load_average,
    markdown_table,
    median,
    peak_memory_bytes,
    provenance_lines,
    select_device,
    synchronize,
    wait_for_quiet,
    write_numbers,
    write_section,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

import fl_rpn.modeling.rpn
from fl_rpn.events import EventStorage
from fl_rpn.modeling.diagnostics import attach_anchor_diagnostics

ARMS = ("sampled", "sampled+diag", "focal_sigmoid", "focal_softmax")


@functools.lru_cache
def rpn_module_at(rev: str):
    """The RPN module as it is at git revision ``rev`` (``fl_rpn/modeling/rpn.py``, or ``fl_rpn/rpn.py`` before the
    package was split): that revision's ``fl_rpn/`` (renamed) and ``conf/``."""
    import importlib
    import io
    import subprocess
    import tarfile
    import tempfile
    from pathlib import Path

    from _common import REPO

    pkg = "_fl_rpn_at_" + "".join(c if c.isalnum() else "_" for c in rev)
    root = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "archive", rev, "fl_rpn", "conf"], cwd=REPO, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(root)
    (root / "fl_rpn").rename(root / pkg)  # its relative imports stay inside it; conf/ is found beside it
    sys.path.insert(0, str(root))
    nested = (root / pkg / "modeling" / "rpn.py").is_file()
    return importlib.import_module(f"{pkg}.modeling.rpn" if nested else f"{pkg}.rpn")


def make_rpn(arm: str, baseline_rev: str | None = None) -> RegionProposalNetwork:
    common = dict(
        anchor_generator=AnchorGenerator(((32,),), ((0.5, 1.0, 2.0),)), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
        pre_nms_top_n=dict(training=2000, testing=1000), post_nms_top_n=dict(training=2000, testing=1000),
        nms_thresh=0.7,
    )  # fmt: skip
    if arm.startswith("sampled"):
        rpn = RegionProposalNetwork(head=RPNHead(8, 3), batch_size_per_image=256, positive_fraction=0.5, **common)
        if arm == "sampled+diag":
            attach_anchor_diagnostics(rpn)
        return rpn
    module = fl_rpn.modeling.rpn
    if "@" in arm:
        arm, _ = arm.split("@", 1)
        module = rpn_module_at(baseline_rev)
    form = arm.removesuffix("-nodiag").split("_", 1)[1]
    head = module.TwoLogitRPNHead(8, 3) if form == "softmax" else RPNHead(8, 3)
    return module.FocalLossRPN(head=head, form=form, **common)


def make_inputs(num_anchors: int, num_images: int, device: torch.device, seed: int):
    """Labels 1 / 0 / -1 with probabilities 0.001 / 0.7 / 0.299 (at least one positive per image)."""
    g = torch.Generator().manual_seed(seed)
    per_image = [num_anchors // num_images + (i < num_anchors % num_images) for i in range(num_images)]
    labels, targets = [], []
    for n in per_image:
        u = torch.rand(n, generator=g)
        lab = torch.full((n,), -1.0)
        lab[u < 0.701] = 0.0
        lab[u < 0.001] = 1.0
        lab[torch.randint(n, (1,), generator=g)] = 1.0
        labels.append(lab.to(device))
        targets.append(torch.randn(n, 4, generator=g).to(device))
    logits = torch.randn(num_anchors, 2, generator=g) - torch.tensor([0.0, 4.6])  # around the prior pi = 0.01
    deltas = torch.randn(num_anchors, 4, generator=g).to(device)
    return logits.to(device), deltas, labels, targets


def make_step(rpn: RegionProposalNetwork, arm: str, logits: torch.Tensor, deltas: torch.Tensor, labels, targets):
    if arm.startswith("focal_softmax"):
        obj = logits.clone()  # [R, 2]
    elif arm.startswith("focal"):
        obj = logits[:, 1:].clone()  # [R, 1], as concat_box_prediction_layers gives for A channels
    else:
        obj = logits[:, 1:].clone()  # torchvision's compute_loss flattens [R, 1]
    obj.requires_grad_(True)
    box = deltas.clone().requires_grad_(True)
    observer = rpn.fg_bg_sampler if arm == "sampled+diag" else None
    maps = [obj.detach().view(len(labels), 1, -1, 1)]  # [N, A = 1, H = R / N, W = 1]: as the head hook keeps them

    def step() -> None:
        obj.grad = None
        box.grad = None
        with EventStorage():
            if observer is not None:
                observer.objectness = maps
            loss_obj, loss_box = rpn.compute_loss(obj, box, labels, targets)
        (loss_obj + loss_box).backward()

    if not arm.endswith("-nodiag"):
        return step

    def step_without_diagnostics() -> None:
        recorded = fl_rpn.modeling.rpn.anchor_statistics
        fl_rpn.modeling.rpn.anchor_statistics = lambda *args, **kwargs: {}
        try:
            step()
        finally:
            fl_rpn.modeling.rpn.anchor_statistics = recorded

    return step_without_diagnostics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchors", default="10000,50000,200000,1000000,2000000", help="comma-separated R values")
    parser.add_argument("--images", type=int, default=2, help="images the anchors are split over")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--rounds", type=int, default=15, help="timed samples per arm and size (median reported)")
    parser.add_argument("--min-sample-ms", type=float, default=20.0, help="repeat short calls to fill a sample")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--nodiag", action="store_true", help="also time the focal arms without their diagnostics")
    parser.add_argument("--baseline", metavar="REV", help="also time the focal arms as they are at git revision REV")
    add_common_arguments(parser)
    args = parser.parse_args()

    device = select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}")
    if args.baseline:
        import subprocess

        from _common import REPO

        rev = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
        arms += [f"{a}@{rev}" for a in arms if a.startswith("focal")]
    if args.nodiag:
        arms += [f"{a}-nodiag" for a in arms if a.startswith("focal") and "@" not in a]
    sizes = [int(float(s)) for s in args.anchors.split(",")]
    load_before = wait_for_quiet(args.max_load, args.wait_for_load) if args.wait_for_load else load_average()
    print(f"load average: {load_before}; torch threads {torch.get_num_threads()}", flush=True)

    torch.manual_seed(args.seed)
    rpns = {arm: make_rpn(arm, args.baseline).to(device).train() for arm in arms}
    rows, per_size, paired = [], {}, {}
    for n in sizes:
        logits, deltas, labels, targets = make_inputs(n, args.images, device, args.seed)
        steps = {arm: make_step(rpns[arm], arm, logits, deltas, labels, targets) for arm in arms}
        # size the inner loop from one warm call of the slowest arm
        est = 0.0
        for step in steps.values():
            step()
            synchronize(device)
            t = interleaved_times({"x": step}, 1, device, warmup=0)["x"][0]
            est = max(est, t)
        inner = max(1, int(args.min_sample_ms / 1e3 / max(est, 1e-7)))
        times = interleaved_times(steps, args.rounds, device, inner=inner, warmup=1)
        mem = {arm: peak_memory_bytes(steps[arm], device) for arm in arms}
        ops = {arm: count_large_ops(steps[arm], n // (4 * args.images)) for arm in arms}
        base_t = median(times[arms[0]])
        per_size[n] = {arm: (median(times[arm]), min(times[arm])) for arm in arms}
        # paired: each sample against the first arm's sample of the same round (same moment, same load)
        paired[n] = {arm: median([a / b for a, b in zip(times[arm], times[arms[0]])]) for arm in arms}
        for arm in arms:
            t = median(times[arm])
            lo, hi = iqr(times[arm])
            rows.append([
                f"{n:,}", arm, fmt_ms(t), f"{fmt_ms(lo)}–{fmt_ms(hi)}", fmt_ms(min(times[arm])), f"{t / n * 1e9:.1f}",
                f"{t / base_t:.2f}", f"{paired[n][arm]:.2f}", f"{min(times[arm]) / min(times[arms[0]]):.2f}",
                str(ops[arm]), fmt_bytes(mem[arm]), f"{mem[arm] / n:.1f}",
                f"{mem[arm] / max(mem[arms[0]], 1):.2f}",
            ])  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)
        del logits, deltas, labels, targets, steps
    load_after = load_average()

    header = ["anchors R", "arm", "median ms", "IQR ms", "min ms", "ns / anchor", f"time / {arms[0]}",
              "paired ratio", f"min / min {arms[0]}", "large ops", "peak extra memory", "bytes / anchor",
              f"memory / {arms[0]}"]  # fmt: skip
    lines = provenance_lines(device, load_before, load_after)
    lines += [
        f"- inputs: R anchors over {args.images} images, labels 0.1 % positive / 70 % negative / 29.9 % ignored; "
        f"{args.rounds} interleaved samples per arm and size (a sample repeats short calls to >= "
        f"{args.min_sample_ms:g} ms); large ops = ATen ops (views excluded) touching a tensor of >= R / "
        f"{4 * args.images} elements, a load-independent cost proxy; "
        "memory = peak tensor bytes during one forward + backward above the inputs "
        + ("(torch.cuda.max_memory_allocated)" if device.type == "cuda" else "(torch.profiler profile_memory)"),
        "",
        *markdown_table(header, rows),
    ]
    focal = [a for a in arms if a.startswith("focal")]
    if args.baseline:
        lines += ["", f"`@{rev}`: the focal arms as committed at {rev} (`--baseline {args.baseline}`), "
                  "timed in the same process."]  # fmt: skip
    if "sampled" in arms and focal:
        lines += [
            "",
            "Time ratios to `sampled`: paired (median over rounds of arm / sampled in the same round) and of the "
            "minima (the least-disturbed sample); linearity = ns per anchor at the largest R / at the smallest "
            "R >= 200k (1.0 = linear), from medians and from minima:",
            "",
        ]
        big = [n for n in sizes if n >= 200_000] or sizes
        for arm in focal:
            ratios = ", ".join(
                f"{n:,}: {paired[n][arm] / paired[n]['sampled']:.2f}x / "
                f"{per_size[n][arm][1] / per_size[n]['sampled'][1]:.2f}x"
                for n in sizes
            )
            lin = [(per_size[big[-1]][arm][i] / big[-1]) / (per_size[big[0]][arm][i] / big[0]) for i in (0, 1)]
            lines.append(f"- {arm} (paired / minima): {ratios}; linearity {lin[0]:.2f} / {lin[1]:.2f}")
    write_numbers(args.json, device, {
        "median_ms": {str(n): {arm: per_size[n][arm][0] * 1e3 for arm in arms} for n in sizes},
        "ms_per_million_anchors": {str(n): {arm: per_size[n][arm][0] * 1e3 / (n / 1e6) for arm in arms} for n in sizes},
    })  # fmt: skip
    if not args.no_write:
        name, title = "rpn_loss", "1. RPN loss alone vs number of anchors (`rpn_loss.py`)"
        if args.threads or device.type == "cuda":
            name += f"_{device.type}" + (f"_threads{args.threads}" if args.threads else "")
            title += f", {device.type.upper()}" + (f", {args.threads} torch thread(s)" if args.threads else "")
        write_section(name, title, lines, script="rpn_loss.py")


if __name__ == "__main__":
    main()
