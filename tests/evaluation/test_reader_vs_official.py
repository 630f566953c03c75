"""The same annotation file scored through our reader + evaluator and by the official tools gives the same numbers.

COCO: pycocotools reading the json itself. VOC07: a devkit-style ``voc_eval`` written here, reading the XML files
itself (1-based inclusive pixels, the "+1" IoU, 11-point AP). The files have many small and degenerate boxes
(<= 1 px wide or high) and boxes crossing the image border: the evaluation must see them as the official tools do,
not clipped or dropped as for training.
"""

import contextlib
import io
import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fl_rpn.data import VOC_CLASSES, build_dataset
from fl_rpn.evaluation import CocoEvaluator, VOC07Evaluator
from fl_rpn.evaluation.coco import METRICS

from ..conftest import write_image

SIZES = [(64, 48), (50, 70), (160, 120), (40, 30), (96, 64), (120, 160)]  # (W, H)


def eval_targets(node):
    """Every (image, target) of an evaluation split built from ``node``, as fl-rpn-eval builds it."""
    ds = build_dataset(node, train=False)
    return ds, [ds[i][1] for i in range(len(ds))]


# --- COCO ------------------------------------------------------------------------------------------------------


def coco_case(tmp_path, seed):
    """A COCO json with many tiny / degenerate / border-crossing boxes, crowd boxes and segment areas, its images,
    and random detections as a COCO results list."""
    rng = np.random.default_rng(seed)
    cats = [1, 5, 90]
    images, annotations, results = [], [], []
    for i, (w, h) in enumerate(SIZES):
        image_id = 10 + 3 * i
        write_image(tmp_path / "images" / f"{image_id}.png", w, h)
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": w, "height": h})
        for _ in range(int(rng.integers(0, 12))):
            x, y = rng.uniform(-6, w), rng.uniform(-6, h)
            kind = rng.random()
            if kind < 0.3:  # degenerate: at most 1 px wide or high
                bw, bh = rng.uniform(0, 1), rng.uniform(0, 12)
            elif kind < 0.6:  # small
                bw, bh = rng.uniform(1, 6), rng.uniform(1, 6)
            else:  # larger (some of COCO's "medium" size), often past the border
                bw, bh = rng.uniform(4, 70), rng.uniform(4, 70)
            if rng.random() < 0.5:
                bw, bh = bh, bw
            bbox = [round(float(v), 2) for v in (x, y, bw, bh)]
            area = round(float(bbox[2] * bbox[3] * rng.uniform(0.5, 1.0)), 2)  # a segment's area, not w * h
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.choice(cats)), "bbox": bbox, "area": area,
                                "iscrowd": int(rng.random() < 0.1)})  # fmt: skip
    for a in annotations:  # near hits, and noise
        if rng.random() < 0.8:
            x, y, bw, bh = (v + rng.normal(0, 1.5) for v in a["bbox"])
            results.append({"image_id": a["image_id"], "category_id": a["category_id"],
                            "bbox": [round(float(v), 2) for v in (x, y, max(bw, 0.3), max(bh, 0.3))],
                            "score": round(float(rng.random()), 4)})  # fmt: skip
    for img in images:
        for _ in range(3):
            x, y = rng.uniform(0, img["width"]), rng.uniform(0, img["height"])
            bbox = [round(float(v), 2) for v in (x, y, rng.uniform(1, 20), rng.uniform(1, 20))]
            results.append({"image_id": img["id"], "category_id": int(rng.choice(cats)), "bbox": bbox,
                            "score": round(float(rng.random()), 4)})  # fmt: skip
    categories = [{"id": c, "name": f"c{c}"} for c in cats]
    file = tmp_path / "instances.json"
    file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return tmp_path / "images", file, results


