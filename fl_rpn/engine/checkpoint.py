"""Checkpoints: written atomically (temporary file, fsync, rename), read with ``weights_only=True``.

A checkpoint holds ``model``, ``optimizer``, ``scheduler``, ``scaler`` state dicts, ``iteration``
(the number of finished iterations), ``rng`` (torch CPU / CUDA and Python states) and ``config``
(the resolved run config as plain containers, used to explain a mismatch).
"""

import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` so that a kill at any moment leaves either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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

    from ..model import build_model

    ckpt = load_checkpoint(path)
    missing = [k for k in ("model", "config", "meta") if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}: was it written by fl-rpn-train?")
    cfg = OmegaConf.create(ckpt["config"])
    model = build_model(cfg, num_classes=len(ckpt["meta"]["class_names"]))
    load_model_state(model, ckpt["model"], path)
    return model.eval(), ckpt
