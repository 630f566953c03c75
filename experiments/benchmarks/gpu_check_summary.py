"""The summary table of ``gpu_check.sh``: each check, its result, its target, from the JSON files the steps wrote.

    python experiments/benchmarks/gpu_check_summary.py OUT_DIR STEPS_FILE PYTEST_XML [--tiny 1]

``STEPS_FILE`` has one ``name status seconds`` line per step (status: exit code or ``skipped``). With ``--tiny 1``
(a dry run at tiny sizes) the targets are not judged: the numbers only show that each step produced its output.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

RPN_MS_PER_MILLION = 1.0  # target: < 1 ms per 1M anchors, forward + backward
STEP_TIME_RATIO, STEP_MEMORY_RATIO = 1.02, 1.05  # targets: focal / sampled training step
IMAGES_PER_SECOND = 40.0  # target: R50-FPN training on one H100
# The README's CPU demo (fl-rpn-train defaults, seed 0, rpn=focal_softmax; commit 167a493, 2-core AMD EPYC)
CPU_DEMO = {"bbox/AP": 0.678, "bbox/AP50": 0.847, "proposal/AR@100": 0.642}


def load(out: Path, name: str) -> dict | None:
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


def verdict(ok: bool, tiny: bool) -> str:
    return "dry run" if tiny else ("met" if ok else "MISSED")


def rows(out: Path, steps: dict[str, tuple[str, str]], pytest_xml: Path, tiny: bool) -> list[list[str]]:
    table = []
    if pytest_xml.is_file():
        suite = ET.parse(pytest_xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n, failed = int(suite.get("tests")), int(suite.get("failures")) + int(suite.get("errors"))
        skipped = int(suite.get("skipped"))
        result = f"{n - failed - skipped} passed, {failed} failed, {skipped} skipped"
        table.append(["(a) pytest -m cuda", result, "all pass", "met" if failed == 0 and n > skipped else "MISSED"])
    else:
        table.append(["(a) pytest -m cuda", "no report", "all pass", "MISSED"])

    syncs = load(out, "syncs.json")
    if syncs:
        for form, s in syncs["syncs"].items():
            ours = s["by_owner"].get("fl_rpn", 0)  # expected: the focal box loss's torch.where, nothing else
            table.append([f"host syncs in one step, {form}", f"{s['total']} ({s['by_owner']})", "fl_rpn <= 1",
                          verdict(ours <= 1, tiny)])  # fmt: skip

    rpn = load(out, "rpn_loss.json")
    if rpn:
        for n, arms in rpn["ms_per_million_anchors"].items():
            for arm in ("focal_sigmoid", "focal_softmax"):
                ms = arms.get(arm)
                if ms is not None:
                    table.append([f"(b) RPN loss {arm}, {int(n):,} anchors", f"{ms:.3f} ms per 1M anchors",
                                  f"< {RPN_MS_PER_MILLION:g}", verdict(ms < RPN_MS_PER_MILLION, tiny)])  # fmt: skip

    step = load(out, "train_step.json")
    if step:
        where = f"{step['model']} {step['size'][0]}x{step['size'][1]} batch {step['batch']}"
        for arm, ratio in step["time_ratio_paired"].items():
            mem = step["memory_ratio"][arm]
            table.append([f"(c) step time {arm} / {step['base']}, {where}", f"{ratio:.3f}x",
                          f"<= {STEP_TIME_RATIO}x", verdict(ratio <= STEP_TIME_RATIO, tiny)])  # fmt: skip
            table.append([f"(c) step peak memory {arm} / {step['base']}", f"{mem:.3f}x",
                          f"<= {STEP_MEMORY_RATIO}x", verdict(mem <= STEP_MEMORY_RATIO, tiny)])  # fmt: skip

    for name in ("throughput.json", "throughput_compile.json"):
        tp = load(out, name)
        if tp:
            for arm, rate in tp["images_per_second"].items():
                table.append([f"(d) {tp['model']} images/s, {arm}", f"{rate:.1f}", f">= {IMAGES_PER_SECOND:g}",
                              verdict(rate >= IMAGES_PER_SECOND, tiny)])  # fmt: skip
            if tp.get("loader_wait_ms") is not None:
                table.append(["(d) loader: wait per step after the first", f"{tp['loader_wait_ms']:.1f} ms", "~0",
                              "see log"])  # fmt: skip

    demo = load(out, "demo_metrics.json")
    if demo:
        for key, cpu in CPU_DEMO.items():
            table.append([f"(e) demo on {demo['provenance']['hardware']}: {key}",
                          f"{demo.get(key, float('nan')):.3f}", f"CPU run {cpu:.3f}", "compare"])  # fmt: skip
        table.append(["(e) demo: iterations, images/s", f"{demo['train/iterations']}, "
                      f"{demo['train/images_per_second']:.1f}", "CPU run 600, 16.6", "compare"])  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("steps", type=Path)
    parser.add_argument("pytest_xml", type=Path)
    parser.add_argument("--tiny", default="0")
    args = parser.parse_args()
    tiny = args.tiny == "1"
    steps = {}
    for line in args.steps.read_text().splitlines() if args.steps.is_file() else []:
        name, status, seconds = line.split()
        steps[name] = (status, seconds)

    print("## gpu_check summary" + (" (dry run at tiny sizes: targets not judged)" if tiny else ""))
    print("\n| step | status | seconds |\n|---|---|---|")
    for name, (status, seconds) in steps.items():
        shown = "ok" if status == "0" else ("skipped (budget)" if status == "skipped" else f"FAILED (exit {status})")
        print(f"| {name} | {shown} | {seconds} |")
    print("\n| check | result | target | verdict |\n|---|---|---|---|")
    for row in rows(args.out, steps, args.pytest_xml, tiny):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
