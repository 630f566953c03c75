"""Shared helpers of the benchmark scripts: provenance, interleaved timing, peak memory, RESULTS.md.

Every script compares its arms in one process, interleaved (A B C A B C ..., the starting arm rotated
each round), and reports medians, so that a background load slows every arm alike and the ratios stay
meaningful even when the absolute numbers move.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision

from fl_rpn.engine.build import Trainable, build_trainable
from fl_rpn.provenance import git_commit

_DEFAULT_THREADS = torch.get_num_threads()  # at import, before any script sets it
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "RESULTS.md"


# ---------------------------------------------------------------------------------------------- provenance


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"
    except OSError:
        return "unknown"


def hardware(device: torch.device) -> str:
    threads = torch.get_num_threads()
    default = "torch's default" if threads == _DEFAULT_THREADS else "set by --threads"
    omp = os.environ.get("OMP_NUM_THREADS")
    default += f", OMP_NUM_THREADS={omp}" if omp else ""
    cpu = f"CPU {cpu_model()}, {os.cpu_count()} cores, torch threads {threads} ({default})"
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}; host {cpu}"
    return cpu + "; no GPU"


def command_line() -> str:
    """The command as typed from the repository root (paths inside it relative, the home folder as ``~``)."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_str = str(script.relative_to(REPO))
    except ValueError:
        script_str = script.name

    def shown(arg: str) -> str:
        return arg.replace(f"{REPO}/", "").replace(str(REPO), ".").replace(str(Path.home()), "~")

    return " ".join(["python", shlex.quote(script_str), *(shown(shlex.quote(a)) for a in sys.argv[1:])])


def file_digest(path: str | Path) -> str:
    """The first 12 hex digits of a file's SHA-256: which copy of a dataset a number was measured on."""
    import hashlib

    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:12]


def provenance_lines(device: torch.device, load_before: str, load_after: str | None = None) -> list[str]:
    lines = [
        f"- command: `{command_line()}`",
        f"- commit: `{git_commit()}`",
        f"- hardware: {hardware(device)}",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}"
        + (f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}" if device.type == "cuda" else ""),
        f"- load average at start: {load_before}" + (f"; at end: {load_after}" if load_after else ""),
        f"- date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}",
    ]
    return lines


def select_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- what trains


def trainer_parts(
    cfg, num_classes: int, device: torch.device, seed: int, load_backbone_weights: bool = True
) -> Trainable:
    """The trainer's model, optimizer, lr schedule, scaler and ``TrainStep`` for the composed config ``cfg``
    (``fl_rpn.engine.build.build_trainable``: speed options, anchor diagnostics, amp, clipping, non-finite handling
    all from ``cfg``), built after ``torch.manual_seed(seed)``, so that every arm of the same seed starts from the
    same weights.

    Unlike the trainer's first iteration, every parameter group's lr is the base one (the schedule's value after
    its warm-up): a benchmark steps no schedule, and the warm-up's first factor would leave the weights, hence the
    proposals, almost still. ``load_backbone_weights=False``: a pretrained backbone's layout (frozen BatchNorm,
    trainable layers) without reading its weights.
    """
    torch.manual_seed(seed)
    parts = build_trainable(cfg, num_classes, device=device, load_backbone_weights=load_backbone_weights)
    for group in parts.optimizer.param_groups:
        group["lr"] = group["initial_lr"]
    parts.model.train()
    return parts


# ---------------------------------------------------------------------------------------------- timing


