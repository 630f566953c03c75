"""Batching for detection: lists of differently sized images, and the training stream's full batches.

Training draws from an endless stream of shuffled passes over the dataset and groups the draws by aspect ratio
(batches of similar shape waste less padding), as detectron2's ``TrainingSampler`` with ``AspectRatioGroupedDataset``:
every batch has exactly ``batch_size`` images, never the one-image leftover of an epoch's end, which would divide a
focal loss by one image's few positives.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import torch


def collate_fn(batch: list[tuple]) -> tuple[tuple, tuple]:
    """``[(image, target), ...] -> ((image, ...), (target, ...))``; images keep their own sizes."""
    return tuple(zip(*batch, strict=True))


def create_aspect_ratio_groups(aspect_ratios: Sequence[float], k: int = 3) -> list[int]:
    """Group id per image: w/h quantised into ``2k + 2`` bins with edges ``2 ** linspace(-1, 1, 2k + 1)``
    (k = 0: two groups, portrait and landscape)."""
    bins = (2 ** np.linspace(-1, 1, 2 * k + 1)).tolist() if k > 0 else [1.0]
    return [bisect.bisect_right(bins, a) for a in aspect_ratios]


def rank_tokens(num_items: int, seed: int, rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, int]]:
    """This rank's endless stream of ``(pass, index)`` draws.

    Pass ``p`` is a permutation of ``range(num_items)`` seeded by ``(seed, p)``; the passes are concatenated into one
    global stream, of which rank ``r`` takes every ``world_size``-th draw from position ``r`` (detectron2's
    ``TrainingSampler``). So the ranks share every pass evenly, however ``num_items`` divides, and never drift apart.
    """
    if num_items < 1:
        raise ValueError("the training dataset is empty")
    generator = torch.Generator()
    position = 0  # of the pass's first draw in the global stream
    for p in itertools.count():
        generator.manual_seed(seed * 1_000_003 + p)
        order = torch.randperm(num_items, generator=generator).tolist()
        for index in order[(rank - position) % world_size :: world_size]:
            yield p, index
        position += num_items


def full_batches(
    tokens: Iterator[tuple[int, int]], group_ids: Sequence[int], batch_size: int
) -> Iterator[list[tuple[int, int]]]:
    """Endless batches of exactly ``batch_size`` draws of ``tokens`` (``(pass, index)``, passes in order), each from
    one aspect-ratio group where the group allows.

    Draws are buffered per group (``group_ids[index]``) and a group's buffer is yielded when full. When the first
    draw of a new pass arrives, the buffers of the finished pass, all smaller than a batch, are emptied in the order
    they were started into one mixed batch, which the next draws fill (from the new pass, and the ones after
    it when a pass is smaller than the batch). So every batch is full, no draw waits beyond the next pass, and at
    every batch each index has been drawn either as often as every other or once more: the draws of all finished
    passes are out, and the current pass draws each index once. Under DDP each rank groups its own draws; the ranks
    could then be a pass apart for a moment (two draws' spread), but take turns along one stream, and the joined
    batches of tests/data/test_batching.py stay within one draw. One group (``[0] * n``) makes plain consecutive
    batches of the stream.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    buffers: dict[int, list[tuple[int, int]]] = {}
    mixed: list[tuple[int, int]] = []
    current_pass = None
    for token in tokens:
        if token[0] != current_pass:
            mixed.extend(itertools.chain.from_iterable(buffers.values()))
            buffers.clear()
            while len(mixed) >= batch_size:
                yield mixed[:batch_size]
                mixed = mixed[batch_size:]
            current_pass = token[0]
        if mixed:  # a mixed batch waits to be filled
            mixed.append(token)
            if len(mixed) == batch_size:
                yield mixed
                mixed = []
            continue
        buffer = buffers.setdefault(group_ids[token[1]], [])
        buffer.append(token)
        if len(buffer) == batch_size:
            yield buffers.pop(group_ids[token[1]])
