"""``fl-rpn-eval``: evaluate a saved checkpoint, by default on the data it was trained with, write ``metrics.json``."""

import json
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from ..config import CONF_DIR
from ..data import build_dataset
from ..engine.checkpoint import model_from_checkpoint
from ..engine.distributed import DistInfo
from ..engine.evaluate import run_evaluation, select_device
from ..errors import report_errors
from ..evaluation import summarize, without_per_class
from ..provenance import provenance, trained_with, utc_now
from .preflight import preflight


def command_line_overrides() -> list[str]:
    """This Hydra app's command-line overrides (``["checkpoint=...", "dataset=bccd"]``); ``[]`` outside one."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def overrides_key(overrides: list[str], key: str) -> bool:
    """Whether ``overrides`` set ``key`` or a key under it (``dataset=coco``, ``dataset.val.split=test``, ``+...``)."""
    names = [o.split("=", 1)[0].lstrip("+~").split("@", 1)[0] for o in overrides]
    return any(name == key or name.startswith(key + ".") for name in names)


def _rebased(node: Any, old: str, new: str) -> Any:
    """``node`` (a plain config) with every path string under ``old`` moved under ``new``."""
    if isinstance(node, dict):
        return {k: _rebased(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebased(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old.rstrip("/") + "/")):
        return new + node[len(old) :]
    return node


def use_checkpoint_data(cfg: DictConfig, ckpt: dict, overrides: list[str] | None = None) -> tuple[str, str]:
    """Point ``cfg.dataset`` and ``cfg.data_root`` at the data ``ckpt`` was trained with, unless the command line
    chose them; likewise ``cfg.eval.evaluators`` when the data is the checkpoint's. Returns where the data and the
    evaluators come from, as the words to print (``"from the checkpoint"``, ``"from the command line"``).

    ``overrides``: the command line's (default: ``command_line_overrides()``). A ``dataset=...`` or ``dataset.*``
    override keeps the composed ``dataset``; ``data_root=...`` alone keeps the checkpoint's dataset, its paths under
    the checkpoint's ``data_root`` moved under the new one. The checkpoint's config is resolved: its paths are final.
    """
    overrides = command_line_overrides() if overrides is None else overrides
    trained = ckpt.get("config", {})
    evaluators_from = "from the command line" if overrides_key(overrides, "eval") else "from the config"
    if overrides_key(overrides, "dataset"):
        return "from the command line", evaluators_from
    if "dataset" not in trained:
        return "from the config: the checkpoint records no dataset", evaluators_from
    dataset, data_from = trained["dataset"], "from the checkpoint"
    if overrides_key(overrides, "data_root"):
        dataset = _rebased(dataset, str(trained.get("data_root")), str(cfg.data_root))
        data_from = f"the checkpoint's, moved to data_root={cfg.data_root} from the command line"
    else:
        cfg.data_root = trained.get("data_root", cfg.data_root)
    cfg.dataset = dataset
    evaluators = trained.get("eval", {}).get("evaluators")
    if evaluators is not None and not overrides_key(overrides, "eval"):
        cfg.eval.evaluators, evaluators_from = evaluators, "from the checkpoint"
    return data_from, evaluators_from


def describe_val(dataset: DictConfig) -> str:
    """``"bccd val split, /data/bccd"``: ``dataset.val``'s dataset name, split and folder."""
    val = dataset.val
    split = val.get("split") or " + ".join(" ".join(map(str, s)) for s in val.get("sets") or []) or "val"
    folder = next((val[k] for k in ("root", "images", "cache_dir") if val.get(k)), "?")
    return f"{dataset.name} {split} split, {folder}"


def evaluate_checkpoint(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, float]:
    """Evaluate ``cfg.checkpoint`` on ``dataset.val``: the checkpoint's own unless ``overrides`` (default: the
    command line's) choose it (``use_checkpoint_data``)."""
    device = select_device(cfg.device)
    model, ckpt = model_from_checkpoint(cfg.checkpoint)
    data_from, evaluators_from = use_checkpoint_data(cfg, ckpt, overrides)
    val_set = build_dataset(cfg.dataset.val, train=False)
    print(
        f"evaluating on dataset.val: {describe_val(cfg.dataset)}, {len(val_set)} images ({data_from}); "
        f"eval.evaluators=[{', '.join(cfg.eval.evaluators)}] ({evaluators_from})"
    )
    trained_classes = ckpt["meta"]["class_names"]
    if val_set.meta.class_names != trained_classes:
        raise ValueError(
            f"dataset {cfg.dataset.name} has classes {val_set.meta.class_names[:5]}... but checkpoint "
            f"{cfg.checkpoint} was trained on {trained_classes[:5]}..."
        )
    metrics = run_evaluation(cfg, model.to(device), val_set, device, dist_info=DistInfo())
    record = {**metrics, "checkpoint": str(cfg.checkpoint), "iteration": ckpt.get("iteration")}
    # the run's own fields (commit, hardware, command, dataset evaluated on) and the checkpoint's training: its
    # seed, model, rpn and schedule, not the defaults that evaluate.yaml composes
    record["provenance"] = {**provenance(cfg), **trained_with(ckpt), "finished": utc_now()}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(record, indent=2, default=str))
    print(summarize(without_per_class(metrics)))
    return metrics


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base=None)
@report_errors
def eval_app(cfg: DictConfig) -> None:
    torch.set_grad_enabled(False)
    evaluate_checkpoint(cfg)


def main() -> None:
    preflight(
        "fl-rpn-eval", "evaluate",
        "evaluate a checkpoint and write metrics.json. The data is the checkpoint's own (its dataset and data_root) "
        "unless dataset=..., dataset.* or data_root=... says otherwise; the metrics likewise (eval=..., eval.*)",
        examples=["fl-rpn-eval checkpoint=outputs/DATE/TIME/last.pt                  # on the data it was trained on",
                  "fl-rpn-eval checkpoint=RUN/last.pt dataset=coco128 data_root=DIR eval.evaluators=[coco]"],
        groups=["dataset", "eval"],
    )  # fmt: skip
    eval_app()


if __name__ == "__main__":
    main()
