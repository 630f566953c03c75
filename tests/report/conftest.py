"""What the report tests share: hand-made runs (``fake_run``), the report's markdown tables and CSV files read back
(``markdown_table``, ``read_csv``, ``markdown_text``), and the figures the report saves (``saved_figures``)."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from fl_rpn.report import report


def fake_run(root, name, overrides, metrics=None, history=None):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    if history is not None:
        (run / "history.json").write_text(json.dumps(history))


def markdown_table(text, first_header):
    """The markdown table whose header row starts with ``| arm | <first_header>``: {arm: {column: cell}}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| arm | {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def markdown_text(root):
    report([root], metrics=["bbox/AP", "bbox/AP50"])
    return (root / "report.md").read_text()


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures the report saves, by file name, kept after they are written and closed."""
    from matplotlib.figure import Figure

    figures, savefig = {}, Figure.savefig

    def save(fig, path, *args, **kwargs):
        savefig(fig, path, *args, **kwargs)
        figures[Path(path).name] = fig

    monkeypatch.setattr(Figure, "savefig", save)
    return figures
