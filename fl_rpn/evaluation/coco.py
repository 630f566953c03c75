"""COCO box AP with pycocotools (or the faster-coco-eval drop-in, which gives the same numbers).

Ground truth and detections are turned into in-memory COCO datasets at ``compute()``:
label ``k`` ↔ ``category_ids[k - 1]``; a target's ``ignore`` flag becomes ``iscrowd=1`` (COCO crowd,
or VOC ``difficult`` when VOC is scored this way), so matching one is neither a hit nor a false
positive and missing one is not a miss; ``area`` is the target's own COCO ``area`` when given (it
decides small / medium / large), else the box area. Images without ground truth still count: their
detections are false positives. The readers hand evaluation the boxes, ``iscrowd`` and ``area`` exactly as
in the file (nothing clipped or dropped), so the numbers are pycocotools' on that file
(``tests/evaluation/test_reader_vs_official.py``).

Returned values are fractions in [0, 1]. Where pycocotools has nothing to average (no ground truth
in an area range, e.g. no large objects) it returns -1; we return ``nan`` instead so that a mean over
runs cannot silently mix in a -1.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import torch
from torchvision.ops import box_area

from fl_rpn.evaluation.base import (
    Evaluator,
    MetricSpec,
    OptionError,
    as_vector,
    detections,
    ground_truth,
    image_id_of,
)

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six entries of COCOeval.stats
BACKENDS = ("pycocotools", "faster_coco_eval")


def _load_backend(backend: str) -> tuple[type, type]:
    """``(COCO, COCOeval)`` classes of ``backend``."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError as e:
            raise ImportError(
                "backend='faster_coco_eval' needs the faster-coco-eval package: "
                "pip install faster-coco-eval (a dependency of fl-rpn), or set eval.coco.backend=pycocotools."
            ) from e
        return COCO, COCOeval_faster
    raise ValueError(f"Unknown COCO evaluation backend {backend!r}; choose one of {BACKENDS}.")


