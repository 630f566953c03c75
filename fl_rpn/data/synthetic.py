"""A deterministic synthetic detection dataset: coloured shapes on cluttered, textured backgrounds.

Written as PNG images plus a COCO ``instances`` json, so it goes through the same reader as real COCO.
Five classes that differ by shape, not colour: circle, square, triangle, cross, ring. Backgrounds are
a gradient plus smooth texture, thin lines, elongated blobs (which look like none of the classes) and
pixel noise. Objects take colours from the opposite brightness band of the background so they stay
visible, and overlap each other by at most 10% of the smaller box.

Image ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so the data depend only on the
parameters, and the first n images of a larger set equal a smaller set with the same seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
from torchvision.io import write_png

SHAPES = ["circle", "square", "triangle", "cross", "ring"]
GENERATOR_VERSION = 1  # bump when the drawing changes, so cached copies are regenerated

log = logging.getLogger(__name__)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Bilinearly upsampled Gaussian noise, [h, w, 3], std ~1, correlation length ~``cell`` px."""
    coarse = rng.standard_normal(size=(h // cell + 2, w // cell + 2, 3), dtype=np.float32)

    def upsample(a: np.ndarray, n: int, axis: int) -> np.ndarray:  # linear interpolation along one axis
        pos = np.linspace(0, a.shape[axis] - 1.001, n, dtype=np.float32)
        i = pos.astype(int)
        f = (pos - i).reshape([-1 if d == axis else 1 for d in range(a.ndim)])
        return np.take(a, i, axis) * (1 - f) + np.take(a, i + 1, axis) * f

    return upsample(upsample(coarse, h, 0), w, 1)


def _background(rng: np.random.Generator, h: int, w: int, dark: bool) -> np.ndarray:
    """Gradient between two colours of one brightness band, plus smooth texture; float32 [h, w, 3]."""
    lo, hi = (0.05, 0.4) if dark else (0.6, 0.95)
    c0, c1 = rng.uniform(lo, hi, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.arange(w, dtype=np.float32)[None, :] * np.cos(angle) + np.arange(h, dtype=np.float32)[:, None] * np.sin(
        angle
    )
    t = ((t - t.min()) / (t.max() - t.min()))[..., None]
    return c0 * (1 - t) + c1 * t + 0.05 * _smooth_noise(rng, h, w, cell=int(rng.integers(16, 64)))


def _draw_clutter(rng: np.random.Generator, img: np.ndarray) -> None:
    """Thin straight lines across the image and elongated, half-transparent elliptical blobs."""
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(0, 7))):
        px, py, angle = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, np.pi)
        dist = np.abs((xx - px) * np.sin(angle) - (yy - py) * np.cos(angle))
        img[dist < rng.uniform(0.5, 1.5)] = rng.uniform(0, 1, size=3)
    for _ in range(int(rng.integers(0, 6))):
        length = rng.uniform(12, 0.4 * min(h, w))
        a, b = length / 2, length / 2 / rng.uniform(3, 6)
        cx, cy, angle = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1
        img[inside] = 0.5 * img[inside] + 0.5 * rng.uniform(0, 1, size=3)


