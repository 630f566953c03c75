"""The training data stream: an endless, resumable sequence of full batches.

Pass ``p`` over the dataset is a permutation seeded by ``(seed, p)`` (``fl_rpn.data.batching.rank_tokens``) and every
sample's augmentation is seeded by ``(seed, p, index)``, so the batch at iteration ``i`` is a function of
``(seed, i)`` alone (under DDP, of ``(seed, i, rank, world size)``): a resumed run sees exactly the batches the
uninterrupted run would have seen, whatever the number of workers.
"""

import itertools
import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import collate_fn, create_aspect_ratio_groups, full_batches, rank_tokens
from ..data.build import ignore_sigterm
from .distributed import SINGLE_PROCESS, DistInfo

log = logging.getLogger(__name__)


class EpochSeededDataset(Dataset):
    """Wraps a dataset so that item ``(pass, index)`` draws its random augmentation from its own seed."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.dataset[index]


class TrainStream:
    """``iter(TrainStream(...).from_iteration(i))`` yields ``(images, targets)`` for iterations ``i, i+1, ...``.

    Every batch holds exactly ``batch_size`` images (``fl_rpn.data.batching.full_batches``): the passes over the
    dataset follow one another without a partial batch between them, and a dataset smaller than ``batch_size``
    (under DDP, than the global batch) repeats images within a batch, each with its own augmentation.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        num_workers: int,
        seed: int,
        group_aspect_ratio: bool,
        dist_info: DistInfo = SINGLE_PROCESS,
        pin_memory: bool = False,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.dataset = EpochSeededDataset(dataset, seed)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory  # page-locked batches: only for a model on CUDA (non_blocking copies)
        self.seed = seed
        self.dist_info = dist_info
        self.group_ids = create_aspect_ratio_groups(dataset.aspect_ratios(), k=3) if group_aspect_ratio else None
        global_batch = batch_size * dist_info.world_size
        self.steps_per_pass = len(dataset) / global_batch  # not a whole number in general: passes span batches
        if len(dataset) < global_batch and dist_info.is_main:
            log.warning(
                "the training split has %d images, fewer than the global batch of %d: every batch repeats images "
                "(each with its own augmentation)", len(dataset), global_batch,
            )  # fmt: skip

    def batches(self) -> Iterator[list[tuple[int, int]]]:
        """This rank's endless batches of ``(pass, index)`` keys, from iteration 0."""
        tokens = rank_tokens(len(self.dataset), self.seed, self.dist_info.rank, self.dist_info.world_size)
        group_ids = self.group_ids if self.group_ids is not None else _OneGroup()
        return full_batches(tokens, group_ids, self.batch_size)

    def from_iteration(self, iteration: int) -> Iterator:
        """One DataLoader over the batches from ``iteration`` on: its workers start once.

        The batches before ``iteration`` are drawn (indices only, nothing is loaded) and dropped, so the batch at
        iteration ``i`` is a function of ``(seed, i, rank, world size)``. The loader's generator only sets the
        workers' base seeds, on which no item depends (each seeds itself).
        """
        loader = DataLoader(
            self.dataset,
            batch_sampler=itertools.islice(self.batches(), iteration, None),
            num_workers=self.num_workers,
            collate_fn=collate_fn,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed),  # leaves the global RNG alone
            worker_init_fn=ignore_sigterm,  # SIGTERM is for the main process: it checkpoints, then stops us
        )
        return iter(loader)


class _OneGroup:
    """``group_ids`` without aspect-ratio grouping: every index is in group 0."""

    def __getitem__(self, index: int) -> int:
        return 0
