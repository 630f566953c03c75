"""Training-stability and gradient-conflict diagnostics of the RPN's two loss terms.

Window statistics, per logging window of per-step losses (``loss_rpn_box_reg`` as ``box``, ``loss_objectness`` as
``obj``; skipped steps are left out):

- ``cv``: coefficient of variation, the sample standard deviation (n - 1) over the mean.
- ``spikes``: steps whose loss is above ``k`` times its running median, the median of the ``median_window`` steps
  before it (a fixed-length past window, carried across logging windows and resumes: a median over every past step
  would be dominated by the high losses of the first iterations and miss the spikes of later ones, where the loss
  has fallen).
- ``max_spike``: the largest ratio of a step's loss to its running median in the window (a spike when above ``k``).

Gradient conflict, every ``probe_every`` iterations, on the layers both terms reach: the cosine between the
gradients of the objectness and the box loss, flattened over those parameters, and the norm ratio
``|grad L_box| / |grad L_obj|``. Groups (``shared_parameter_groups``): ``shared`` all of them, i.e. the trainable
backbone + FPN and, for a shared head, its conv tower (``model.rpn.head.conv``); ``backbone`` the backbone + FPN
only (the same layers for every head, the comparison between heads); ``head`` the shared head's conv tower only
(none in a decoupled head). A probe costs two backward passes from the two RPN losses to the shared layers
(``torch.autograd.grad(..., retain_graph=True)``) on that iteration only; it is off unless ``probe_every`` > 0.
Under DDP each rank probes its own batch and the logged values are the mean over ranks.
"""

import math
import statistics
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check, check_bool, check_int, check_number
from .distributed import all_reduce_mean
from .hooks import HookBase, TrainState

__all__ = [
    "coefficient_of_variation", "spike_ratios", "window_statistics", "loss_gradients", "cosine_and_norm_ratio",
    "gradient_conflict", "shared_parameter_groups", "StabilityMonitor", "TERMS", "check_stability_config",
]  # fmt: skip

TERMS = {"box": "loss_rpn_box_reg", "obj": "loss_objectness"}  # logged name -> loss key of the step


def check_stability_config(st) -> None:
    """The ``stability`` node: on or off, the spike factor and median window, and the probe period (which needs it
    on)."""
    check_bool("stability.enabled", st.enabled)
    check_number("stability.spike_k", st.spike_k, lambda v: v > 1, "> 1")
    check_int("stability.median_window", st.median_window, 1)
    check_int("stability.probe_every", st.probe_every, 0)
    check(st.enabled or not st.probe_every, "stability.probe_every", st.probe_every, "needs stability.enabled=true")


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Sample standard deviation / mean of ``values``; nan for fewer than 2 values or a zero mean."""
    if len(values) < 2:
        return math.nan
    mean = statistics.fmean(values)
    return statistics.stdev(values) / mean if mean != 0 else math.nan


def spike_ratios(values: Sequence[float], past: Sequence[float] = (), median_window: int = 50) -> list[float]:
    """Per value, its ratio to the median of the ``median_window`` values before it (``past``, the older steps,
    then ``values``); nan for a value with no step before it, or a median of 0."""
    previous = deque(past, maxlen=median_window)
    ratios = []
    for v in values:
        median = statistics.median(previous) if previous else 0.0
        ratios.append(v / median if median > 0 else math.nan)
        previous.append(v)
    return ratios


def window_statistics(
    values: Sequence[float], past: Sequence[float] = (), *, k: float = 3.0, median_window: int = 50
) -> dict[str, float]:
    """``{"cv", "spikes", "max_spike"}`` of one logging window ``values`` (see the module docstring); ``past``: the
    steps before the window, oldest first."""
    ratios = [r for r in spike_ratios(values, past, median_window) if not math.isnan(r)]
    return {
        "cv": coefficient_of_variation(values),
        "spikes": float(sum(r > k for r in ratios)),
        "max_spike": max(ratios, default=math.nan),
    }


def loss_gradients(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """``d loss / d p`` for each of ``params`` (zeros where ``loss`` does not reach ``p``); the graph is kept."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def cosine_and_norm_ratio(grads_obj: Sequence[Tensor], grads_box: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The cosine between the two gradients, each flattened over all its tensors, and ``|g_box| / |g_obj|``
    (0-d float64 tensors; no host sync). Zero gradients give a cosine of 0 (and a ratio of inf or nan)."""
    dot = sum((a.double() * b.double()).sum() for a, b in zip(grads_obj, grads_box))
    norm_obj = torch.sqrt(sum(a.double().square().sum() for a in grads_obj))
    norm_box = torch.sqrt(sum(b.double().square().sum() for b in grads_box))
    return dot / (norm_obj * norm_box).clamp(min=1e-300), norm_box / norm_obj


def gradient_conflict(
    loss_obj: Tensor, loss_box: Tensor, groups: dict[str, Sequence[Tensor]]
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{group: (cosine, norm_ratio)}`` of the objectness and box losses' gradients over each group of parameters
    (one pair of ``torch.autograd.grad`` calls over their union; the graph is kept for the step's backward)."""
    params = list({id(p): p for group in groups.values() for p in group}.values())
    if not params:
        return {}
    index = {id(p): i for i, p in enumerate(params)}
    g_obj, g_box = loss_gradients(loss_obj, params), loss_gradients(loss_box, params)
    result = {}
    for name, group in groups.items():
        if group:
            at = [index[id(p)] for p in group]
            result[name] = cosine_and_norm_ratio([g_obj[i] for i in at], [g_box[i] for i in at])
    return result


