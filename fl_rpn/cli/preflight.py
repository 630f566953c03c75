"""What every Hydra command (``fl-rpn-train``, ``-eval``, ``-predict``, ``-export``, ``-check-data``) does before Hydra
runs: its own ``--help``, an unknown override key named with the nearest existing one, and a run directory that can
be written. Each failure is one line on stderr and exit status 1, before Hydra composes, logs or writes anything.
"""

from __future__ import annotations

import difflib
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from ..config import CONF_DIR

# every console script of the package, as the help of each lists its siblings
COMMANDS = {
    "fl-rpn-train": "train a detector, evaluate it, write metrics.json (no arguments: the CPU demo)",
    "fl-rpn-eval": "evaluate a checkpoint (on the data it was trained on, unless dataset=... says otherwise)",
    "fl-rpn-predict": "draw a checkpoint's detections (and RPN proposals) on images",
    "fl-rpn-export": "a checkpoint as plain torchvision, torch.export, TorchScript or ONNX",
    "fl-rpn-check-data": "read both splits of a dataset config and decode every image, before a long run",
    "fl-rpn-report": "a sweep's runs -> tables with paired intervals, power, plots",
    "fl-rpn-weights": "fetch torchvision's ImageNet MobileNetV2 weights into torch's cache (offline use)",
}
# the groups a user picks (conf/<group>/<option>.yaml), and what each one sets
GROUPS = {
    "scale": "a preset of dataset + model + schedule + image size + batch for one setting: start here",
    "dataset": "the data alone (format, paths, classes); model and schedule stay as they are",
    "model": "backbone and detector (tiny_fpn from scratch; r50_fpn, mbv3_fpn, mbv2_fpn pretrained)",
    "rpn": "the RPN loss: focal_softmax (default), focal_sigmoid, sampled (torchvision's own), controls",
    "schedule": "iterations, warm-up, lr steps, logging, checkpoints, evaluation (smoke: a short whole run)",
    "eval": "the metrics: COCO AP, VOC07 mAP, proposal recall",
    "optim": "the optimizer (SGD with the linear lr-scaling rule)",
    "experiment": "a sweep of the paper's ablations, run with -m",
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def help_text(prog: str, summary: str, examples: list[str], groups: list[str]) -> str:
    """The ``--help`` page of ``prog``: what it does, the groups it takes with their options, examples, siblings."""
    width = max(len(g) for g in groups) if groups else 0
    lines = [f"{prog}: {summary}", "", f"usage: {prog} [GROUP=OPTION ...] [KEY=VALUE ...]", ""]
    if groups:
        lines.append("Groups (one option each; e.g. rpn=sampled):")
        for group in groups:
            lines.append(f"  {group:<{width}}  {GROUPS[group]}")
            lines.append(f"  {'':<{width}}    {', '.join(options(group))}")
        lines.append("")
    lines += ["Examples:", *(f"  {e}" for e in examples), ""]
    lines.append(f"Every key and its value: {prog} --cfg job [overrides]. Hydra's own options: {prog} --hydra-help.")
    lines += ["", "Commands:", *(f"  {name:<18} {what}" for name, what in COMMANDS.items())]
    return "\n".join(lines)


def flat_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Every key path of ``node`` (``rpn.gamma``, ``dataset.train.root``, ...), interpolations left unresolved."""
    keys = []
    for key in node.keys():
        path = f"{prefix}{key}"
        keys.append(path)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            keys += flat_keys(child, f"{path}.")
    return keys


def nearest_keys(bad: str, keys: list[str]) -> list[str]:
    """Existing keys that look like ``bad``: first among its siblings (``rpn.gama`` -> ``rpn.gamma``), else all."""
    parent = bad.rpartition(".")[0]
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    return difflib.get_close_matches(bad, siblings, n=1, cutoff=0.6) or difflib.get_close_matches(bad, keys, n=1)


def _overrides(argv: list[str]):
    """``(overrides, multirun)`` of a Hydra command line, or None when Hydra's parser does not take it."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        args = get_args_parser().parse_args(argv)
        return OverridesParser.create().parse_overrides(args.overrides), bool(args.multirun)
    except (SystemExit, Exception):  # Hydra reports what it cannot parse, as it always has
        return None


def unknown_key_message(prog: str, config_name: str, overrides) -> str | None:
    """The message for an override of a key the composed config does not have, or None."""
    from hydra.errors import ConfigCompositionException

    from ..config import compose_config

    lines = []
    for o in overrides:
        key = o.get_key_element()
        if key.startswith("hydra") or o.is_add() or o.is_delete() or o.is_force_add():
            continue
        value = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else o.get_value_element_as_str()
        lines.append((key, f"{key}={value}"))
    try:
        compose_config([line for _, line in lines], config_name=config_name)
        return None
    except ConfigCompositionException as err:
        text = str(err)
    except Exception:  # another problem: Hydra reports it as it always has
        return None
    bad = next((key for key, _ in lines if f"Could not override '{key}'" in text), None)
    if bad is None:
        return None
    try:
        cfg = compose_config([line for key, line in lines if key != bad], config_name=config_name)
    except Exception:
        return None
    near = nearest_keys(bad, flat_keys(cfg))
    hint = f"did you mean {near[0]}? " if near else ""
    return (f"{prog}: unknown config key {bad} ({hint}{prog} --cfg job lists every key; "
            f"{prog} --help the groups)")  # fmt: skip


def run_dir_problem(prog: str, overrides, multirun: bool) -> str | None:
    """Why the run directory cannot be written, or None. It is ``hydra.run.dir`` (``hydra.sweep.dir`` with -m) as
    given, or, for a default or interpolated one, the current folder it is made under; a folder that does not exist
    yet is checked at its nearest existing parent."""
    name = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = next((o.get_value_element_as_str() for o in overrides if o.get_key_element() == name), None)
    folder = Path(given).expanduser() if given and "${" not in given else Path.cwd()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        return (f"{prog}: cannot write the run directory {folder} ({err.strerror or err}): choose a writable one "
                f"with {name}=DIR (to go on from a checkpoint there: resume=PATH/last.pt {name}=DIR)")  # fmt: skip
    return None


def preflight(prog: str, config_name: str, summary: str, examples: list[str], groups: list[str]) -> None:
    """Print the help and exit 0 on ``--help``; exit 1 with one line on an unknown key or an unwritable run
    directory. Called by each command's ``main`` before its Hydra app."""
    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        print(help_text(prog, summary, examples, groups))
        sys.exit(0)
    parsed = _overrides(argv)
    if parsed is None:
        return
    overrides, multirun = parsed
    problem = run_dir_problem(prog, overrides, multirun) or unknown_key_message(prog, config_name, overrides)
    if problem:
        print(problem, file=sys.stderr, flush=True)
        sys.exit(1)


__all__ = ["COMMANDS", "GROUPS", "help_text", "nearest_keys", "preflight"]