def pycocotools_official(annotations, results):
    """COCOeval's six box numbers for the json file and the results list, pycocotools' -1 as nan."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {f"bbox/{m}": float(v) if v >= 0 else math.nan for m, v in zip(METRICS, ev.stats)}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_coco_ap_through_the_reader_equals_pycocotools_on_the_file(tmp_path, seed, backend):
    images, annotations, results = coco_case(tmp_path, seed)
    official = pycocotools_official(annotations, results)

    ds, targets = eval_targets({"format": "coco", "images": str(images), "annotations": str(annotations)})
    # Degenerate and border-crossing boxes are in the file and stay in the ground truth, counted.
    assert ds.stats["degenerate_boxes_kept"] > 5 and ds.stats["boxes_outside_image"] > 3
    # The file's own area and iscrowd reach the evaluator, annotation by annotation.
    anns = json.loads(annotations.read_text())["annotations"]
    by_image = {t["image_id"]: t for t in targets}
    for image_id in by_image:
        mine = [a for a in anns if a["image_id"] == image_id]
        t = by_image[image_id]
        assert t["area"].tolist() == pytest.approx([a["area"] for a in mine], rel=1e-6)
        assert t["ignore"].tolist() == [bool(a["iscrowd"]) for a in mine]
        xywh = torch.cat([t["boxes"][:, :2], t["boxes"][:, 2:] - t["boxes"][:, :2]], 1)
        torch.testing.assert_close(xywh, torch.tensor([a["bbox"] for a in mine]).reshape(-1, 4), rtol=0, atol=1e-5)

    label_of = {c: k + 1 for k, c in enumerate(ds.meta.category_ids)}
    outputs = []
    for t in targets:
        mine = [r for r in results if r["image_id"] == t["image_id"]]
        boxes = torch.tensor([r["bbox"] for r in mine], dtype=torch.float64).reshape(-1, 4)
        outputs.append({"boxes": torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1),
                        "scores": torch.tensor([r["score"] for r in mine], dtype=torch.float64),
                        "labels": torch.tensor([label_of[r["category_id"]] for r in mine])})  # fmt: skip
    ev = CocoEvaluator(ds.meta.category_ids, ds.meta.class_names, backend=backend)
    ev.update(targets, outputs)
    ours = ev.compute()
    assert 0.01 < official["bbox/AP"] < 0.95
    assert ours == pytest.approx(official, abs=1e-12, nan_ok=True)


# --- VOC07 -----------------------------------------------------------------------------------------------------

NAMES = ["cat", "dog", "person"]


def voc_case(tmp_path, seed):
    """A VOC2007 test split with many tiny, degenerate (xmin == xmax) and border-crossing boxes, difficult flags,
    and random detections in the devkit's 1-based pixel coordinates: (image id, score, [x1, y1, x2, y2], class)."""
    rng = np.random.default_rng(seed)
    base = tmp_path / "VOC2007"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "Annotations").mkdir()
    ids, detections = [], []
    for i, (w, h) in enumerate(SIZES * 2):
        name = f"{i:06d}"
        ids.append(name)
        write_image(base / "JPEGImages" / f"{name}.jpg", w, h)
        objects = []
        for _ in range(int(rng.integers(0, 10))):
            x1, y1 = int(rng.integers(1, w + 1)), int(rng.integers(1, h + 1))
            kind = rng.random()
            if kind < 0.3:  # degenerate for training: xmax == xmin (1 px in the devkit's convention)
                bw, bh = 0, int(rng.integers(0, 10))
            elif kind < 0.6:
                bw, bh = int(rng.integers(1, 5)), int(rng.integers(1, 5))
            else:  # often past the border
                bw, bh = int(rng.integers(4, 40)), int(rng.integers(4, 40))
            if rng.random() < 0.5:
                bw, bh = bh, bw
            cls, difficult = str(rng.choice(NAMES)), int(rng.random() < 0.15)
            box = (x1, y1, x1 + bw, y1 + bh)
            objects.append((cls, difficult, box))
            for _ in range(int(rng.integers(0, 3))):  # hits, near misses and duplicates
                jitter = rng.integers(-2, 3, 4)
                bb = [float(max(box[0] + jitter[0], 1)), float(max(box[1] + jitter[1], 1))]
                bb += [float(max(box[2] + jitter[2], bb[0])), float(max(box[3] + jitter[3], bb[1]))]
                detections.append((name, float(rng.random()), bb, cls))
        for _ in range(2):
            x1, y1 = int(rng.integers(1, w)), int(rng.integers(1, h))
            bb = [float(x1), float(y1), float(x1 + rng.integers(0, 20)), float(y1 + rng.integers(0, 20))]
            detections.append((name, float(rng.random()), bb, str(rng.choice(NAMES))))
        xml = "".join(
            f"<object><name>{c}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
            f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for c, d, b in objects
        )
        size = f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
        (base / "Annotations" / f"{name}.xml").write_text(f"<annotation>{size}{xml}</annotation>")
    (base / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    return tmp_path, ids, detections


def devkit_voc_eval(annotations_dir, ids, detections, classname):
    """The VOC devkit's ``voc_eval`` (as in py-faster-rcnn / detectron2), on the XML files themselves: 1-based
    inclusive boxes, the "+1" IoU, VOC2007's 11-point AP."""
    recs = {}
    for name in ids:
        root = ET.parse(annotations_dir / f"{name}.xml").getroot()
        recs[name] = [{"name": o.find("name").text, "difficult": int(o.find("difficult").text),
                       "bbox": [int(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]}
                      for o in root.findall("object")]  # fmt: skip
    class_recs, npos = {}, 0
    for name in ids:
        R = [obj for obj in recs[name] if obj["name"] == classname]
        bbox = np.array([x["bbox"] for x in R]).reshape(-1, 4).astype(float)
        difficult = np.array([x["difficult"] for x in R]).astype(bool)
        npos += int(sum(~difficult))
        class_recs[name] = {"bbox": bbox, "difficult": difficult, "det": [False] * len(R)}
    mine = [d for d in detections if d[3] == classname]
    image_ids = [d[0] for d in mine]
    confidence = np.array([d[1] for d in mine])
    BB = np.array([d[2] for d in mine]).reshape(-1, 4)
    sorted_ind = np.argsort(-confidence)
    BB, image_ids = BB[sorted_ind, :], [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"]
        if BBGT.size > 0:
            ixmin, iymin = np.maximum(BBGT[:, 0], bb[0]), np.maximum(BBGT[:, 1], bb[1])
            ixmax, iymax = np.minimum(BBGT[:, 2], bb[2]), np.minimum(BBGT[:, 3], bb[3])
            iw, ih = np.maximum(ixmax - ixmin + 1.0, 0.0), np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)  # fmt: skip
            overlaps = inters / uni
            ovmax, jmax = np.max(overlaps), np.argmax(overlaps)
        if ovmax > 0.5:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
        ap = ap + p / 11.0
    return ap


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voc07_map_through_the_reader_equals_the_devkit_on_the_files(tmp_path, seed):
    root, ids, detections = voc_case(tmp_path, seed)
    official = {c: devkit_voc_eval(root / "VOC2007" / "Annotations", ids, detections, c) for c in NAMES}

    ds, targets = eval_targets({"format": "voc", "root": str(root), "sets": [[2007, "test"]]})
    assert ds.stats["degenerate_boxes_kept"] > 5 and ds.stats["boxes_outside_image"] > 3
    by_name = {r.source_id: r.image_id for r in ds.records}
    outputs = {image_id: ([], [], []) for image_id in by_name.values()}
    for name, score, (x1, y1, x2, y2), cls in detections:  # devkit pixels -> continuous xyxy
        boxes, scores, labels = outputs[by_name[name]]
        boxes.append([x1 - 1, y1 - 1, x2, y2])
        scores.append(score)
        labels.append(VOC_CLASSES.index(cls) + 1)
    outputs = [{"boxes": torch.tensor(b, dtype=torch.float64).reshape(-1, 4), "scores": torch.tensor(s),
                "labels": torch.tensor(lab, dtype=torch.int64)}
               for b, s, lab in (outputs[t["image_id"]] for t in targets)]  # fmt: skip
    ev = VOC07Evaluator(ds.meta.class_names)
    ev.update(targets, outputs)
    ours = ev.compute()
    for c in NAMES:
        assert ours[f"voc07/AP/{c}"] == pytest.approx(official[c], abs=1e-12), c
    assert ours["voc07/mAP"] == pytest.approx(np.mean(list(official.values())), abs=1e-12)
    assert 0.05 < ours["voc07/mAP"] < 0.95
