"""Training throughput (images/s) of ``fl-rpn-train model=mbv3_fpn rpn=sampled`` on COCO128 against torchvision's own
detection reference (``references/detection/train.py``) training ``fasterrcnn_mobilenet_v3_large_fpn``, both from
scratch, on the same device, threads, batch, loader workers, image size and number of iterations.

The reference is not part of this repository: check out its folder at the tag of the installed torchvision
(``torchvision.__version__`` 0.29.1 -> tag v0.29.1; the script prints the tag it expects)::

    git clone --depth 1 --branch v0.29.1 https://github.com/pytorch/vision
    python experiments/benchmarks/vs_torchvision_reference.py --reference vision/references/detection \\
        --data /path/to/coco128

``--data``: COCO128 in COCO json layout, ``annotations/instances_train2017.json`` and ``train2017/`` (what
``dataset=coco128`` reads as ``data_root/coco128``). The reference needs pycocotools. Its ``--data-path`` wants
``train2017/``, ``val2017/``, ``annotations/instances_train2017.json`` and ``annotations/instances_val2017.json``
(its coco_utils.get_coco): the script makes that folder under ``--work`` (default: a temporary folder) from symlinks
to ``--data``, with a val split of the first training image that has a box (both programs check or evaluate a val
split after training; one image keeps that short, and it is never timed). fl-rpn-train reads the same folder
(``dataset=coco data_root=WORK``: images without a box are not trained on, as the reference drops them).

The two commands (``--dry-run`` prints them and exits), one epoch of the reference = ``N`` iterations, ``N`` = the
images the reference keeps // ``--batch``:

- fl-rpn: ``python -m fl_rpn.cli.train model=mbv3_fpn rpn=sampled dataset=coco data_root=WORK device=D batch_size=B
  num_workers=W model.detector.min_size=800 model.detector.max_size=1333 schedule.max_iters=N schedule.log_every=1
  schedule.checkpoint_every=N schedule.eval_every=0 eval.evaluators=[] seed=S hydra.run.dir=...`` (further
  ``KEY=VALUE`` arguments replace or extend these overrides);
- reference: ``python train.py --data-path WORK/coco --dataset coco --model fasterrcnn_mobilenet_v3_large_fpn
  --device D -b B --epochs 1 --workers W --print-freq 1 --rpn-score-thresh 0.0 --use-v2 --output-dir ...``. Its
  default ``--weights-backbone`` is None already (random init; the string ``None`` would be refused as a weights
  name), so it is not passed. ``--rpn-score-thresh 0.0``: torchvision's mobilenet builder defaults to 0.05, applied to
  the training proposals too; fl-rpn's ``rpn.score_thresh`` is 0.0. ``--use-v2``: the default V1 transforms also
  rasterise every object's polygon into a mask (``ConvertCocoPolysToMask``, Mask R-CNN's targets, and a KeyError on
  a json without ``segmentation``); V2 keeps boxes, labels and image ids only, as fl-rpn does.

Both train at 800 x 1333 (the reference has no image-size option; torchvision's FasterRCNN default), with a random
horizontal flip (p 0.5), aspect-ratio grouping (3 bins) and no AMP. Threads: ``--threads N`` sets
``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` for both; without it both inherit this environment.

Timing: both print a line per iteration (fl-rpn's metrics logger with ``schedule.log_every=1``; the reference's
MetricLogger with ``--print-freq 1``, whose ``time:`` is a running mean over 20 iterations, not one iteration's),
and this script stamps every line as it arrives (unbuffered output). Images/s = ``--batch`` x the iterations after
the first ``--warmup-iters`` / the time from the line of iteration ``--warmup-iters`` to the last line, which holds
each of those iterations' wait for data and its step; the loader's start-up, the warm-up iterations, the final
evaluation and the checkpoints fall outside it. Also reported, as each program states it
for the whole epoch (start-up and warm-up included): fl-rpn's ``train/images_per_second`` (metrics.json) and the
reference's ``Total time ... (s / it)``. Runs alternate (A B, B A, ...) for ``--repeats`` rounds; medians.

Differences that stay: the reference decodes with PIL and samples with a RandomSampler + GroupedBatchSampler, fl-rpn
decodes with torchvision.io and draws its own seeded passes of full batches; the reference's box predictor has 91
classes (COCO's id space), fl-rpn's the json's categories + 1 (81 for COCO128); lr schedules and warm-ups differ
(the same cost per step); fl-rpn's log line per iteration also writes TensorBoard scalars.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torchvision
from _common import (
    add_common_arguments,
    interleaved_times,
    load_average,
    markdown_table,
    median,
    provenance_lines,
    wait_for_quiet,
    write_numbers,
    write_section,
)

REFERENCE_MODEL = "fasterrcnn_mobilenet_v3_large_fpn"
MIN_SIZE, MAX_SIZE = 800, 1333  # torchvision's FasterRCNN defaults; the reference has no option for them
ARMS = ("fl-rpn", "reference")
FL_RPN_LINE = r"\biteration (\d+): loss="  # MetricsLogger: "iteration 12: loss=0.8, loss_objectness=..."
REFERENCE_LINE = r"Epoch: \[0\]\s+\[\s*(\d+)/(\d+)\]"  # MetricLogger: "Epoch: [0]  [ 11/32]  eta: ..."
REFERENCE_TOTAL = r"Epoch: \[0\] Total time: \S+ \(([\d.]+) s / it\)"  # its evaluation's is "Test: ..."


def expected_tag() -> str:
    return "v" + torchvision.__version__.split("+")[0]


def reference_version(reference: Path) -> str:
    """The ``version.txt`` of the vision checkout holding ``reference`` (``references/detection``), if any."""
    version = reference.resolve().parents[1] / "version.txt"
    return version.read_text().strip() if version.is_file() else "unknown (no version.txt two folders up)"


def kept_images(annotations: dict) -> int:
    """Images the reference trains on: with an annotation, not all of them boxes of width or height <= 1 (its
    ``coco_utils._coco_remove_images_without_annotations``)."""
    boxes = defaultdict(list)
    for a in annotations["annotations"]:
        boxes[a["image_id"]].append(a["bbox"])
    return sum(1 for im in annotations["images"]
               if boxes[im["id"]] and not all(any(s <= 1 for s in b[2:]) for b in boxes[im["id"]]))  # fmt: skip


def prepare_data(data: Path, work: Path) -> dict:
    """``work/coco``: the reference's layout, symlinks to ``data``, and a one-image val split; returns the json."""
    annotations = json.loads((data / "annotations" / "instances_train2017.json").read_text())
    root = work / "coco"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    links = {"train2017": data / "train2017", "val2017": data / "train2017",
             "annotations/instances_train2017.json": data / "annotations" / "instances_train2017.json"}  # fmt: skip
    for name, target in links.items():
        if (root / name).is_symlink():  # a --work folder used before, maybe with another --data
            (root / name).unlink()
        (root / name).symlink_to(target.resolve())
    with_box = {a["image_id"] for a in annotations["annotations"]}
    first = next((im for im in annotations["images"] if im["id"] in with_box), None)
    if first is None:
        raise SystemExit(f"{data}: no image has a box")
    val = {**annotations, "images": [first], "annotations": [a for a in annotations["annotations"]
                                                              if a["image_id"] == first["id"]]}  # fmt: skip
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(val))
    return annotations