def _shape_mask(shape: str, h: int, w: int) -> np.ndarray:
    """Bool [h, w] mask of a shape filling an h x w box."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (u + 0.5) / w - 0.5, (v + 0.5) / h - 0.5  # pixel centres in [-0.5, 0.5]
    d2 = u**2 + v**2
    if shape == "circle":
        return d2 <= 0.25
    if shape == "square":
        return np.ones((h, w), dtype=bool)
    if shape == "triangle":  # apex up
        return np.abs(u) <= (v + 0.5) / 2
    if shape == "cross":
        return (np.abs(u) <= 1 / 6) | (np.abs(v) <= 1 / 6)
    if shape == "ring":
        return (d2 <= 0.25) & (d2 >= 0.25 * 0.55**2)
    raise ValueError(f"unknown synthetic shape {shape!r}")


def render_image(
    rng: np.random.Generator,
    image_size: tuple[int, int],
    max_objects: int,
    min_object_size: float,
    max_object_size: float,
    empty_fraction: float,
) -> tuple[np.ndarray, list[tuple[list[float], int, float]]]:
    """Draw one image. Returns uint8 [H, W, 3] and a list of (xyxy box, class index 0..4, mask area)."""
    h, w = image_size
    dark = bool(rng.random() < 0.5)
    img = _background(rng, h, w, dark)
    _draw_clutter(rng, img)
    n = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_objects + 1))
    objects: list[tuple[list[float], int, float]] = []
    for _ in range(n):
        for _attempt in range(20):  # give up on an object that cannot be placed without heavy overlap
            size = np.exp(rng.uniform(np.log(min_object_size), np.log(max_object_size)))
            aspect = np.exp(rng.uniform(-0.2, 0.2))
            bh, bw = max(int(round(size * aspect)), 3), max(int(round(size / aspect)), 3)
            bh, bw = min(bh, h), min(bw, w)
            y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            box = np.array([x0, y0, x0 + bw, y0 + bh], dtype=np.float32)
            if all(_overlap(box, np.array(o[0])) <= 0.1 for o in objects):
                break
        else:
            continue
        cls = int(rng.integers(len(SHAPES)))
        mask = _shape_mask(SHAPES[cls], bh, bw)
        colour = rng.uniform(0.6, 1.0, size=3) if dark else rng.uniform(0.0, 0.4, size=3)
        img[y0 : y0 + bh, x0 : x0 + bw][mask] = colour
        ys, xs = np.nonzero(mask)
        tight = [x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1]
        objects.append(([float(c) for c in tight], cls, float(mask.sum())))
    img += 0.03 * rng.standard_normal(size=img.shape, dtype=np.float32)
    return (img.clip(0, 1) * 255 + 0.5).astype(np.uint8), objects


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection of two xyxy boxes over the smaller one's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return float(iw * ih / smaller)


def make_synthetic_coco(
    root: str | Path,
    num_images: int,
    seed: int,
    image_size: tuple[int, int] = (256, 320),
    max_objects: int = 20,
    min_object_size: float = 8,
    max_object_size: float | None = None,
    empty_fraction: float = 0.1,
) -> tuple[Path, Path]:
    """Write ``root/images/<i>.png`` and ``root/annotations.json`` (COCO format); return both paths.

    ``image_size`` is (H, W). An image is empty with probability ``empty_fraction``, else it is drawn
    1..``max_objects`` objects and gets all of them but those that cannot be placed without heavy overlap
    (never the first, so it has at least one), each ``min_object_size`` to ``max_object_size`` px on a side
    (log-uniform, before an aspect jitter of exp(+-0.2); default: half the shorter image side). Category ids
    are 1..5 in ``SHAPES`` order; ``area`` is the shape's pixel count.
    """
    root = Path(root)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    h, w = (int(s) for s in image_size)
    max_size = max_object_size if max_object_size is not None else min(h, w) / 2
    coco: dict = {
        "images": [],
        "annotations": [],
        "categories": [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)],
    }
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        img, objects = render_image(rng, (h, w), max_objects, min_object_size, max_size, empty_fraction)
        file_name = f"{i:06d}.png"
        write_png(torch.from_numpy(img).permute(2, 0, 1).contiguous(), str(images_dir / file_name), compression_level=1)
        coco["images"].append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
        for (x1, y1, x2, y2), cls, area in objects:
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": area,
                    "iscrowd": 0,
                }
            )
    annotations = root / "annotations.json"
    annotations.write_text(json.dumps(coco))
    return images_dir, annotations


def ensure_synthetic(cache_dir: str | Path, split: str, num_images: int, seed: int, **params) -> tuple[Path, Path]:
    """Return ``(images_dir, annotations_json)`` of a synthetic split, generating it on first use.

    The split lives in ``<cache_dir>/synthetic-<hash of all parameters>/<split>/``. It is written to
    a temporary folder and renamed into place, so a half-written split is never reused and two
    processes generating at once both end up with one complete copy. The split name is mixed into
    the seed, so ``train`` and ``val`` differ even when given the same ``seed``.
    ``params`` go to ``make_synthetic_coco``. Folders and files are created with the process's umask, like any
    other (a cache shared by several users needs a umask that lets them in, e.g. 002 with a common group); the
    split's path is logged.
    """
    if "image_size" in params:
        params["image_size"] = [int(s) for s in params["image_size"]]
    key = json.dumps(
        {"version": GENERATOR_VERSION, "split": split, "num_images": num_images, "seed": seed, **params},
        sort_keys=True,
    )
    final = Path(cache_dir).expanduser() / f"synthetic-{hashlib.sha1(key.encode()).hexdigest()[:10]}" / split
    if final.is_dir():
        log.info("synthetic %s split: %s (cached)", split, final)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{split}-{os.getpid()}-{secrets.token_hex(4)}"  # not mkdtemp, which makes it 0700
        tmp.mkdir()
        log.info("synthetic %s split: generating %d images in %s", split, num_images, final)
        try:
            make_synthetic_coco(tmp, num_images, zlib.crc32(f"{split}/{seed}".encode()), **params)
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # the rename failed for another reason than a concurrent winner
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return final / "images", final / "annotations.json"
