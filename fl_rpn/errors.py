"""The project's expected errors, and how the console scripts report them: one clear message, a known exit status.

An expected error (a bad config value, a missing or unreadable file, a bad image, a full disk, a non-finite loss,
unavailable pretrained weights) is printed as ``TypeName: message`` on stderr, without the traceback and without
the chained "direct cause" exceptions, and the script exits with status 1. ``HYDRA_FULL_ERROR=1`` keeps the full
trace. Ctrl-C exits with 130; a pre-empted training run (SIGTERM) with 143 (``fl_rpn.cli.train``). Any other exception
is a bug: it is printed with its traceback, as Hydra does. The message (or traceback) is also appended to the
run's log file (``train.log``), and a run directory that holds nothing but Hydra's files is removed.
"""

import functools
import logging
import os
import re
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ERROR_EXIT_CODE = 1
INTERRUPTED_EXIT_CODE = 128 + 2  # what a shell reports for a process killed by SIGINT


class NonFiniteLossError(RuntimeError):
    """A non-finite loss (``nonfinite=stop``), or weights that are no longer finite (``nonfinite=skip``)."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights that cannot be downloaded (offline) and are not in the local cache."""


EXPECTED_ERRORS = (ValueError, OSError, NonFiniteLossError, WeightsUnavailableError)


def error_message(error: BaseException) -> str:
    """``TypeName: message``; an error re-raised from a DataLoader worker gives the worker's own message."""
    name, text = type(error).__name__, str(error)
    if "Original Traceback (most recent call last)" in text:  # torch's ExceptionWrapper: the worker's traceback
        worker = re.match(r"Caught \w+ (in DataLoader worker process \d+)", text)
        lines = text.rstrip().splitlines()
        last = max((i for i, line in enumerate(lines) if re.match(rf"([\w.]+\.)?{name}: ", line)), default=None)
        if last is not None:
            text = "\n".join(lines[last:]).split(": ", 1)[1] + (f" ({worker[1]})" if worker else "")
    return f"{name}: {text}"


def _to_log_files(message: str) -> None:
    """Append ``message`` to the root logger's files only (the console gets it on stderr)."""
    record = logging.LogRecord("fl_rpn", logging.ERROR, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _remove_unused_run_dir() -> None:
    """Remove this Hydra job's run directory if nothing but Hydra's own files (``.hydra/``, the log) is in it."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        run_dir, log_name = Path(hydra_cfg.runtime.output_dir), f"{hydra_cfg.job.name}.log"
    except (ImportError, ValueError):  # not under Hydra
        return
    if not (run_dir / ".hydra").is_dir() or run_dir.resolve() == Path.cwd().resolve():
        return
    if not {p.name for p in run_dir.iterdir()} <= {".hydra", log_name}:
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        if Path(handler.baseFilename).parent == run_dir.resolve():
            root.removeHandler(handler)
            handler.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", run_dir.parent.name):  # Hydra's outputs/<date>/, if now empty
        try:
            run_dir.parent.rmdir()
        except OSError:
            pass


def report_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a Hydra task function: expected errors print one message and exit 1, Ctrl-C exits 130."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            _to_log_files("interrupted (Ctrl-C)")
            _remove_unused_run_dir()
            print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
            sys.exit(INTERRUPTED_EXIT_CODE)
        except EXPECTED_ERRORS as e:
            message = error_message(e)
            _to_log_files(message)
            _remove_unused_run_dir()
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(message, file=sys.stderr, flush=True)
            sys.exit(ERROR_EXIT_CODE)
        except Exception:
            _to_log_files(traceback.format_exc().rstrip())
            _remove_unused_run_dir()
            raise

    return wrapper
