"""COCO box AP: pycocotools vs faster-coco-eval through ``fl_rpn.evaluation.CocoEvaluator``, time and agreement.

A deterministic synthetic set (numpy seed): ``--images`` images with 80 COCO categories (ids with COCO's
gaps), 1-15 ground-truth boxes per image over small / medium / large sizes (1 % crowd), and
``--detections`` detections per image: noisy copies of the ground truth (some with the wrong class)
plus random boxes, with random scores. One ``CocoEvaluator`` per backend receives the same records;
``compute()`` (COCO dicts → COCO objects → evaluate → accumulate → summarize) is timed, the backends
interleaved (A B A B ...), and the six metrics are compared (``|a - b| <= 1e-12``).

    python experiments/benchmarks/evaluation.py                       # 5,000 images x 100 detections
    python experiments/benchmarks/evaluation.py --images 500 --rounds 3
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from _common import (
    add_common_arguments,
    load_average,
    markdown_table,
    median,
    provenance_lines,
    select_device,
    wait_for_quiet,
    write_section,
)

from fl_rpn.data import COCO80_TO_COCO91
from fl_rpn.evaluation import CocoEvaluator

BACKENDS = ("pycocotools", "faster_coco_eval")


def synthetic(num_images: int, dets_per_image: int, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    targets, outputs = [], []
    for image_id in range(1, num_images + 1):
        h, w = int(rng.integers(360, 641)), int(rng.integers(360, 641))
        m = int(rng.integers(1, 16))
        side = np.exp(rng.uniform(np.log(8), np.log(min(h, w) * 0.9), size=(m, 2)))  # small .. large
        x0 = rng.uniform(0, w - side[:, 0])
        y0 = rng.uniform(0, h - side[:, 1])
        gt = np.stack([x0, y0, x0 + side[:, 0], y0 + side[:, 1]], 1)
        gt_labels = rng.integers(1, num_classes + 1, m)
        ignore = rng.random(m) < 0.01
        # detections: jittered ground truth (10 % relabelled), then random boxes
        k = min(dets_per_image, int(rng.integers(m, 3 * m + 1)))
        src = rng.integers(0, m, k)
        jitter = rng.normal(0, 0.1, (k, 4)) * np.repeat(side[src], 2, axis=1)
        tp = gt[src] + jitter
        tp_labels = np.where(rng.random(k) < 0.1, rng.integers(1, num_classes + 1, k), gt_labels[src])
        r = dets_per_image - k
        rs = np.exp(rng.uniform(np.log(8), np.log(min(h, w) * 0.9), size=(r, 2)))
        rx, ry = rng.uniform(0, w - rs[:, 0]), rng.uniform(0, h - rs[:, 1])
        fp = np.stack([rx, ry, rx + rs[:, 0], ry + rs[:, 1]], 1)
        boxes = np.concatenate([tp, fp])
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        scores = np.concatenate([rng.uniform(0.3, 1.0, k), rng.uniform(0.0, 0.7, r)])
        labels = np.concatenate([tp_labels, rng.integers(1, num_classes + 1, r)])
        targets.append({
            "boxes": torch.tensor(gt, dtype=torch.float32), "labels": torch.tensor(gt_labels),
            "ignore": torch.tensor(ignore), "image_id": image_id, "orig_size": (h, w),
        })  # fmt: skip
        outputs.append({
            "boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels),
        })  # fmt: skip
    return targets, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100, help="detections per image")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved compute() calls per backend")
    parser.add_argument("--device", default="cpu", help="where the detections live before update() (cpu | cuda), "
                        "as a model's outputs would; COCO evaluation itself runs on the CPU")  # fmt: skip
    add_common_arguments(parser, threads=False)
    args = parser.parse_args()

    category_ids = list(COCO80_TO_COCO91)
    class_names = [f"class{c}" for c in category_ids]
    targets, outputs = synthetic(args.images, args.detections, len(category_ids), args.seed)
    device = select_device(args.device)
    if device.type != "cpu":
        outputs = [{k: v.to(device) for k, v in o.items()} for o in outputs]
    load_before = wait_for_quiet(args.max_load, args.wait_for_load) if args.wait_for_load else load_average()
    print(f"load average: {load_before}; {args.images} images, {sum(len(t['labels']) for t in targets)} gt boxes",
          flush=True)  # fmt: skip

    evaluators, update_s = {}, {}
    for backend in BACKENDS:
        ev = CocoEvaluator(category_ids, class_names, backend=backend)
        t0 = time.perf_counter()
        for i in range(0, len(targets), 8):  # batches of 8, as an eval loader would give them
            ev.update(targets[i : i + 8], outputs[i : i + 8])
        update_s[backend] = time.perf_counter() - t0
        evaluators[backend] = ev
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    metrics: dict[str, list[dict[str, float]]] = {b: [] for b in BACKENDS}
    for r in range(args.rounds):
        for backend in BACKENDS if r % 2 == 0 else BACKENDS[::-1]:
            t0 = time.perf_counter()
            metrics[backend].append(evaluators[backend].compute())
            times[backend].append(time.perf_counter() - t0)
            print(f"round {r} {backend}: {times[backend][-1]:.2f} s", flush=True)
    t0 = time.perf_counter()
    evaluators["pycocotools"].coco_dicts()
    dicts_s = time.perf_counter() - t0
    load_after = load_average()

    a, b = metrics["pycocotools"][0], metrics["faster_coco_eval"][0]

    def diff(x: float, y: float) -> float:
        return 0.0 if (math.isnan(x) and math.isnan(y)) else abs(x - y)

    max_diff = max(diff(a[k], b[k]) for k in a)
    repeat_ok = all(m == ms[0] for ms in metrics.values() for m in ms)
    identical = max_diff <= 1e-12
    base = median(times["pycocotools"])
    rows = [
        [bk, f"{median(times[bk]):.2f}", ", ".join(f"{t:.2f}" for t in times[bk]),
         f"{base / median(times[bk]):.2f}", f"{update_s[bk]:.2f}"]
        for bk in BACKENDS
    ]  # fmt: skip
    from importlib.metadata import version

    lines = provenance_lines(device, load_before, load_after)
    lines += [
        f"- pycocotools {version('pycocotools')}, faster-coco-eval {version('faster-coco-eval')}",
        f"- data: {args.images:,} synthetic images (seed {args.seed}), 80 classes (COCO ids), "
        f"{sum(len(t['labels']) for t in targets):,} gt boxes, {args.detections} detections per image "
        f"({args.images * args.detections:,} in all); `CocoEvaluator.compute()` timed, backends interleaved, "
        f"{args.rounds} calls each; detections on {device.type} before `update()`",
        "",
        *markdown_table(["backend", "median compute() s", "all calls s", "speed-up", "update() s (all images)"], rows),
        "",
        *markdown_table(
            ["metric", "pycocotools", "faster_coco_eval", "|diff|"],
            [[k, f"{a[k]:.15f}", f"{b[k]:.15f}", f"{diff(a[k], b[k]):.1e}"] for k in a],
        ),  # fmt: skip
        "",
        f"Of each `compute()`, building the COCO dicts from the records (the same Python code for both backends) "
        f"took {dicts_s:.2f} s.",
        "",
        f"Identical to 1e-12: **{'yes' if identical else 'NO'}** (max |diff| {max_diff:.1e}); every repeated "
        f"call gave the same numbers: {'yes' if repeat_ok else 'no'}.",
    ]
    print("\n".join(lines[-12:]))
    if not args.no_write:
        write_section("evaluation", "4. COCO evaluation backends (`evaluation.py`)", lines)


if __name__ == "__main__":
    main()
