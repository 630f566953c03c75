"""Config node -> dataset -> DataLoader.

A dataset node names its ``format`` and, beside it, exactly the arguments of that format's reader:

- ``{format: coco, images: DIR, annotations: FILE.json, keep_empty: true}``         -> ``read_coco``
- ``{format: voc, root: VOCdevkit, sets: [[2007, trainval], [2012, trainval]]}``      -> ``read_voc``
  (``sets`` is the list of (year, split) pairs; it is ``read_voc``'s ``year`` argument), or
  ``{format: voc, root: DIR, split: train, classes: null, classes_from: train}`` for a single folder holding
  ``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/`` (``classes``: a list, or null to collect them from the
  ``classes_from`` split's XML files; default: the 20 PASCAL classes)
- ``{format: yolo, images: DIR, labels: DIR, names: data.yaml, category_ids: coco80}`` -> ``read_yolo``
- ``{format: synthetic, cache_dir: DIR, split: train, num_images: 400, seed: 0, image_size: [256, 320]}``
  -> ``ensure_synthetic`` (any other ``make_synthetic_coco`` argument may be added), then ``read_coco``
"""

from __future__ import annotations

import atexit
import inspect
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit handler now, so that ours runs before it
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from .batching import collate_fn
from .coco import read_coco
from .dataset import DetectionDataset
from .synthetic import ensure_synthetic, make_synthetic_coco
from .transforms import build_transforms
from .voc import VOC_CLASSES, read_voc
from .yolo import read_yolo


def _read_synthetic(train: bool = True, **kwargs: Any):
    images, annotations = ensure_synthetic(**kwargs)
    return read_coco(images, annotations, train=train)


def _read_voc(
    root: str,
    sets: list | None = None,
    split: str | None = None,
    classes: list | None = VOC_CLASSES,
    classes_from: str | list | None = None,
    train: bool = True,
) -> Any:
    """``sets`` (VOCdevkit with ``VOC<year>/`` folders) or ``split`` (``root`` holds ``Annotations/`` itself)."""
    if (sets is None) == (split is None):
        raise ValueError(
            f"VOC dataset node (root {root}) needs exactly one of sets (VOCdevkit: [[year, split], ...]) or split "
            f"(a single folder holding Annotations/); it has sets={sets!r}, split={split!r}."
        )
    if classes_from is not None and not isinstance(classes_from, str):
        classes_from = [tuple(s) for s in classes_from]
    year = [tuple(s) for s in sets] if sets is not None else None
    return read_voc(root, year, split or "", train=train, classes=classes, classes_from=classes_from)


READERS = {"coco": read_coco, "voc": _read_voc, "yolo": read_yolo, "synthetic": _read_synthetic}
_SYNTHETIC_KEYS = (set(inspect.signature(ensure_synthetic).parameters) - {"params"}) | (
    set(inspect.signature(make_synthetic_coco).parameters) - {"root", "num_images", "seed"}
)
_PATH_KEYS = {"images", "annotations", "root", "labels", "names"}  # the readers' path arguments
DATA_ROOT_HINT = (
    "The dataset configs (conf/dataset/*.yaml) put their paths under data_root, which is the FL_RPN_DATA "
    "environment variable, else ./data: set FL_RPN_DATA or data_root=DIR, or override the dataset's own paths "
    "(e.g. dataset.train.images=DIR)."
)


