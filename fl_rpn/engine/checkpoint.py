"""Checkpoints: written atomically (temporary file, fsync, rename), read with ``weights_only=True``.

A checkpoint holds ``model``, ``optimizer``, ``scheduler``, ``scaler`` state dicts, ``iteration``
(the number of finished iterations), ``skipped_steps`` (those of them whose step was skipped: ``nonfinite=skip``),
``rng`` (torch CPU / CUDA and Python states), ``history`` (the logged scalars so far), ``config`` (the
resolved run config as plain containers, used to explain a mismatch), ``meta`` (the classes) and ``hooks``
(``{name: state}`` of the training hooks that have state, e.g. ``ema``; absent in checkpoints written before
hooks existed, which resume without it).
"""

import json
import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn


def nonfinite_tensors(tensors: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` that hold a NaN or an infinity."""
    return [
        k for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()
    ]


def _write_error(error: Exception, path: Path) -> OSError:
    """The ``OSError`` naming ``path`` for a failed checkpoint write.

    torch's zip writer reports a failed write (``OSError: [Errno 28] No space left on device``) as a
    ``RuntimeError`` ("[enforce fail at inline_container.cc] ... unexpected pos ..." or "... failed writing ..."),
    raised while the ``OSError`` is being handled: the ``OSError`` is found in its context chain. A
    ``RuntimeError`` without one is not a write failure and is raised as it is.
    """
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        raise error
    message = f"cannot write checkpoint {path} ({cause.strerror or cause}); the previous checkpoint is kept"
    return OSError(cause.errno, message) if cause.errno is not None else OSError(message)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` so that a kill at any moment leaves either the old or the new file.

    The bytes go to a temporary file beside ``path``, are fsynced, and the file is renamed over ``path``
    (``os.replace`` is atomic); if writing fails, the temporary file is removed and ``path`` is untouched.
    A ``state["model"]`` with a NaN or infinite tensor is refused (``ValueError`` naming the tensors), so a
    run whose weights diverged keeps its last good checkpoint.
    """
    path = Path(path)
    bad = nonfinite_tensors(state.get("model", {}))
    if bad:
        raise ValueError(
            f"refusing to write {path}: {len(bad)} model tensor(s) are not finite (NaN or Inf): "
            f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}; the previous checkpoint is kept. "
            "Lower optim.lr or set clip_grad_norm."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk, a quota, a vanished mount: name the file
        tmp.unlink(missing_ok=True)
        raise _write_error(e, path) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def remove_orphaned_temporaries(path: str | Path) -> list[Path]:
    """Remove the ``.<name>.tmp-<pid>`` files beside ``path`` left by writers that were killed mid-write.

    A file is left alone while its process (on this host) is alive. Returns the removed paths.
    """
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """``model.load_state_dict`` with an error that lists every missing, unexpected or reshaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        lines = [f"checkpoint {source} does not fit this model (another model or rpn config?):"]
        for name, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                lines.append(f"  {name} keys ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        for k in reshaped[:8]:
            lines.append(f"  {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state)


# Config groups that define what the weights mean: resuming under other values would silently mix two models.
# ``model.backbone_weights`` chooses the initialisation, which a resumed run does not use, and the layout (a
# pretrained backbone has frozen BatchNorm and frozen early layers), which it does: only null vs not-null must match.
RESUME_MUST_MATCH = ("model", "rpn")
PRETRAINED_KEY = "model.backbone_weights"
# keys added after checkpoints were written without them: absent there means this value (what those runs built)
ADDED_KEYS = {"rpn.head.kind": "shared", "rpn.head.num_convs": 1, "rpn.head.width": None, "rpn.head.norm": None,
              "rpn.head.vary": "width", "rpn.npos_ema": None}  # fmt: skip
# keys renamed since: a checkpoint's old name is read as the new one
RENAMED_KEYS = {"rpn.batch_size_per_image": "rpn.box_sample_size"}  # of the focal RPN, which samples nothing


def _flatten(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: node}


def _backbone_layout(weights: Any) -> str:
    return "null (trained BatchNorm)" if weights in (None, "<absent>") else "pretrained (frozen BatchNorm)"


def check_resume_config(
    saved: dict[str, Any], cfg: Any, source: str | Path, class_names: list[str] | None = None
) -> None:
    """Refuse to resume when the checkpoint's ``model`` / ``rpn`` config (or its classes) differ from this run's.

    ``saved`` is the checkpoint dict (its ``config`` and ``meta``); ``cfg`` this run's config. The error lists
    every differing key with both values.
    """
    from omegaconf import OmegaConf

    if "config" not in saved:
        raise ValueError(f"checkpoint {source} has no 'config': was it written by fl-rpn-train?")
    lines = []
    for group in RESUME_MUST_MATCH:
        old = _flatten(saved["config"].get(group, {}), group)
        if old.get("rpn.loss") == "focal":
            old = {RENAMED_KEYS.get(k, k): v for k, v in old.items()}
        new = _flatten(OmegaConf.to_container(cfg[group], resolve=True), group)
        for key in sorted(set(old) | set(new)):
            before, now = old.get(key, ADDED_KEYS.get(key, "<absent>")), new.get(key, "<absent>")
            if key == PRETRAINED_KEY:
                before, now = _backbone_layout(before), _backbone_layout(now)
            if before != now:
                lines.append(f"  {key}: checkpoint {before!r}, now {now!r}")
    saved_names = saved.get("meta", {}).get("class_names")
    if class_names is not None and saved_names is not None and list(saved_names) != list(class_names):
        lines.append(f"  dataset classes: checkpoint {list(saved_names)[:5]}..., now {list(class_names)[:5]}...")
    if lines:
        raise ValueError(
            f"cannot resume from {source}: it was trained with another config:\n" + "\n".join(lines) + "\n"
            "Resume with the checkpoint's settings, or start a new run (resume=false, or another hydra.run.dir)."
        )


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(_to_lists(random.getstate()))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained detector from ``path`` alone: its config (model, rpn) and class names are stored in it.

    Returns ``(model in eval mode, checkpoint)``; ``checkpoint["meta"]`` has ``class_names`` and ``category_ids``.
    """
    from omegaconf import OmegaConf

    from ..modeling.model import build_model

    ckpt = load_checkpoint(path)
    missing = [k for k in ("model", "config", "meta") if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}: was it written by fl-rpn-train?")
    cfg = OmegaConf.create(ckpt["config"])
    model = build_model(cfg, num_classes=len(ckpt["meta"]["class_names"]), load_backbone_weights=False)
    load_model_state(model, ckpt["model"], path)
    return model.eval(), ckpt
