"""``fl-rpn-check-data``: read both splits of a dataset config and decode every image, before a long run.

fl-rpn-check-data dataset=coco128 data_root=/data                 # same overrides as fl-rpn-train
fl-rpn-check-data dataset=coco data_root=/data check_images=header  # headers only: faster, misses truncation

The config is validated first, as ``fl-rpn-train`` does (``fl_rpn.engine.validate``): a bad value stops the command
with the key named, before any data is read. Then it prints, per split, the image / box / class counts, what
the reader skipped or flagged (clipped and dropped boxes, empty images, ...), the boxes and images of each class
(most boxes first, and the ratio of the most to the least frequent class's boxes) and every problem (a file that is
missing, not an image, truncated, or of another size than its annotations say; or the reader's error for a
bad annotation file). Exits 1 if any split has a problem, else 0.
"""

import sys

import hydra
from omegaconf import DictConfig

from ..config import CONF_DIR
from ..data import SplitReport, build_dataset, check_dataset
from ..engine.validate import validate_config
from ..errors import report_errors
from .preflight import preflight


def check_data(cfg: DictConfig) -> list[SplitReport]:
    """One report per split (``dataset.train``, ``dataset.val``); images decoded unless ``check_images=header``.

    A bad config value raises ``ValueError`` naming the key (``validate_config``) before any data is read.
    """
    validate_config(cfg)
    depth = "header" if cfg.check_images == "header" else "decode"
    reports, datasets = [], {}
    for split in ("train", "val"):
        name = f"dataset.{split}"
        try:
            datasets[split] = build_dataset(cfg.dataset[split], train=split == "train")
        except (OSError, ValueError) as e:
            reports.append(SplitReport(name=name, depth="not read", problems=[f"{type(e).__name__}: {e}"]))
            continue
        reports.append(check_dataset(datasets[split], name, depth))
    if len(datasets) == 2 and datasets["train"].meta.class_names != datasets["val"].meta.class_names:
        reports[-1].problems.append(
            f"classes differ from dataset.train's: {datasets['val'].meta.class_names[:5]}... vs "
            f"{datasets['train'].meta.class_names[:5]}..."
        )
    return reports


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base=None)
@report_errors
def check_data_app(cfg: DictConfig) -> None:
    reports = check_data(cfg)
    for report in reports:
        print(report.summary(max_problems=1000, per_class=True))
    if not all(r.ok for r in reports):
        print("fl-rpn-check-data: problems found", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    preflight(
        "fl-rpn-check-data", "train",
        "read both splits of a dataset config (the same overrides as fl-rpn-train) and decode every image; prints "
        "the counts per split and per class and every problem; exits 1 if there is one",
        examples=["fl-rpn-check-data dataset=bccd data_root=DIR",
                  "fl-rpn-check-data scale=coco128 data_root=DIR check_images=header   # headers only: faster"],
        groups=["scale", "dataset"],
    )  # fmt: skip
    check_data_app()


if __name__ == "__main__":
    main()
