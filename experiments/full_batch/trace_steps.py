"""Trace every training step of one run: its images, N_pos, losses and the objectness gradient norm.

Runs ``fl-rpn-train`` with the given overrides, unchanged, and appends one JSON line per step to ``--out``:

- ``iteration``: the step's index (0-based; the history's ``iteration`` counts finished steps, so this step is in the
  window logged at ``iteration + 1`` rounded up to ``log_every``);
- ``images``: the source ids (VOC id, YOLO stem; else the file name) of the step's images, in batch order;
- ``num_pos``: positive anchors of the batch (labels 1), ``num_images``;
- ``loss_objectness``, ``loss_rpn_box_reg``;
- ``obj_grad_norm``: the L2 norm of the gradient of ``loss_objectness`` over every trainable parameter, taken
  before the step's backward pass (``torch.autograd.grad``, which leaves ``.grad`` and the training untouched).

The batch's images are recorded by watching the dataset's ``__getitem__``, so ``num_workers=0`` is required (the
loader then fetches each batch when the step asks for it). The training itself is the plain run's: the history of
a traced run equals the untraced one's, which ``--compare`` checks against a committed ``history.json``.

    python experiments/full_batch/trace_steps.py --out trace.jsonl -- seed=2 rpn=focal_softmax ...
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from fl_rpn.data.dataset import DetectionDataset
from fl_rpn.engine.hooks import HookBase

try:  # where the run's hooks are built: engine/build.py, or engine/trainer.py before the build / run split
    from fl_rpn.engine import build as hook_builder
except ImportError:
    from fl_rpn.engine import trainer as hook_builder


class StepTracer(HookBase):
    """Writes one JSON line per step to ``path`` (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = None
        self.fetched: list[str] = []  # source ids of the images fetched since the last step
        self.obj_grad_norm = math.nan

    def before_train(self, state) -> None:
        self.file = self.path.open("a")
        self.params = [p for p in state.model.parameters() if p.requires_grad]
        if isinstance(state.step.before_backward, list):
            state.step.before_backward.append(self.probe)
        else:  # before the engine's build / run split (commit 1360332, where the mechanism was traced): one callable
            state.step.before_backward = self.probe

    def probe(self, losses, iteration) -> None:
        grads = torch.autograd.grad(losses["loss_objectness"], self.params, retain_graph=True, allow_unused=True)
        self.obj_grad_norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))

    def after_step(self, state) -> None:
        out = state.output
        num_images = len(self.fetched)
        per_image = out.scalars.get("rpn/positive_anchors_per_image")
        record = {
            "iteration": state.iteration - 1,
            "images": self.fetched,
            "num_images": num_images,
            "num_pos": None if per_image is None else round(float(per_image) * num_images),
            "loss_objectness": float(out.losses["loss_objectness"]),
            "loss_rpn_box_reg": float(out.losses["loss_rpn_box_reg"]),
            "obj_grad_norm": self.obj_grad_norm,
        }
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.fetched, self.obj_grad_norm = [], math.nan

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def compare_histories(ours: Path, committed: Path) -> None:
    """Exit 1 unless every logged window of ``ours`` equals the committed run's at the same iteration."""
    a = {h["iteration"]: h for h in json.loads(ours.read_text())}
    b = {h["iteration"]: h for h in json.loads(committed.read_text())}
    shared = sorted(set(a) & set(b))
    differ = [i for i in shared if {k: a[i][k] for k in a[i] if k in b[i]} != {k: b[i][k] for k in a[i] if k in b[i]}]
    print(f"history: {len(shared)} windows in common with {committed}; {len(differ)} differ {differ[:5]}")
    sys.exit(1 if differ or not shared else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON-lines file to append to")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("HISTORY", "COMMITTED"),
                        help="only compare two history.json files window by window, then exit")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="fl-rpn-train's overrides (num_workers=0 is added)")
    args = parser.parse_args()
    if args.compare:
        compare_histories(*args.compare)

    tracer = StepTracer(args.out)
    get_item = DetectionDataset.__getitem__

    def watched(self, index):
        record = self.records[index]
        if self.train:
            tracer.fetched.append(record.source_id or record.file.name)
        return get_item(self, index)

    DetectionDataset.__getitem__ = watched
    build_hooks = hook_builder.build_hooks
    hook_builder.build_hooks = lambda *a, **k: [*build_hooks(*a, **k), tracer]

    from fl_rpn.cli.train import main as train_main

    sys.argv = ["fl-rpn-train", *args.overrides, "num_workers=0"]
    train_main()


if __name__ == "__main__":
    main()