def interleaved_times(
    arms: dict[str, Callable[[], object]],
    rounds: int,
    device: torch.device,
    inner: int = 1,
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Seconds per call of each arm: ``rounds`` samples each, arms interleaved, start arm rotated.

    A sample times ``inner`` back-to-back calls and records their mean (so short calls are timed
    over a block longer than the timer's and the scheduler's granularity).
    """
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn = arms[name]
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            synchronize(device)
            times[name].append((time.perf_counter() - t0) / inner)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def iqr(xs: Sequence[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return q[0], q[2]


def shut_down(batches) -> None:
    """Stop the DataLoader workers behind a batch iterator (``TrainStream.from_iteration``) now.

    Needed on every exit path: the workers ignore SIGTERM (``fl_rpn.data.build.ignore_sigterm``), so a worker
    left running when the script ends (e.g. by an exception) keeps the interpreter waiting for it forever.
    """
    for name in ("close", "_shutdown_workers"):  # a generator wrapping the loader, or the loader's own iterator
        if hasattr(batches, name):
            getattr(batches, name)()
            return


# ---------------------------------------------------------------------------------------------- memory


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensor memory that ``fn()`` allocates above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` (the caching allocator's own count).
    CPU: torch's allocator is not observable by ``tracemalloc``; we record every allocation and
    free of tensor storage with ``torch.profiler(profile_memory=True)`` and take the maximum of the
    running sum of bytes allocated inside ``fn()`` and not yet freed, in time order.
    """
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocations.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
    allocations.sort()
    # Only blocks allocated inside fn() count: the profiler also reports frees of blocks it saw in an
    # earlier profiling session (e.g. last call's gradients), which would make the running sum negative.
    live: dict[int, int] = {}
    running = peak = 0
    for _, ptr, size in allocations:
        if size > 0:
            live[ptr] = size
            running += size
        elif ptr in live:
            running -= live.pop(ptr)
        peak = max(peak, running)
    return peak


def count_large_ops(fn: Callable[[], object], min_numel: int) -> int:
    """How many ATen ops ``fn()`` runs that read or write a tensor of at least ``min_numel`` elements.

    Views (ops whose result aliases an input without writing it) are not counted. A load-independent
    cost proxy: each such op is at least one pass over memory, and on a contended CPU each parallel op
    also pays a thread-barrier wait.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class _Count(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            returns = func._schema.returns
            is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in returns)
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            if not is_view and any(t.numel() >= min_numel for t in tensors):
                _Count.count += 1
            return out

    with _Count():
        fn()
    return _Count.count


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


# ---------------------------------------------------------------------------------------------- RESULTS.md

_HEADER = """# fl-rpn benchmarks

Each section below is written by the script it names (between its BEGIN / END markers; re-running the
script replaces that block only) and is followed by a hand-written analysis. Every script compares its
arms in one process, interleaved, and reports medians; numbers are only comparable within a section.
"""


def read_section(name: str, results: Path = RESULTS) -> str | None:
    """The ``name`` block of RESULTS.md (markers included), or None when there is none."""
    text = results.read_text() if results.exists() else ""
    match = re.search(re.escape(f"<!-- BEGIN {name} ") + r".*?" + re.escape(f"<!-- END {name} -->"), text, re.S)
    return match.group(0) if match else None


def write_section(name: str, title: str, body_lines: list[str], script: str | None = None,
                  results: Path = RESULTS) -> None:  # fmt: skip
    """Replace (or append) the ``name`` block of RESULTS.md, keeping everything outside it."""
    begin = f"<!-- BEGIN {name} (generated by {script or name + '.py'}) -->"
    end = f"<!-- END {name} -->"
    block = "\n".join([begin, f"## {title}", "", *body_lines, end])
    text = results.read_text() if results.exists() else _HEADER
    pattern = re.compile(re.escape(f"<!-- BEGIN {name} ") + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    results.write_text(text)
    print(f"updated {results.relative_to(REPO) if results.is_relative_to(REPO) else results.name} [{name}]")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def wait_for_quiet(max_load: float, max_wait_s: float) -> str:
    """Sleep until the 1-minute load average is below ``max_load`` (or ``max_wait_s`` passed)."""
    t0 = time.monotonic()
    while True:
        try:
            one = os.getloadavg()[0]
        except OSError:
            return "unknown"
        if one < max_load or time.monotonic() - t0 >= max_wait_s:
            return load_average()
        print(f"load {one:.2f} >= {max_load}; waiting ...", flush=True)
        time.sleep(15)


def add_common_arguments(parser, threads: bool = True) -> None:
    """The options every benchmark shares: ``--seed``, ``--wait-for-load``, ``--max-load``, ``--no-write`` and,
    with ``threads``, ``--threads``."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--wait-for-load",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the 1-min load average to drop below --max-load",
    )
    parser.add_argument("--max-load", type=float, default=1.0)
    if threads:
        parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave torch's default)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--json", metavar="PATH", help="also write the key numbers to PATH (gpu_check.sh reads them)")


def write_numbers(path: str | None, device: torch.device, numbers: dict) -> None:
    """``--json PATH``: ``numbers`` with the device and commit, for a script that collects results."""
    if path:
        import json

        name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
        record = {"device": name, "commit": git_commit(), "command": command_line(), **numbers}
        Path(path).write_text(json.dumps(record, indent=1) + "\n")
