"""The training data stream: an endless, resumable sequence of batches.

Epoch ``e`` uses a permutation seeded by ``(seed, e)`` and every sample's augmentation is seeded by
``(seed, e, index)``, so the batch at iteration ``i`` is a function of ``(seed, i)`` alone (under DDP, of
``(seed, i, rank, world size)``): a resumed run sees exactly the batches the uninterrupted run would have seen,
whatever the number of workers.
"""

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from ..data import GroupedBatchSampler, collate_fn, create_aspect_ratio_groups
from ..data.build import ignore_sigterm
from .distributed import SINGLE_PROCESS, DistInfo


class EpochSeededDataset(Dataset):
    """Wraps a dataset so that item ``(epoch, index)`` draws its random augmentation from its own seed."""

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
    """``iter(TrainStream(...).from_iteration(i))`` yields ``(images, targets)`` for iterations ``i, i+1, ...``."""

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
        self.num_workers = num_workers
        self.pin_memory = pin_memory  # page-locked batches: only for a model on CUDA (non_blocking copies)
        self.seed = seed
        if dist_info.enabled:
            self.sampler = DistributedSampler(
                dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=seed
            )
        else:
            self.sampler = RandomSampler(dataset, generator=torch.Generator())
        if group_aspect_ratio:
            self.batch_sampler = GroupedBatchSampler(
                self.sampler, create_aspect_ratio_groups(dataset.aspect_ratios(), k=3), batch_size
            )
        else:
            self.batch_sampler = BatchSampler(self.sampler, batch_size, drop_last=False)
        self.batches_per_epoch = len(self.batch_sampler)

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        else:
            self.sampler.generator.manual_seed(self.seed * 1_000_003 + epoch)
        return [[(epoch, i) for i in batch] for batch in self.batch_sampler]

    def locate(self, iteration: int) -> tuple[int, int]:
        """``(epoch, batches of that epoch already done)`` at ``iteration``.

        Under DDP a rank's epochs are counted one by one: with aspect-ratio grouping, how a rank's share of
        the images falls into groups (so how many batches it makes) changes from epoch to epoch.
        """
        if not isinstance(self.sampler, DistributedSampler):
            return divmod(iteration, self.batches_per_epoch)
        epoch = 0
        while iteration >= (n := len(self.epoch_batches(epoch))):
            iteration -= n
            epoch += 1
        return epoch, iteration

    def from_iteration(self, iteration: int) -> Iterator:
        """One DataLoader over the batches of every epoch from ``iteration`` on: its workers start once.

        The loader's generator only sets the workers' base seeds, on which no item depends (each seeds itself).
        """
        epoch, skip = self.locate(iteration)

        def batches():
            for e in itertools.count(epoch):
                yield from self.epoch_batches(e)[skip if e == epoch else 0 :]

        loader = DataLoader(
            self.dataset,
            batch_sampler=batches(),
            num_workers=self.num_workers,
            collate_fn=collate_fn,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed),  # leaves the global RNG alone
            worker_init_fn=ignore_sigterm,  # SIGTERM is for the main process: it checkpoints, then stops us
        )
        return iter(loader)