def fl_rpn_command(args, work: Path, iterations: int, run_dir: Path) -> list[str]:
    overrides = {
        "model": "mbv3_fpn", "rpn": "sampled", "dataset": "coco", "data_root": str(work), "device": args.device,
        "batch_size": args.batch, "num_workers": args.workers, "model.detector.min_size": MIN_SIZE,
        "model.detector.max_size": MAX_SIZE, "schedule.max_iters": iterations, "schedule.log_every": 1,
        "schedule.checkpoint_every": iterations, "schedule.eval_every": 0, "eval.evaluators": "[]",
        "seed": args.seed, "hydra.run.dir": str(run_dir),
    }  # fmt: skip
    overrides.update(o.split("=", 1) for o in args.overrides)
    return [sys.executable, "-m", "fl_rpn.cli.train", *(f"{k}={v}" for k, v in overrides.items())]


def reference_command(args, work: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable, str(Path(args.reference) / "train.py"), "--data-path", str(work / "coco"), "--dataset", "coco",
        "--model", REFERENCE_MODEL, "--device", args.device, "-b", str(args.batch), "--epochs", "1",
        "--workers", str(args.workers), "--print-freq", "1", "--rpn-score-thresh", "0.0", "--use-v2",
        "--output-dir", str(run_dir),
    ]  # fmt: skip