class CocoEvaluator(Evaluator):
    """COCO bbox AP, AP50, AP75, APs, APm, APl under the keys ``bbox/<metric>``.

    Args:
        category_ids: the dataset's category id for each label ``1..K`` (COCO ids have gaps).
        class_names: the name of each label ``1..K``.
        backend: ``"faster_coco_eval"`` (default; same numbers, several times faster) or ``"pycocotools"``
            (the reference implementation); ``eval.coco.backend``.
        verbose: let the backend print its usual summary table; ``eval.coco.verbose``.

    ``update`` reads from each target ``boxes`` [M, 4], ``labels`` [M], ``image_id`` and optionally
    ``ignore`` [M], ``area`` [M], ``orig_size`` (h, w); from each output ``boxes`` [D, 4],
    ``scores`` [D], ``labels`` [D]. COCO keeps at most 100 detections per image (highest scores).
    """

    metric_specs = tuple(MetricSpec(f"bbox/{m}") for m in METRICS)
    headline = ("bbox/AP", "bbox/AP50")

    def __init__(
        self,
        category_ids: list[int],
        class_names: list[str],
        *,
        backend: str = "faster_coco_eval",
        verbose: bool = False,
    ) -> None:
        if len(category_ids) != len(class_names):
            raise ValueError(f"{len(category_ids)} category ids but {len(class_names)} class names.")
        if backend not in BACKENDS:
            raise OptionError("backend", backend, f"must be one of {list(BACKENDS)}")
        if not isinstance(verbose, bool):
            raise OptionError("verbose", verbose, "must be true or false")
        try:
            _load_backend(backend)  # fail at construction, not after a whole evaluation pass
        except ImportError as err:
            raise OptionError("backend", backend, str(err)) from err
        self.category_ids = [int(c) for c in category_ids]
        self.class_names = list(class_names)
        self.backend = backend
        self.verbose = verbose
        super().__init__()

    @classmethod
    def from_meta(cls, meta: Any, **options: Any) -> CocoEvaluator:
        return cls(list(meta.category_ids), list(meta.class_names), **options)

    def _record(self, target: dict, output: dict) -> dict[str, Any]:
        image_id = image_id_of(target)
        if image_id is None:
            raise ValueError("CocoEvaluator needs target['image_id'] for every image.")
        boxes, labels, ignore = ground_truth(target)
        area = target.get("area")
        area = box_area(boxes) if area is None else as_vector(area, torch.float64)
        dt_boxes, dt_scores, dt_labels = detections(output)
        for name, lab in (("target", labels), ("output", dt_labels)):
            if len(lab) and (lab.min() < 1 or lab.max() > len(self.category_ids)):
                raise ValueError(f"{name} labels must lie in 1..{len(self.category_ids)}, got {lab.tolist()}.")
        orig_size = target.get("orig_size")
        return {
            "image_id": image_id,
            "orig_size": None if orig_size is None else tuple(int(s) for s in orig_size),
            "boxes": boxes, "labels": labels, "ignore": ignore, "area": area,
            "dt_boxes": dt_boxes, "dt_scores": dt_scores, "dt_labels": dt_labels,
        }  # fmt: skip

    def coco_dicts(self) -> tuple[dict, list[dict]]:
        """The accumulated images as a COCO ground-truth dataset and a COCO results list.

        Both are JSON-serialisable: dump them to score with any COCO tool.
        """
        cat = self.category_ids
        images, annotations, results = [], [], []
        for r in self.unique_records():
            image = {"id": r["image_id"]}
            if r["orig_size"] is not None:
                image["height"], image["width"] = r["orig_size"]
            images.append(image)
            for box, label, crowd, area in zip(
                r["boxes"].tolist(), r["labels"].tolist(), r["ignore"].tolist(), r["area"].tolist()
            ):
                annotations.append({
                    "id": len(annotations) + 1,  # ids start at 1: pycocotools reads id 0 as "unmatched"
                    "image_id": r["image_id"], "category_id": cat[label - 1],
                    "bbox": _xywh(box), "area": area, "iscrowd": int(crowd),
                })  # fmt: skip
            for box, score, label in zip(r["dt_boxes"].tolist(), r["dt_scores"].tolist(), r["dt_labels"].tolist()):
                results.append({
                    "image_id": r["image_id"], "category_id": cat[label - 1], "bbox": _xywh(box), "score": score,
                })  # fmt: skip
        categories = [{"id": c, "name": n} for c, n in zip(cat, self.class_names)]
        return {"images": images, "annotations": annotations, "categories": categories}, results

    def compute(self) -> dict[str, float]:
        gt, results = self.coco_dicts()
        if not gt["images"]:
            return {f"bbox/{m}": math.nan for m in METRICS}
        # Detections as loadRes would index them for boxes (area = w * h, ids from 1), built directly
        # so that zero detections need no special case (pycocotools' loadRes fails on an empty list).
        dt = {
            "images": gt["images"],
            "categories": gt["categories"],
            "annotations": [
                {**d, "id": i, "area": d["bbox"][2] * d["bbox"][3], "iscrowd": 0} for i, d in enumerate(results, 1)
            ],
        }
        COCO, COCOeval = _load_backend(self.backend)
        quiet = contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            coco_gt, coco_dt = COCO(), COCO()
            coco_gt.dataset, coco_dt.dataset = gt, dt
            coco_gt.createIndex()
            coco_dt.createIndex()
            kwargs = {} if self.backend == "pycocotools" else {"print_function": print if self.verbose else _silent}
            coco_eval = COCOeval(coco_gt, coco_dt, "bbox", **kwargs)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return {f"bbox/{m}": float(v) if v >= 0 else math.nan for m, v in zip(METRICS, coco_eval.stats)}


def _xywh(box: list[float]) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1, y1, x2 - x1, y2 - y1]


def _silent(*args: Any, **kwargs: Any) -> None:
    pass
