"""Batching for detection: lists of differently sized images, and aspect-ratio grouping as in
torchvision's detection references (batches of similar shape waste less padding)."""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def collate_fn(batch: list[tuple]) -> tuple[tuple, tuple]:
    """``[(image, target), ...] -> ((image, ...), (target, ...))``; images keep their own sizes."""
    return tuple(zip(*batch, strict=True))


def create_aspect_ratio_groups(aspect_ratios: Sequence[float], k: int = 3) -> list[int]:
    """Group id per image: w/h quantised into ``2k + 2`` bins with edges ``2 ** linspace(-1, 1, 2k + 1)``
    (k = 0: two groups, portrait and landscape)."""
    bins = (2 ** np.linspace(-1, 1, 2 * k + 1)).tolist() if k > 0 else [1.0]
    return [bisect.bisect_right(bins, a) for a in aspect_ratios]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices from ``sampler`` that all share a group id.

    Indices are buffered per group in the order ``sampler`` yields them; a group's buffer is yielded
    as soon as it is full, and the partial buffers at the end of the epoch are yielded last (in the
    order their groups first appeared). So every index of the sampler appears exactly once, the
    order is a pure function of the sampler's order, and it works with any sampler, including
    DistributedSampler (call its ``set_epoch`` as usual).
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        for idx in self.sampler:
            group = self.group_ids[idx]
            buffers[group].append(idx)
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
        yield from buffers.values()

    def __len__(self) -> int:
        # A sampler as long as the dataset visits every index once (a random or sequential permutation),
        # so the group sizes are known without iterating it; iterating a RandomSampler would advance its
        # generator. Shorter samplers (DistributedSampler) iterate deterministically and are counted.
        ids = self.group_ids if len(self.sampler) == len(self.group_ids) else [self.group_ids[i] for i in self.sampler]
        return sum(-(-n // self.batch_size) for n in Counter(ids).values())