def run_logged(command: list[str], env: dict, cwd: Path, log: Path) -> list[tuple[float, str]]:
    """Run ``command``; its output lines with the time each arrived (``time.monotonic``), also written to ``log``."""
    stamped = []
    with log.open("w") as out, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                env=env, cwd=cwd) as proc:  # fmt: skip
        for line in proc.stdout:
            stamped.append((time.monotonic(), line))
            out.write(line)
    if proc.returncode:
        tail = "".join(line for _, line in stamped[-40:])
        raise SystemExit(f"{shlex.join(command)}\nexited with {proc.returncode}; output in {log}:\n{tail}")
    return stamped


def iteration_times(stamped, pattern: str, first_is_zero: bool) -> dict[int, float]:
    """``{iterations done: arrival time}`` of the per-iteration lines matching ``pattern`` (group 1 the counter)."""
    times = {}
    for t, line in stamped:
        match = re.search(pattern, line)
        if match:
            times[int(match.group(1)) + (1 if first_is_zero else 0)] = t
    return times


def steady_rate(times: dict[int, float], warmup: int, batch: int, name: str) -> float:
    """Images/s between the line after ``warmup`` iterations and the last line."""
    last = max(times, default=0)
    if warmup not in times or last <= warmup:
        raise SystemExit(f"{name}: no per-iteration line after {warmup} and after more iterations (found "
                         f"{sorted(times)[:5]}...); see its log")  # fmt: skip
    return batch * (last - warmup) / (times[last] - times[warmup])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, metavar="DIR",
                        help=f"torchvision's references/detection at tag {expected_tag()}")  # fmt: skip
    parser.add_argument("--data", required=True, metavar="DIR", help="COCO128: annotations/instances_train2017.json, "
                        "train2017/")  # fmt: skip
    parser.add_argument("--work", metavar="DIR", help="where the data folder, runs and logs go (default: temporary)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (both programs)")
    parser.add_argument("--batch", type=int, default=2, help="images per iteration (the reference's default, 2)")
    parser.add_argument("--workers", type=int, default=2, help="data-loading worker processes of both")
    parser.add_argument("--repeats", type=int, default=3, help="runs per program, interleaved")
    parser.add_argument("--warmup-iters", type=int, default=5, help="iterations of each run left out of images/s")
    parser.add_argument("--dry-run", action="store_true", help="print both commands and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="fl-rpn-train overrides replacing or "
                        "extending the script's own (e.g. to check the script with model=tiny_fpn)")  # fmt: skip
    add_common_arguments(parser)
    args = parser.parse_args()
    reference, data = Path(args.reference).expanduser(), Path(args.data).expanduser()
    if not (reference / "train.py").is_file():
        parser.error(f"--reference {reference}: no train.py; check out vision at {expected_tag()} (see --help)")
    if not (data / "annotations" / "instances_train2017.json").is_file() or not (data / "train2017").is_dir():
        parser.error(f"--data {data}: needs annotations/instances_train2017.json and train2017/")
    if args.warmup_iters < 1:
        parser.error("--warmup-iters must be at least 1 (fl-rpn prints no line before its first iteration)")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)  # this process's, as provenance; the two programs' through the environment

    with tempfile.TemporaryDirectory(prefix="vs_reference-") as tmp:
        work = Path(args.work or tmp).resolve()
        annotations = prepare_data(data.resolve(), work)
        iterations = kept_images(annotations) // args.batch
        if iterations <= args.warmup_iters:
            parser.error(f"{kept_images(annotations)} trainable images // --batch {args.batch} = {iterations} "
                         f"iterations per epoch, not more than --warmup-iters {args.warmup_iters}")  # fmt: skip
        commands = {"fl-rpn": lambda r: fl_rpn_command(args, work, iterations, work / "runs" / f"fl-rpn-{r}"),
                    "reference": lambda r: reference_command(args, work, work / "runs" / f"reference-{r}")}  # fmt: skip
        print(f"torchvision {torchvision.__version__}: reference tag {expected_tag()}; the checkout's version.txt: "
              f"{reference_version(reference)}")  # fmt: skip
        if args.dry_run:
            for arm in ARMS:
                print(f"{arm}: {shlex.join(commands[arm](0))}")
            return

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if args.threads:
            env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        load_before = wait_for_quiet(args.max_load, args.wait_for_load) if args.wait_for_load else load_average()
        print(f"load average: {load_before}; {iterations} iterations of batch {args.batch} per run", flush=True)
        rates, whole, totals = defaultdict(list), defaultdict(list), []

        def fl_rpn_run() -> None:
            r = len(rates["fl-rpn"])
            stamped = run_logged(commands["fl-rpn"](r), env, work, work / f"fl-rpn-{r}.log")
            rates["fl-rpn"].append(steady_rate(iteration_times(stamped, FL_RPN_LINE, False), args.warmup_iters,
                                               args.batch, "fl-rpn"))  # fmt: skip
            metrics = json.loads((work / "runs" / f"fl-rpn-{r}" / "metrics.json").read_text())
            whole["fl-rpn"].append(metrics["train/images_per_second"])
            print(f"fl-rpn run {r}: {rates['fl-rpn'][-1]:.3f} images/s", flush=True)

        def reference_run() -> None:
            r = len(rates["reference"])
            stamped = run_logged(commands["reference"](r), env, work, work / f"reference-{r}.log")
            times = iteration_times(stamped, REFERENCE_LINE, True)
            totals.extend(int(m.group(2)) for _, line in stamped if (m := re.search(REFERENCE_LINE, line)))
            rates["reference"].append(steady_rate(times, args.warmup_iters, args.batch, "reference"))
            per_it = [float(m.group(1)) for _, line in stamped if (m := re.search(REFERENCE_TOTAL, line))]
            whole["reference"].append(args.batch / per_it[0] if per_it else float("nan"))
            print(f"reference run {r}: {rates['reference'][-1]:.3f} images/s", flush=True)

        # the device only says what to synchronize: nothing here, each program runs in its own process
        walls = interleaved_times({"fl-rpn": fl_rpn_run, "reference": reference_run}, args.repeats,
                                  torch.device("cpu"), warmup=0)  # fmt: skip
        shown = {arm: shlex.join(["python", *commands[arm](0)[1:]]).replace(str(work), "WORK") for arm in ARMS}
    load_after = load_average()

    ratio = median(rates["fl-rpn"]) / median(rates["reference"])
    paired = [a / b for a, b in zip(rates["fl-rpn"], rates["reference"])]
    mismatch = sorted(set(totals) - {iterations})
    rows = [[arm, f"{median(rates[arm]):.3f}", ", ".join(f"{x:.3f}" for x in rates[arm]), f"{median(whole[arm]):.3f}",
             f"{median(walls[arm]):.1f}"] for arm in ARMS]  # fmt: skip
    for row in rows:
        print(" | ".join(row))
    print(f"fl-rpn / reference images/s: {ratio:.3f}")
    if mismatch:
        print(f"the reference ran {mismatch} iterations per epoch, not {iterations}")

    header = ["program", "images / s (median)", "per run", "whole epoch, as it reports (median)", "wall s / run"]
    lines = provenance_lines(device, load_before, load_after)
    lines += [
        f"- reference: torchvision `references/detection` at {expected_tag()} (checkout's version.txt: "
        f"{reference_version(reference)}); threads: "
        + (f"OMP_NUM_THREADS={args.threads} for both" if args.threads else "the environment's, for both"),
        f"- {iterations} iterations of batch {args.batch} at {MIN_SIZE}x{MAX_SIZE} on `{args.device}`, {args.workers} "
        f"loader workers; images/s over the iterations after the first {args.warmup_iters}, from the arrival times "
        f"of the per-iteration lines; {args.repeats} interleaved runs each"
        + (f"; **the reference ran {mismatch} iterations per epoch**" if mismatch else ""),
        f"- fl-rpn: `{shown['fl-rpn']}`",
        f"- reference: `{shown['reference']}`",
        "",
        *markdown_table(header, rows),
        "",
        f"fl-rpn / reference images/s (medians): **{ratio:.3f}**; per-round paired: "
        + ", ".join(f"{x:.3f}" for x in paired),
    ]
    write_numbers(args.json, device, {
        "iterations": iterations, "batch": args.batch, "workers": args.workers, "device": args.device,
        "threads": args.threads, "warmup_iters": args.warmup_iters, "reference_tag": expected_tag(),
        "images_per_second": {arm: median(rates[arm]) for arm in ARMS}, "runs": {arm: rates[arm] for arm in ARMS},
        "whole_epoch_images_per_second": {arm: whole[arm] for arm in ARMS}, "ratio": ratio,
        "reference_iterations": sorted(set(totals)), "commands": shown,
    })  # fmt: skip
    if not args.no_write:
        name = "_".join(["vs_torchvision_reference", *([args.device] if args.device != "cpu" else []),
                         *([f"threads{args.threads}"] if args.threads else [])])  # fmt: skip
        title = "9. Training throughput against torchvision's detection reference (`vs_torchvision_reference.py`)"
        write_section(name, title, lines, script="vs_torchvision_reference.py")


if __name__ == "__main__":
    main()
