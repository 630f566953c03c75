"""Long-run numerical stability: train the CPU demo for many iterations with each rpn option and check
that no loss, logged scalar or weight ever becomes NaN / Inf.

    python experiments/stability/run.py                       # 2000 iterations x sampled, focal_sigmoid, focal_softmax
    python experiments/stability/run.py --iters 200 --arms focal_softmax
    python experiments/stability/run.py --check-only           # re-read finished runs and rewrite the summary

Each arm is a plain ``python -m fl_rpn.cli.train`` in ``<out>/<arm>`` with ``nonfinite=stop`` (the default), so a
non-finite loss ends that arm with an error naming the iteration; ``resume=true`` makes the script restartable
(a killed arm continues from its last checkpoint). The summary goes to ``experiments/stability/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ARMS = ("sampled", "focal_sigmoid", "focal_softmax")


def overrides(arm: str, iters: int, out: Path, extra: list[str]) -> list[str]:
    steps = [int(iters * 0.75), int(iters * 0.9)]  # the cpu_demo schedule's shape, stretched
    return [
        f"rpn={arm}",
        f"schedule.max_iters={iters}",
        f"schedule.steps=[{steps[0]},{steps[1]}]",
        f"schedule.checkpoint_every={max(iters // 8, 1)}",
        "eval.evaluators=[]",
        "num_workers=0",
        "resume=true",
        f"hydra.run.dir={out / arm}",
        *extra,
    ]


def tensorboard_scalars(run_dir: Path) -> dict:
    """Every scalar TensorBoard holds for the run (all segments of a resumed run, or an unfinished one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points, bad, last = 0, [], 0
    for events in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                points, last = points + 1, max(last, e.step)
                if not math.isfinite(e.value):
                    bad.append((e.step, tag))
    return {"tb_points": points, "tb_last_step": last, "tb_nonfinite": bad[:20]}


def check(run_dir: Path) -> dict:
    """Finite logged scalars (history.json, TensorBoard) and finite weights (last.pt) of one arm."""
    from fl_rpn.engine.checkpoint import load_checkpoint

    shown = run_dir.resolve().relative_to(ROOT) if run_dir.resolve().is_relative_to(ROOT) else run_dir
    result: dict = {"run_dir": str(shown), **tensorboard_scalars(run_dir)}
    history_file, ckpt_file = run_dir / "history.json", run_dir / "last.pt"
    if history_file.is_file():
        history = json.loads(history_file.read_text())
        bad = [(h["iteration"], k) for h in history for k, v in h.items() if not math.isfinite(v)]
        losses = [h["loss"] for h in history]
        result.update(
            logged_points=len(history),
            first_logged_iteration=history[0]["iteration"] if history else None,
            nonfinite_scalars=bad[:20],
            loss_first=losses[0] if losses else None,
            loss_last=losses[-1] if losses else None,
            loss_max=max(losses) if losses else None,
        )
    if ckpt_file.is_file():
        ckpt = load_checkpoint(ckpt_file)
        result["iteration"] = ckpt["iteration"]
        result["nonfinite_weights"] = [
            k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()
        ]
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        result["skipped_steps"] = metrics.get("train/skipped_steps")
        result["train_seconds"] = metrics.get("train/seconds")
        result["commit"] = metrics["provenance"].get("commit")
        result["hardware"] = metrics["provenance"].get("hardware")
    result["finite"] = bool(
        "iteration" in result
        and not result.get("nonfinite_scalars")
        and not result["tb_nonfinite"]
        and not result.get("nonfinite_weights")
    )
    return result


def finished(run_dir: Path, iters: int) -> bool:
    """Whether ``run_dir`` holds a completed run of ``iters`` iterations (re-running it would rewrite its history)."""
    return (run_dir / "metrics.json").is_file() and json.loads((run_dir / "metrics.json").read_text()).get(
        "train/iterations"
    ) == iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "stability")
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every arm")
    args = parser.parse_args()

    summary = json.loads(args.results.read_text()) if args.results.is_file() else {}
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else Path(script.name)
    command = " ".join(["python", str(shown), *sys.argv[1:]])
    summary["command"] = command  # the last invocation; each arm records the one that trained it
    summary.setdefault("arms", {})
    for arm in args.arms:
        run: dict = {}
        if args.check_only:
            pass
        elif finished(args.out / arm, args.iters):
            print(f"{arm}: already at {args.iters} iterations; checking only", flush=True)
        else:
            cmd = [sys.executable, "-m", "fl_rpn.cli.train", *overrides(arm, args.iters, args.out, args.overrides)]
            print("$", " ".join(cmd), flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            run = {"command": command, "returncode": proc.returncode}
            run["wall_seconds"] = round(time.perf_counter() - t0, 1)
            if proc.returncode != 0:
                run["error_tail"] = proc.stderr.strip().splitlines()[-5:]
            (args.out / arm).mkdir(parents=True, exist_ok=True)
            (args.out / arm / "stderr.log").write_text(proc.stderr)
        previous = summary["arms"].get(arm, {})
        # an arm trained now replaces what an earlier invocation recorded (a stale error_tail included)
        kept = ("command", "returncode", "wall_seconds", "error_tail")
        result = run or {k: previous[k] for k in kept if k in previous}
        result.update(check(args.out / arm), requested_iterations=args.iters)
        summary["arms"][arm] = result
        print(arm, json.dumps(result), flush=True)
        args.results.write_text(json.dumps(summary, indent=2) + "\n")
    ok = all(summary["arms"][a].get("finite") and summary["arms"][a].get("iteration") == args.iters for a in args.arms)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
