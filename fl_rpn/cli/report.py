"""``fl-rpn-report <multirun dir> [...]``: a sweep's runs -> report.md, runs.csv, summary.csv and plots
(``fl_rpn.report``)."""

import argparse
import math
import sys
from pathlib import Path

from ..report import DEFAULT_METRICS, report
from ..report import __doc__ as REPORT_DOC


def parser() -> argparse.ArgumentParser:
    """The command line of ``fl-rpn-report`` (tests/test_docs.py parses the documented ones with it)."""
    parser = argparse.ArgumentParser(prog="fl-rpn-report", description=REPORT_DOC.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="multirun directories (or any folders of runs)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the first dir)")
    parser.add_argument("--baseline", default="rpn=sampled", help="the arm differences are taken against")
    parser.add_argument("--metrics", nargs="*", default=list(DEFAULT_METRICS))
    parser.add_argument(
        "--effect", type=float, default=0.4, help="the effect (AP / AR points) the power analysis asks about (0.4)"
    )
    parser.add_argument(
        "--where", action="append", default=[], metavar="KEY=V1,V2",
        help="only the runs whose override KEY is one of the values (repeatable: every --where must hold)",
    )  # fmt: skip
    return parser


def parse_where(items: list[str]) -> dict[str, list[str]]:
    """``["seed=0,1,2", "rpn=sampled"]`` -> ``{"seed": ["0", "1", "2"], "rpn": ["sampled"]}``."""
    where = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not (sep and key and values) or key in where:
            raise ValueError(f"--where {item}: expected KEY=V1,V2,... with each key once")
        where[key] = values.split(",")
    return where


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if not (math.isfinite(args.effect) and args.effect > 0):
        sys.exit(f"fl-rpn-report: --effect {args.effect}: must be a number > 0 (points)")
    try:
        report(args.dirs, args.out, args.metrics, args.baseline, args.effect, parse_where(args.where))
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"fl-rpn-report: {err}")


if __name__ == "__main__":
    main()
