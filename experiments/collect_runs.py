"""Copy the finished runs of a sweep into this repository: the files ``fl-rpn-report`` reads, machine paths removed.

    python experiments/collect_runs.py multirun/bccd_table_b_full experiments/prcv2018/bccd_table_b_full

Copies every ``multirun.yaml`` and, of each run that has its ``metrics.json`` (finished), ``metrics.json``,
``history.json``, ``eval_history.json`` and ``.hydra/{config,overrides}.yaml`` (no checkpoints, no logs). The
folder the sweep ran in (``hydra.runtime.cwd``) becomes ``.`` and the home folder ``~``, so the copies name no
machine. Run it again as more runs finish: it copies what is new and overwrites what changed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

RUN_FILES = ("metrics.json", "history.json", "eval_history.json", ".hydra/config.yaml", ".hydra/overrides.yaml")


def machine_paths(sweep_root: Path) -> list[tuple[str, str]]:
    """(absolute path, replacement) pairs, longest first: each sweep's working folder, then the home folder."""
    pairs = {str(Path.home()): "~"}
    for multirun in sweep_root.rglob("multirun.yaml"):
        cwd = ((yaml.safe_load(multirun.read_text()) or {}).get("hydra") or {}).get("runtime", {}).get("cwd")
        if cwd:
            pairs[str(cwd)] = "."
    return sorted(pairs.items(), key=lambda kv: -len(kv[0]))


def copy_clean(src: Path, dst: Path, pairs: list[tuple[str, str]]) -> bool:
    """Copy ``src`` to ``dst`` with the machine paths replaced; True when ``dst`` changed."""
    text = src.read_text()
    for path, replacement in pairs:
        text = text.replace(path, replacement)
    if dst.is_file() and dst.read_text() == text:
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text)
    return True


def collect(sweep_root: Path, dest: Path) -> tuple[int, int]:
    """Copy ``sweep_root``'s multirun.yaml files and finished runs into ``dest``; (runs copied, files changed)."""
    pairs = machine_paths(sweep_root)
    runs, changed = 0, 0
    for multirun in sorted(sweep_root.rglob("multirun.yaml")):
        changed += copy_clean(multirun, dest / multirun.relative_to(sweep_root), pairs)
    for metrics in sorted(sweep_root.rglob("metrics.json")):
        run_dir = metrics.parent
        runs += 1
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                changed += copy_clean(run_dir / name, dest / run_dir.relative_to(sweep_root) / name, pairs)
    return runs, changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_root", type=Path, help="a sweep folder, or a folder holding several")
    parser.add_argument("dest", type=Path, help="where the copies go (created if missing)")
    args = parser.parse_args()
    if not args.sweep_root.is_dir():
        raise SystemExit(f"collect_runs: {args.sweep_root} is not a directory")
    runs, changed = collect(args.sweep_root, args.dest)
    print(f"{runs} finished runs under {args.sweep_root}; {changed} files written to {args.dest}")


if __name__ == "__main__":
    main()
