"""Every script under experiments/ runs with tiny arguments, in a subprocess, and writes what it promises.

The benchmarks run on the CPU with ``--no-write`` (RESULTS.md stays as it is: checked) and, where they have it,
``--json`` into ``tmp_path``; their JSON is read back, and made into the summary table of ``gpu_check_summary.py``
as ``gpu_check.sh`` would. ``data_pipeline.py``, ``vs_torchvision_reference.py`` and ``prior_init/measure.py`` read
a 4-image COCO-format stand-in for COCO128 (``vs_torchvision_reference.py`` runs fl-rpn-train at tiny size against
a stand-in for torchvision's reference train.py that prints its MetricLogger's lines); ``trainer_overhead.py`` times
two batches of a tiny synthetic run; ``stability/run.py`` trains one arm for one iteration;
``decoupled_head/objectness_scores.py`` scores two one-iteration runs; ``gpu_check.sh`` parses, and its ``--device
cpu`` dry run goes through every step with a stand-in interpreter that records each command instead of running it
(the steps' scripts are the ones run here). A script added to experiments/ without a test here fails
``test_every_experiment_script_has_a_smoke_test``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.io import write_jpeg

from .conftest import FAST, TINY, run_app, write_tiny_data

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
BENCH = EXPERIMENTS / "benchmarks"
TIMEOUT = 300  # seconds; each script takes 5-25 s on a busy 2-core machine
# what each test runs (``_common.py`` is the benchmarks' shared module, not a script)
SCRIPTS = {
    "benchmarks/rpn_loss.py", "benchmarks/train_step.py", "benchmarks/gpu_throughput.py", "benchmarks/sync_count.py",
    "benchmarks/evaluation.py", "benchmarks/data_pipeline.py", "benchmarks/gpu_check_summary.py",
    "benchmarks/gpu_check.sh", "benchmarks/stability_cost.py", "benchmarks/trainer_overhead.py",
    "benchmarks/vs_torchvision_reference.py", "benchmarks/scale_step.py", "prior_init/measure.py", "stability/run.py",
    "decoupled_head/objectness_scores.py", "full_batch/trace_steps.py", "collect_runs.py",
}  # fmt: skip
# files the scripts write by default: --no-write, --results and $OUT keep them as they are
DEFAULT_OUTPUTS = [BENCH / "RESULTS.md", EXPERIMENTS / "stability" / "results.json"]


def test_every_experiment_script_has_a_smoke_test():
    found = {p.relative_to(EXPERIMENTS).as_posix() for p in [*EXPERIMENTS.rglob("*.py"), *EXPERIMENTS.rglob("*.sh")]}
    assert found - {"benchmarks/_common.py"} == SCRIPTS


@pytest.fixture(autouse=True)
def _leaves_the_checked_in_results_alone():
    before = {p: p.read_bytes() for p in DEFAULT_OUTPUTS}
    yield
    assert {p: p.read_bytes() for p in DEFAULT_OUTPUTS} == before


def run_script(script: Path, *args: str, cache: Path, cwd: Path, env: dict[str, str] | None = None):
    """``python script *args`` from ``cwd``, on one thread, with this checkout first on PYTHONPATH (as gpu_check.sh
    runs them); a non-zero exit fails the test."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    return run_app(*args, script=script, cache=cache, cwd=cwd, env=env, timeout=TIMEOUT)