def read_dataset(cfg_split: Mapping | DictConfig, train: bool = True):
    """Run the reader a node names; returns ``(records, meta, stats)``.

    ``train`` is the split's role, not a config key: ``True`` clips boxes to the image and drops the ones <= 1 px;
    ``False`` (evaluation) keeps the annotations exactly as the official evaluators read them, and counts those
    boxes. A configured file or folder that is missing (``FileNotFoundError``) says how the paths are set
    (``DATA_ROOT_HINT``).
    """
    node = OmegaConf.to_container(cfg_split, resolve=True) if isinstance(cfg_split, DictConfig) else dict(cfg_split)
    fmt = node.pop("format", None)
    if fmt not in READERS:
        raise ValueError(f"Dataset node has format {fmt!r}; expected one of {sorted(READERS)}.")
    reader = READERS[fmt]
    allowed = _SYNTHETIC_KEYS if fmt == "synthetic" else set(inspect.signature(reader).parameters) - {"train"}
    unknown = sorted(set(node) - allowed)
    if unknown:
        raise ValueError(f"Dataset node of format {fmt!r} has unknown keys {unknown}; allowed: {sorted(allowed)}.")
    try:
        return reader(**node, train=train)
    except FileNotFoundError as e:
        if not any(k in _PATH_KEYS and not Path(v).exists() for k, v in node.items()):
            raise  # a file inside the dataset (a VOC XML, ...), not one of its configured paths
        raise FileNotFoundError(f"{e} {DATA_ROOT_HINT}") from None


def build_dataset(cfg_split: Mapping | DictConfig, train: bool, hflip_prob: float = 0.5) -> DetectionDataset:
    """Dataset for one split; training gets a random horizontal flip and drops ignored boxes.

    The reader is told the split's role (``read_dataset``): a training split has its boxes clipped and the ones
    <= 1 px dropped; an evaluation split keeps the annotations as they are. ``dataset.stats`` keeps the reader's
    counts (boxes clipped, dropped or kept, empty images, ...).
    """
    records, meta, stats = read_dataset(cfg_split, train=train)
    return DetectionDataset(records, meta, transforms=build_transforms(train, hflip_prob), train=train, stats=stats)


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM.

    SLURM (pre-emption, ``scancel``) signals every process of a job, workers included. A worker killed by it
    makes the main process fail at its next batch, before it can write the pre-emption checkpoint; ignoring
    it lets the main process finish its iteration, save, and shut the workers down as usual.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def shutdown_workers(iterator: Any) -> None:
    """Stop the worker processes of a DataLoader iterator now (a no-op without workers).

    Call it on every way out of a loop over a loader (``try``/``finally``): after an exception the iterator
    stays referenced by the traceback, so its workers would outlive the loop, and multiprocessing's exit
    handler cannot stop them (it sends SIGTERM, which they ignore, then waits for them).
    """
    shutdown = getattr(iterator, "_shutdown_workers", None)  # what the iterator's own ``__del__`` calls
    if shutdown is not None:
        shutdown()


def _kill_leftover_workers() -> None:
    """At exit, SIGKILL the daemonic child processes still alive (DataLoader workers ignore SIGTERM).

    A safety net behind ``shutdown_workers``: multiprocessing's own exit handler (which runs after this one)
    would ``terminate()`` them, which they ignore, and then wait for them forever.
    """
    leftover = [child for child in multiprocessing.active_children() if child.daemon and child.is_alive()]
    if not leftover:
        return
    # the DataLoader's SIGCHLD handler would raise "worker killed" in the middle of this loop
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in leftover:
        child.kill()
    for child in leftover:
        child.join(timeout=5)


atexit.register(_kill_leftover_workers)


def build_loader(
    dataset: DetectionDataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    distributed: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """The evaluation DataLoader, yielding ``(images, targets)`` tuples in the dataset's order (training reads
    ``fl_rpn.engine.stream.TrainStream``).

    Distributed: a ``DistributedSampler`` without shuffling, which pads with repeated images to equal rank sizes,
    so evaluators dedupe by ``image_id``. The workers' seeds come from a generator seeded with ``seed + 1``, so that
    starting them draws nothing from the global RNG (a periodic evaluation leaves the training's random stream
    as it was). ``pin_memory``: page-locked batches, for a model on CUDA only.
    """
    sampler = DistributedSampler(dataset, shuffle=False, seed=seed) if distributed else SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, batch_size, drop_last=False),
        num_workers=num_workers,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed + 1),
        pin_memory=pin_memory,
        worker_init_fn=ignore_sigterm,
    )
