"""Host syncs in one training step per RPN form, counted with ``torch.cuda.set_sync_debug_mode("warn")``.

The step is the trainer's own ``TrainStep`` (autocast forward, loss sum, finiteness check, zero_grad, backward, SGD
step), built as the trainer builds it (``fl_rpn.engine.build.build_trainable`` on ``compose_config`` with ``model=``,
``rpn=``, ``batch_size=``, the image size and ``amp=``; the sampled RPN's anchor diagnostics attached), on a fixed
synthetic batch already on the device, after one warm-up step. Every
synchronizing CUDA call warns from the Python line that made it; the warnings are grouped by that line and by who
owns it (``fl_rpn``, ``torchvision``, ``torch`` or this benchmark). On the CPU nothing warns (the mode is CUDA's): the
run only checks the script.

    python experiments/benchmarks/sync_count.py --device cuda --model r50_fpn --size 800,1333 --batch 2
"""

from __future__ import annotations

import argparse
import warnings
from collections import Counter
from pathlib import Path

import torch
from _common import add_common_arguments, select_device, trainer_parts, write_numbers
from train_step import make_batch

from fl_rpn.config import compose_config

FORMS = ("sampled", "focal_sigmoid", "focal_softmax")


def owner(filename: str) -> str:
    parts = Path(filename).parts
    for name in ("fl_rpn", "torchvision", "torch"):
        if name in parts:
            return name
    return "benchmark"


def where(filename: str, lineno: int) -> str:
    parts = Path(filename).parts
    for name in ("fl_rpn", "torchvision", "torch"):
        if name in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(name) - 1 :]) + f":{lineno}"
    return f"{Path(filename).name}:{lineno}"


def count_syncs(step, device: torch.device) -> list[tuple[str, str]]:
    """``[(owner, file:line), ...]``, one per synchronizing CUDA call made by ``step()``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return [(owner(w.filename), where(w.filename, w.lineno)) for w in syncs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="r50_fpn")
    parser.add_argument("--size", default="800,1333", help="H,W of the images (also min_size,max_size)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--amp", choices=["bf16"], help="autocast dtype")
    add_common_arguments(parser, threads=False)
    args = parser.parse_args()
    device = select_device(args.device)
    h, w = (int(s) for s in args.size.split(","))
    images, targets = make_batch(args.batch, (h, w), 5, device, args.seed)

    result = {}
    for form in FORMS:
        overrides = [f"model={args.model}", f"rpn={form}", f"batch_size={args.batch}", f"amp={args.amp or 'null'}",
                     f"model.detector.min_size={min(h, w)}", f"model.detector.max_size={max(h, w)}"]  # fmt: skip
        train_step = trainer_parts(compose_config(overrides), 5, device, args.seed).step

        def step(train_step=train_step) -> None:
            train_step(images, targets)

        step()  # warm-up: cudnn autotuning and the allocator's first growth are not part of a step
        syncs = count_syncs(step, device)
        by_owner = Counter(o for o, _ in syncs)
        by_line = Counter(f"{o}: {loc}" for o, loc in syncs)
        result[form] = {"total": len(syncs), "by_owner": dict(by_owner), "by_line": dict(by_line.most_common())}
        print(f"{form}: {len(syncs)} host syncs in one step; by owner {dict(by_owner)}")
        for line, n in by_line.most_common():
            print(f"    {n:3d}  {line}")
    if device.type != "cuda":
        print("(CPU: set_sync_debug_mode is CUDA's, so nothing is counted here; this run checks the script)")
    write_numbers(args.json, device, {"model": args.model, "size": [h, w], "batch": args.batch, "syncs": result})


if __name__ == "__main__":
    main()