def shared_parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trainable layers both RPN losses reach: ``{"shared": backbone + FPN + head tower, "backbone": backbone
    + FPN, "head": the head's shared tower}``; ``head`` is empty for a decoupled head (no ``head.conv``)."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    tower = getattr(model.rpn.head, "conv", None)
    head = [p for p in tower.parameters() if p.requires_grad] if tower is not None else []
    return {"shared": backbone + head, "backbone": backbone, "head": head}


class StabilityMonitor(HookBase):
    """Logs the window statistics (``stability/box_cv``, ``stability/box_spikes``, ``stability/box_max_spike`` and
    the same for ``obj``) in each logging window's history entry (``state.log_scalars``, which the
    ``MetricsLogger`` after it writes) and TensorBoard, and, with ``probe_every`` > 0, the mean of the window's
    probes (``conflict/cosine``, ``conflict/norm_ratio`` for all shared layers, ``conflict/backbone_...`` and
    ``conflict/head_...``).

    The probe runs before the step's backward pass (``TrainStep.before_backward``), on the iterations ``i`` with
    ``(i + 1) % probe_every == 0`` (those whose finished-iteration count is a multiple of ``probe_every``). Its state
    (the past window of the running medians) is kept in the checkpoint.
    """

    name = "stability"

    def __init__(self, *, k: float = 3.0, median_window: int = 50, probe_every: int = 0) -> None:
        self.k, self.median_window, self.probe_every = k, median_window, probe_every
        self.window: dict[str, list[Tensor]] = {t: [] for t in TERMS}  # this window's losses, on the device
        self.past: dict[str, deque] = {t: deque(maxlen=median_window) for t in TERMS}  # host floats, oldest first
        self.probes: dict[str, list[Tensor]] = {}
        self.groups: dict[str, list[nn.Parameter]] = {}
        self.scaler = None

    def before_train(self, state: TrainState) -> None:
        if self.probe_every > 0:
            self.groups = shared_parameter_groups(state.model)
            self.scaler = state.scaler
            state.step.before_backward.append(self.probe)

    def probe(self, losses: dict[str, Tensor], iteration: int) -> None:
        """Before the step's backward pass: the gradient conflict of this step's losses on a probe iteration."""
        if (iteration + 1) % self.probe_every:
            return
        # under fp16 the losses are scaled as the step's backward scales them (cosine and ratio do not change)
        obj, box = (self.scaler.scale(losses[TERMS[t]]) for t in ("obj", "box"))
        for group, (cosine, ratio) in gradient_conflict(obj, box, self.groups).items():
            prefix = "" if group == "shared" else f"{group}_"
            self.probes.setdefault(f"conflict/{prefix}cosine", []).append(cosine.detach())
            self.probes.setdefault(f"conflict/{prefix}norm_ratio", []).append(ratio.detach())

    def after_step(self, state: TrainState) -> None:
        out = state.output
        if not out.skipped:
            for t, key in TERMS.items():
                self.window[t].append(out.losses[key].detach())
        if not state.log_now:
            return
        scalars = {}
        if self.window["box"]:
            values = torch.stack([torch.stack(self.window[t]).double() for t in TERMS]).tolist()  # one host sync
            if state.dist_info.enabled:  # the statistics of the mean loss over ranks, step by step
                flat = {f"{t}{i}": v for t, row in zip(TERMS, values) for i, v in enumerate(row)}
                flat = all_reduce_mean(flat, state.dist_info)
                values = [[flat[f"{t}{i}"] for i in range(len(row))] for t, row in zip(TERMS, values)]
            for t, row in zip(TERMS, values):
                stats = window_statistics(row, self.past[t], k=self.k, median_window=self.median_window)
                scalars.update({f"stability/{t}_{name}": v for name, v in stats.items()})
                self.past[t].extend(row)
                self.window[t] = []
        if self.probes:
            means = torch.stack([torch.stack(v).mean() for v in self.probes.values()]).tolist()
            scalars.update(all_reduce_mean(dict(zip(self.probes, means)), state.dist_info))
            self.probes = {}
        state.log_scalars.update(scalars)
        state.add_scalars(scalars, state.iteration)

    def state_dict(self) -> dict[str, Any]:
        return {"past": {t: list(v) for t, v in self.past.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for t, values in state.get("past", {}).items():
            if t in self.past:
                self.past[t].extend(values)