def summary_rows(out: Path, tmp_path: Path, tiny: bool = True) -> list[list[str]]:
    """The check rows (``| check | result | target | verdict |``) of gpu_check_summary.py for the JSON files in
    ``out`` (without the row of the pytest report, which there is none of here)."""
    proc = subprocess.run(
        [sys.executable, BENCH / "gpu_check_summary.py", out, tmp_path / "no-steps", tmp_path / "no.xml",
         "--tiny", "1" if tiny else "0"], capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    table = proc.stdout.split("| check | result | target | verdict |\n|---|---|---|---|\n")[1]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
    assert rows[0] == ["(a) pytest -m cuda", "no report", "all pass", "MISSED"]
    return rows[1:]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# -- benchmarks/ with --json ---------------------------------------------------------------------------------------
def test_rpn_loss(tmp_path, cache):
    out = tmp_path / "out"
    out.mkdir()
    args = ["--anchors", "2000,4000", "--rounds", "1", "--min-sample-ms", "1", "--no-write"]
    run_script(BENCH / "rpn_loss.py", *args, "--json", str(out / "rpn_loss.json"), cache=cache, cwd=tmp_path)
    numbers = json.loads((out / "rpn_loss.json").read_text())
    arms = {"sampled", "sampled+diag", "focal_sigmoid", "focal_softmax"}
    for key in ("median_ms", "ms_per_million_anchors"):
        assert set(numbers[key]) == {"2000", "4000"}
        assert all(set(by_arm) == arms and all(map(positive, by_arm.values())) for by_arm in numbers[key].values())
    assert "rpn_loss.py --anchors 2000,4000" in numbers["command"] and numbers["commit"]
    rows = summary_rows(out, tmp_path)
    assert [r[0] for r in rows] == [f"(b) RPN loss {arm}, {n} anchors" for n in ("2,000", "4,000")
                                    for arm in ("focal_sigmoid", "focal_softmax")]  # fmt: skip
    assert {r[3] for r in rows} == {"dry run"}


def test_train_step_compares_heads(tmp_path, cache):
    args = ["--size", "96,128", "--batch", "1", "--rounds", "1", "--warmup", "0", "--no-write",
            "--arms", "sampled,sampled/decoupled"]  # fmt: skip
    run_script(BENCH / "train_step.py", *args, "--json", str(tmp_path / "heads.json"), cache=cache, cwd=tmp_path)
    numbers = json.loads((tmp_path / "heads.json").read_text())
    assert set(numbers["median_ms"]) == {"sampled", "sampled/decoupled"}
    assert set(numbers["time_ratio_paired"]) == {"sampled/decoupled"}
    assert numbers["memory_ratio"]["sampled/decoupled"] > 1.0  # the decoupled head holds a second tower


def test_stability_cost(tmp_path, cache):
    args = ["--size", "96,128", "--batch", "1", "--rounds", "1", "--warmup", "0", "--log-every", "4",
            "--probe-every", "2", "--rpn", "focal_sigmoid", "--head", "decoupled", "--no-write"]  # fmt: skip
    run_script(BENCH / "stability_cost.py", *args, "--json", str(tmp_path / "s.json"), cache=cache, cwd=tmp_path)
    numbers = json.loads((tmp_path / "s.json").read_text())
    assert (numbers["rpn"], numbers["head"], numbers["size"]) == ("focal_sigmoid", "decoupled", [96, 128])
    arms = {"off", "window statistics", "+ probe every 2"}
    assert set(numbers["median_ms_per_step"]) == set(numbers["time_ratio_paired"]) == arms
    assert numbers["time_ratio_paired"]["off"] == 1.0 and all(map(positive, numbers["median_ms_per_step"].values()))


def test_trainer_overhead(tmp_path, cache):
    """Both arms over 2 batches of a tiny synthetic run, the trainer's with a log line and a checkpoint every step."""
    data = ["dataset.train.num_images=2", "dataset.val.num_images=1", "dataset.train.image_size=[96,128]",
            "dataset.val.image_size=[96,128]", "schedule.log_every=1", "schedule.checkpoint_every=1"]  # fmt: skip
    args = ["--size", "96,128", "--batch", "1", "--iters", "2", "--rounds", "1", "--warmup", "0", "--no-write"]
    proc = run_script(BENCH / "trainer_overhead.py", *args, "--json", str(tmp_path / "o.json"), *data, cache=cache,
                      cwd=tmp_path)  # fmt: skip
    numbers = json.loads((tmp_path / "o.json").read_text())
    assert set(numbers["median_ms_per_step"]) == set(numbers["mean_ms_per_step"]) == {"bare", "trainer"}
    assert all(map(positive, [*numbers["median_ms_per_step"].values(), numbers["ratio"], numbers["ratio_paired"]]))
    medians = numbers["median_ms_per_step"]
    assert numbers["ratio"] == pytest.approx(medians["trainer"] / medians["bare"]) and numbers["target"] == 1.03
    assert numbers["overrides"] == data and "trainer / bare: " in proc.stdout


def test_scale_step(tmp_path, cache):
    """Two small arms, one step each: the step times, the ratio to the first arm and the projected schedule."""
    arms = "scale=bccd model.detector.min_size=96 model.detector.max_size=128;scale=bccd_pretrained " \
        "model.detector.min_size=96 model.detector.max_size=128"  # fmt: skip
    args = ["--arms", arms, "--image", "96,128", "--batch", "1", "--rounds", "1", "--warmup", "0", "--no-write"]
    proc = run_script(BENCH / "scale_step.py", *args, "--json", str(tmp_path / "s.json"), cache=cache, cwd=tmp_path)
    medians = json.loads((tmp_path / "s.json").read_text())["median_s"]
    assert list(medians) == arms.split(";") and all(map(positive, medians.values()))
    assert "| tiny_fpn |" in proc.stdout and "| mbv2_fpn |" in proc.stdout and "1000 × → " in proc.stdout


def test_train_step(tmp_path, cache):
    out = tmp_path / "out"
    out.mkdir()
    args = ["--model", "tiny_fpn", "--size", "96,128", "--batch", "1", "--rounds", "1", "--warmup", "0", "--no-write"]
    run_script(BENCH / "train_step.py", *args, "--json", str(out / "train_step.json"), cache=cache, cwd=tmp_path)
    numbers = json.loads((out / "train_step.json").read_text())
    assert (numbers["model"], numbers["size"], numbers["batch"], numbers["base"]) == (
        "tiny_fpn",
        [96, 128],
        1,
        "sampled",
    )
    forms = {"sampled", "focal_sigmoid", "focal_softmax"}
    assert set(numbers["median_ms"]) == set(numbers["peak_memory_bytes"]) == set(numbers["memory_ratio"]) == forms
    assert all(map(positive, [*numbers["median_ms"].values(), *numbers["peak_memory_bytes"].values()]))
    assert set(numbers["time_ratio_paired"]) == forms - {"sampled"} and numbers["memory_ratio"]["sampled"] == 1.0
    rows = summary_rows(out, tmp_path)
    assert [r[0] for r in rows] == [
        "(c) step time focal_sigmoid / sampled, tiny_fpn 96x128 batch 1",
        "(c) step peak memory focal_sigmoid / sampled",
        "(c) step time focal_softmax / sampled, tiny_fpn 96x128 batch 1",
        "(c) step peak memory focal_softmax / sampled",
    ]  # fmt: skip


def test_gpu_throughput_on_the_cpu(tmp_path, cache):
    """The documented CPU check of the script (it never writes RESULTS.md there): a fixed-batch arm and the arm fed by
    the real loader from the synthetic set, one step each."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["--device", "cpu", "--model", "tiny_fpn", "--size", "96,128", "--batch", "1", "--steps", "1", "--rounds",
            "1", "--warmup", "0", "--workers", "0", "--loader-steps", "2", "--data-images", "2", "--arms", "bf16+cl",
            "--no-write"]  # fmt: skip
    run_script(BENCH / "gpu_throughput.py", *args, "--json", str(out / "throughput.json"), cache=cache, cwd=tmp_path)
    numbers = json.loads((out / "throughput.json").read_text())
    arm, loader = "bf16, channels_last on", "bf16, channels_last on, loader (0 workers)"
    assert set(numbers["images_per_second"]) == set(numbers["peak_memory_bytes"]) == {arm, loader}
    assert all(map(positive, numbers["images_per_second"].values())) and numbers["base"] == arm
    assert numbers["data"] == "synthetic" and numbers["loader_wait_ms"] >= 0
    assert list(cache.glob("synthetic-*/train")), "the loader arm read no synthetic set from FL_RPN_CACHE"
    rows = summary_rows(out, tmp_path)
    assert [r[0] for r in rows] == [f"(d) tiny_fpn images/s, {arm}", f"(d) tiny_fpn images/s, {loader}",
                                    "(d) loader: wait per step after the first"]  # fmt: skip


def test_gpu_throughput_needs_the_loader_arms_fixed_batch_twin(tmp_path):
    """The loader arm's images/s is compared with the fixed-batch arm of its settings: without that arm in --arms
    the script stops at once, naming both, instead of measuring everything and failing at the end."""
    proc = subprocess.run([sys.executable, BENCH / "gpu_throughput.py", "--device", "cpu", "--arms", "fp32",
                           "--no-write"], capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert "--arms fp32 lacks bf16+cl, the fixed-batch arm the loader arm" in proc.stderr


def test_sync_count_on_the_cpu(tmp_path, cache):
    """On the CPU nothing is counted (the sync debug mode is CUDA's): the script runs every form's step."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["--device", "cpu", "--model", "tiny_fpn", "--size", "96,128", "--batch", "1"]
    proc = run_script(BENCH / "sync_count.py", *args, "--json", str(out / "syncs.json"), cache=cache, cwd=tmp_path)
    numbers = json.loads((out / "syncs.json").read_text())
    assert numbers["syncs"] == {form: {"total": 0, "by_owner": {}, "by_line": {}}
                                for form in ("sampled", "focal_sigmoid", "focal_softmax")}  # fmt: skip
    assert "nothing is counted here" in proc.stdout
    rows = summary_rows(out, tmp_path)
    assert [r[0] for r in rows] == [
        f"host syncs in one step, {f}" for f in ("sampled", "focal_sigmoid", "focal_softmax")
    ]


# -- benchmarks/ that print ----------------------------------------------------------------------------------------
def test_evaluation_backends_agree(tmp_path, cache):
    args = ["--images", "20", "--detections", "5", "--rounds", "2", "--no-write"]
    proc = run_script(BENCH / "evaluation.py", *args, cache=cache, cwd=tmp_path)
    assert "Identical to 1e-12: **yes**" in proc.stdout
    assert "every repeated call gave the same numbers: yes" in proc.stdout
    assert proc.stdout.count("round 1 ") == 2  # both backends, the second round in the other order


def write_coco128_stand_in(root: Path) -> Path:
    """``root/coco128``: 4 random JPEGs of two shapes in train2017/ and their COCO json (2 classes, a box each), the
    layout of the coco128 dataset config's train split."""
    images = root / "coco128" / "train2017"
    images.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    records, boxes = [], []
    for i, (h, w) in enumerate([(96, 128), (128, 96), (96, 128), (128, 96)], 1):
        write_jpeg((torch.rand(3, h, w, generator=g) * 255).to(torch.uint8), str(images / f"{i:012d}.jpg"))
        records.append({"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h})
        boxes.append({"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [10, 10, 40, 30], "area": 1200.0,
                      "iscrowd": 0})  # fmt: skip
    categories = [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}]
    (root / "coco128" / "annotations").mkdir()
    annotations = {"images": records, "annotations": boxes, "categories": categories}
    (root / "coco128" / "annotations" / "instances_train2017.json").write_text(json.dumps(annotations))
    return root


def test_data_pipeline(tmp_path, cache):
    """The loader arms (0 and 1 worker: the worker is shut down and the script exits) and the model arm."""
    data = write_coco128_stand_in(tmp_path / "data")
    args = ["--data-root", str(data), "--workers", "0,1", "--batch", "2", "--rounds", "1", "--model-steps", "1",
            "--no-r50-estimate", "--no-write"]  # fmt: skip
    proc = run_script(BENCH / "data_pipeline.py", *args, cache=cache, cwd=tmp_path)
    assert "; 4 images" in proc.stdout
    rates = dict(line.rsplit(": ", 1) for line in proc.stdout.splitlines() if line.endswith(" images/s"))
    assert set(rates) == {"loader, 0 workers", "loader, 1 workers", "tiny_fpn train step"}
    assert all(positive(float(r.split()[0])) for r in rates.values())


# torchvision's references/detection/train.py for vs_torchvision_reference.py: checks the data folder it is given and
# prints its MetricLogger's per-iteration lines (--print-freq 1) 0.05 s apart, then its total
STAND_IN_REFERENCE = """
import argparse, json, time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--data-path")
parser.add_argument("-b", "--batch-size", type=int)
parser.add_argument("--output-dir")
args, _ = parser.parse_known_args()
root = Path(args.data_path)
assert (root / "train2017").is_dir() and (root / "val2017").is_dir()
assert len(json.loads((root / "annotations" / "instances_val2017.json").read_text())["images"]) == 1
train = json.loads((root / "annotations" / "instances_train2017.json").read_text())
n = len({a["image_id"] for a in train["annotations"]}) // args.batch_size
start = time.time()
for i in range(n):
    time.sleep(0.05)
    print(f"Epoch: [0]  [{i}/{n}]  eta: 0:00:00  lr: 0.000020  loss: 1.0000 (1.0000)  time: 0.0500  data: 0.0001")
print(f"Epoch: [0] Total time: 0:00:00 ({(time.time() - start) / n:.4f} s / it)")
Path(args.output_dir).mkdir(parents=True)
"""


def test_vs_torchvision_reference(tmp_path, cache):
    """Both arms' commands, exactly (--dry-run), and a run of each: the real fl-rpn-train at tiny size (overrides after
    --) against the stand-in reference, whose lines 0.05 s apart make at most 20 images/s at batch 1."""
    reference = tmp_path / "vision" / "references" / "detection"
    reference.mkdir(parents=True)
    (reference / "train.py").write_text(STAND_IN_REFERENCE)
    data = write_coco128_stand_in(tmp_path / "data") / "coco128"
    work = tmp_path / "work"
    script = BENCH / "vs_torchvision_reference.py"
    args = ["--reference", str(reference), "--data", str(data), "--work", str(work), "--batch", "1", "--workers", "0",
            "--warmup-iters", "1"]  # fmt: skip
    proc = run_script(script, *args, "--dry-run", cache=cache, cwd=tmp_path)
    tag = "v" + torchvision.__version__.split("+")[0]
    assert f"reference tag {tag}; the checkout's version.txt: unknown" in proc.stdout
    shown = [line.split(": ", 1) for line in proc.stdout.splitlines() if line.startswith(("fl-rpn: ", "reference: "))]
    commands = dict(shown)
    assert commands["fl-rpn"] == shlex.join([
        sys.executable, "-m", "fl_rpn.cli.train", "model=mbv3_fpn", "rpn=sampled", "dataset=coco", f"data_root={work}",
        "device=cpu", "batch_size=1", "num_workers=0", "model.detector.min_size=800", "model.detector.max_size=1333",
        "schedule.max_iters=4", "schedule.log_every=1", "schedule.checkpoint_every=4", "schedule.eval_every=0",
        "eval.evaluators=[]", "seed=0", f"hydra.run.dir={work / 'runs' / 'fl-rpn-0'}",
    ])  # fmt: skip
    assert commands["reference"] == shlex.join([
        sys.executable, str(reference / "train.py"), "--data-path", str(work / "coco"), "--dataset", "coco", "--model",
        "fasterrcnn_mobilenet_v3_large_fpn", "--device", "cpu", "-b", "1", "--epochs", "1", "--workers", "0",
        "--print-freq", "1", "--rpn-score-thresh", "0.0", "--use-v2", "--output-dir",
        str(work / "runs" / "reference-0"),
    ])  # fmt: skip
    for name in ("train2017", "val2017", "annotations/instances_train2017.json"):  # the reference's layout
        assert (work / "coco" / name).is_symlink()
    assert len(json.loads((work / "coco" / "annotations" / "instances_val2017.json").read_text())["images"]) == 1

    tiny = ["model=tiny_fpn", "model.detector.min_size=96", "model.detector.max_size=128"]
    run_script(script, *args, "--repeats", "1", "--no-write", "--json", str(tmp_path / "v.json"), "--", *tiny,
               cache=cache, cwd=tmp_path)  # fmt: skip
    numbers = json.loads((tmp_path / "v.json").read_text())
    assert numbers["iterations"] == 4 and numbers["reference_iterations"] == [4] and numbers["reference_tag"] == tag
    rates = numbers["images_per_second"]
    assert 2 < rates["reference"] <= 20.5 and positive(rates["fl-rpn"])
    assert numbers["ratio"] == pytest.approx(rates["fl-rpn"] / rates["reference"])
    assert positive(numbers["whole_epoch_images_per_second"]["fl-rpn"][0])
    assert 2 < numbers["whole_epoch_images_per_second"]["reference"][0] <= 20.5
    assert " model=tiny_fpn " in numbers["commands"]["fl-rpn"] and "mbv3_fpn" not in numbers["commands"]["fl-rpn"]
    assert (work / "runs" / "fl-rpn-0" / "last.pt").is_file() and (work / "runs" / "reference-0").is_dir()


# -- the other studies ---------------------------------------------------------------------------------------------
def test_prior_init_measure(tmp_path, cache):
    """The prior-probability init starts every anchor at object probability 0.01 and a far smaller loss than the
    plain init (probability 1/2)."""
    data = write_coco128_stand_in(tmp_path / "data")
    proc = run_script(EXPERIMENTS / "prior_init" / "measure.py", "--model", "tiny_fpn", "--images", "2", cache=cache,
                      cwd=tmp_path, env={"FL_RPN_DATA": str(data)})  # fmt: skip
    rows = [line.strip("|").split("|") for line in proc.stdout.splitlines() if line.startswith("| sigmoid")
            or line.startswith("| softmax")]  # fmt: skip
    table = {(form.strip(), prior.strip()): (float(loss), float(p)) for form, prior, loss, p in rows}
    assert set(table) == {(f, p) for f in ("sigmoid", "softmax") for p in ("0.01", "null")}
    for form in ("sigmoid", "softmax"):
        (with_prior, p_prior), (without, p_plain) = table[form, "0.01"], table[form, "null"]
        assert p_prior == pytest.approx(0.01, abs=1e-4) and p_plain == pytest.approx(0.5, abs=0.05)
        assert 0 < with_prior < without / 10


def test_stability_run(tmp_path, cache):
    """One arm for one iteration: its summary says finite, at the requested iteration."""
    out, results = tmp_path / "out", tmp_path / "results.json"
    tiny = [o for o in TINY if not o.startswith("schedule.max_iters=")]  # --iters sets them
    tiny += ["dataset.train.num_images=2", "dataset.val.num_images=1"]
    args = ["--iters", "1", "--arms", "focal_softmax", "--out", str(out), "--results", str(results), *tiny]
    run_script(EXPERIMENTS / "stability" / "run.py", *args, cache=cache, cwd=tmp_path)
    arm = json.loads(results.read_text())["arms"]["focal_softmax"]
    assert arm["returncode"] == 0 and arm["finite"] is True and arm["iteration"] == arm["requested_iterations"] == 1
    assert arm["nonfinite_weights"] == [] and arm["nonfinite_scalars"] == [] and arm["tb_nonfinite"] == []
    assert arm["logged_points"] == 1 and positive(arm["loss_first"]) and (out / "focal_softmax" / "last.pt").is_file()


def test_objectness_scores_of_heads_one_step_from_the_prior_init(tmp_path, cache):
    """A sigmoid shared head and a softmax decoupled head one step after the prior init score every anchor near
    the prior (0.01); the softmax layout pairs each anchor's own (bg, obj) logits (a mix-up would give 1/2)."""
    _, val_images = write_tiny_data(cache)
    runs = {"shared": ["rpn=focal_sigmoid", "rpn.head.kind=shared"],
            "decoupled": ["rpn=focal_softmax", "rpn.head.kind=decoupled"]}  # fmt: skip
    for name, overrides in runs.items():
        run_app(*FAST, "schedule.max_iters=1", *overrides, f"hydra.run.dir={tmp_path / name}", cache=cache,
                cwd=tmp_path)  # fmt: skip
    proc = run_script(EXPERIMENTS / "decoupled_head" / "objectness_scores.py", "--images", str(val_images[0].parent),
                      "--limit", "2", *(str(tmp_path / name) for name in runs), cache=cache, cwd=tmp_path)  # fmt: skip
    assert f"2 images of {val_images[0].parent} ({val_images[0].name} .. {val_images[1].name})" in proc.stdout
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
            for line in proc.stdout.splitlines() if line.startswith(("| shared", "| decoupled")))}  # fmt: skip
    assert rows["shared"][0] == "rpn=focal_sigmoid rpn.head.kind=shared seed=-"
    assert rows["decoupled"][0] == "rpn=focal_softmax rpn.head.kind=decoupled seed=-"
    for _, highest, percentile, above_half, dead in rows.values():
        assert 0.009 < float(percentile) <= float(highest) < 0.015 and above_half == "0"
        never_active, channels = map(int, dead.split("/"))
        assert channels == 64 and 0 <= never_active < channels


def test_trace_steps_records_every_step_and_leaves_the_run_unchanged(tmp_path, cache):
    """Three traced steps of 2 images (6 training images: one pass spans three steps): every step's images, a count
    of positives and a finite objectness gradient norm; the history equals an untraced run's (--compare)."""
    tiny = [*FAST, "schedule.max_iters=3"]
    run_app(*tiny, f"hydra.run.dir={tmp_path / 'plain'}", cache=cache, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    trace = tmp_path / "trace.jsonl"
    script = EXPERIMENTS / "full_batch" / "trace_steps.py"
    run_script(script, "--out", str(trace), "--", *tiny, f"hydra.run.dir={tmp_path / 'traced'}", cache=cache,
               cwd=tmp_path)  # fmt: skip
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [s["iteration"] for s in steps] == [0, 1, 2] and all(s["num_images"] == len(s["images"]) == 2 for s in steps)
    assert len({name for s in steps for name in s["images"]}) == 6  # one pass: every image once
    assert all(s["num_pos"] >= 0 and positive(s["obj_grad_norm"]) and positive(s["loss_objectness"]) for s in steps)
    histories = [str(tmp_path / run / "history.json") for run in ("traced", "plain")]
    proc = run_script(script, "--out", str(trace), "--compare", *histories, cache=cache, cwd=tmp_path)
    assert "3 windows in common" in proc.stdout and "0 differ" in proc.stdout


# -- gpu_check.sh and its summary ------------------------------------------------------------------------------------
def test_collect_runs_copies_finished_runs_without_machine_paths(tmp_path):
    sweep, dest = tmp_path / "ran" / "multirun" / "sweep", tmp_path / "repo" / "study"
    cwd = str(tmp_path / "ran")
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "1" / ".hydra").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(f"hydra:\n  runtime:\n    cwd: {cwd}\n    output_dir: {cwd}/multirun/sweep\n")
    for job in ("0", "1"):
        (sweep / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        (sweep / job / "history.json").write_text("[]")
        (sweep / job / "last.pt").write_bytes(b"checkpoint")
    (sweep / "0" / "metrics.json").write_text(json.dumps({"run_dir": f"{cwd}/multirun/sweep/0"}))
    script = EXPERIMENTS / "collect_runs.py"
    for expected in ("1 finished runs", "0 files written"):  # the second pass finds nothing new
        proc = subprocess.run([sys.executable, script, sweep, dest], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert expected in proc.stdout
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "0/.hydra/overrides.yaml", "0/history.json", "0/metrics.json", "multirun.yaml"]  # fmt: skip
    assert json.loads((dest / "0" / "metrics.json").read_text()) == {"run_dir": "./multirun/sweep/0"}
    assert cwd not in (dest / "multirun.yaml").read_text()


def test_gpu_check_summary_judges_each_target(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    files = {
        "syncs.json": {"syncs": {"sampled": {"total": 3, "by_owner": {"torch": 3}},
                                 "focal_softmax": {"total": 4, "by_owner": {"fl_rpn": 2, "torch": 2}}}},
        "rpn_loss.json": {"ms_per_million_anchors": {"1000000": {"focal_sigmoid": 0.5, "focal_softmax": 1.5}}},
        "train_step.json": {"model": "r50_fpn", "size": [800, 1333], "batch": 8, "base": "sampled",
                            "time_ratio_paired": {"focal_softmax": 1.01}, "memory_ratio": {"focal_softmax": 1.1}},
        "throughput.json": {"model": "r50_fpn", "images_per_second": {"bf16": 45.0, "fp32": 20.0},
                            "loader_wait_ms": 0.5},
        "demo_metrics.json": {"provenance": {"hardware": "GPU X"}, "bbox/AP": 0.7, "train/iterations": 600,
                              "train/images_per_second": 100.0},
    }  # fmt: skip
    for name, content in files.items():
        (out / name).write_text(json.dumps(content))
    steps = tmp_path / "steps.txt"
    steps.write_text("pytest 0 20\nrpn_loss 0 9\ntrain_step 124 75\nthroughput_compile skipped 0\n")
    xml = tmp_path / "pytest.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="0" errors="0" skipped="1"/></testsuites>')

    def summary(tiny):
        command = [sys.executable, BENCH / "gpu_check_summary.py", out, steps, xml, "--tiny", tiny]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout

    text = summary("0")
    for row in ["| pytest | ok | 20 |", "| train_step | FAILED (exit 124) | 75 |",
                "| throughput_compile | skipped (budget) | 0 |",
                "| (a) pytest -m cuda | 4 passed, 0 failed, 1 skipped | all pass | met |",
                "| host syncs in one step, sampled | 3 ({'torch': 3}) | fl_rpn <= 1 | met |",
                "| host syncs in one step, focal_softmax | 4 ({'fl_rpn': 2, 'torch': 2}) | fl_rpn <= 1 | MISSED |",
                "| (b) RPN loss focal_sigmoid, 1,000,000 anchors | 0.500 ms per 1M anchors | < 1 | met |",
                "| (b) RPN loss focal_softmax, 1,000,000 anchors | 1.500 ms per 1M anchors | < 1 | MISSED |",
                "| (c) step time focal_softmax / sampled, r50_fpn 800x1333 batch 8 | 1.010x | <= 1.02x | met |",
                "| (c) step peak memory focal_softmax / sampled | 1.100x | <= 1.05x | MISSED |",
                "| (d) r50_fpn images/s, bf16 | 45.0 | >= 40 | met |",
                "| (d) r50_fpn images/s, fp32 | 20.0 | >= 40 | MISSED |",
                "| (d) loader: wait per step after the first | 0.5 ms | ~0 | see log |",
                "| (e) demo on GPU X: bbox/AP | 0.700 | CPU run 0.678 | compare |",
                "| (e) demo on GPU X: bbox/AP50 | nan | CPU run 0.847 | compare |",
                "| (e) demo: iterations, images/s | 600, 100.0 | CPU run 600, 16.6 | compare |"]:  # fmt: skip
        assert row in text, row
    dry = summary("1")
    assert dry.startswith("## gpu_check summary (dry run at tiny sizes: targets not judged)")
    assert "| (b) RPN loss focal_softmax, 1,000,000 anchors | 1.500 ms per 1M anchors | < 1 | dry run |" in dry
    assert "| (a) pytest -m cuda | 4 passed, 0 failed, 1 skipped | all pass | met |" in dry  # judged even then


GPU_CHECK = BENCH / "gpu_check.sh"
# gpu_check.sh's $PYTHON: records each command; runs the summary (standard library only) for real
STAND_IN = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$STAND_IN_LOG"
case "$*" in *gpu_check_summary.py*) exec "$REAL_PYTHON" "$@" ;; esac
"""


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_check_sh_parses_and_its_cpu_dry_run_wires_every_step(tmp_path):
    assert subprocess.run(["bash", "-n", GPU_CHECK], capture_output=True, timeout=30).returncode == 0
    usage = subprocess.run(["bash", GPU_CHECK, "--help"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and "--device cpu" in usage.stdout and "set -uo" not in usage.stdout
    wrong = subprocess.run(["bash", GPU_CHECK, "--gpu"], capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 2 and "unknown argument --gpu" in wrong.stderr

    stand_in, log, out = tmp_path / "python", tmp_path / "commands.txt", tmp_path / "out"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stand_in), "STAND_IN_LOG": str(log), "REAL_PYTHON": sys.executable,
           "OUT": str(out)}  # fmt: skip
    proc = subprocess.run(["bash", GPU_CHECK, "--device", "cpu"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    commands = log.read_text().splitlines()
    steps = {"pytest": "-m pytest -q -m cuda ", "syncs": "sync_count.py", "rpn_loss": "rpn_loss.py",
             "train_step": "train_step.py", "throughput": "--arms fp32,bf16,bf16+cl", "demo": "-m fl_rpn.cli.train",
             "throughput_compile": "--arms bf16+cl+compile", "summary": "gpu_check_summary.py"}  # fmt: skip
    ran = [next(name for name, key in steps.items() if key in c) for c in commands if not c.startswith("-c ")]
    assert ran == list(steps)  # every step, in order, after the version line (-c)
    for command in commands:
        for word in command.split():
            if word.endswith((".py", ".sh")):
                assert (ROOT / word).is_file(), f"gpu_check.sh runs {word}, which does not exist"
        if "benchmarks/" in command and "summary" not in command:
            assert "--device cpu" in command and ("--model tiny_fpn" in command or "rpn_loss.py" in command), command
    demo = next(c for c in commands if "-m fl_rpn.cli.train" in c)
    assert "device=cpu" in demo and "schedule.max_iters=4" in demo and "model.detector.min_size=96" in demo
    summary = (out / "summary.md").read_text()
    assert summary.startswith("## gpu_check summary (dry run at tiny sizes: targets not judged)")
    assert all(f"| {name} | ok |" in summary for name in steps if name != "summary")
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "summary.md"]  # the stand-in wrote no JSON
