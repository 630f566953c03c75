import itertools
from collections import Counter

import pytest
import torch

from fl_rpn.data import collate_fn, create_aspect_ratio_groups, full_batches, rank_tokens
from fl_rpn.engine.distributed import DistInfo
from fl_rpn.engine.stream import TrainStream


def test_aspect_ratio_groups():
    # k=3: edges 2 ** linspace(-1, 1, 7) = 0.5, 0.63, 0.79, 1, 1.26, 1.59, 2
    assert create_aspect_ratio_groups([0.4, 0.7, 1.0, 1.33, 1.5, 3.0], k=3) == [0, 2, 4, 5, 5, 7]
    assert create_aspect_ratio_groups([0.75, 1.0, 1.5], k=0) == [0, 1, 1]


def test_full_batches_exact_order():
    """Groups fill in stream order; at a new pass the finished pass's leftovers make one mixed batch, which the new
    pass's first draws fill before grouping resumes."""
    groups = [0, 1, 0, 1, 1, 0, 2]
    tokens = [(0, i) for i in range(7)] + [(1, i) for i in (6, 5, 4, 3, 2, 1, 0)]
    batches = list(full_batches(iter(tokens), groups, batch_size=2))
    assert batches == [
        [(0, 0), (0, 2)], [(0, 1), (0, 3)],  # full groups 0 and 1
        [(0, 4), (0, 5)],  # the leftovers of groups 1, 0 and 2, in the order their buffers were started ...
        [(0, 6), (1, 6)],  # ... the last one filled by pass 1's first draw
        [(1, 4), (1, 3)], [(1, 5), (1, 2)],  # pass 1 groups again
    ]  # and (1, 1), (1, 0) wait for pass 2  # fmt: skip


def test_rank_tokens_split_the_passes_evenly():
    one = list(itertools.islice(rank_tokens(5, seed=1), 10))
    assert [p for p, _ in one] == [0] * 5 + [1] * 5
    assert sorted(i for _, i in one[:5]) == sorted(i for _, i in one[5:]) == list(range(5))
    assert one != list(itertools.islice(rank_tokens(5, seed=2), 10))
    ranks = [list(itertools.islice(rank_tokens(5, seed=1, rank=r, world_size=2), 5)) for r in (0, 1)]
    assert [t for pair in zip(*ranks) for t in pair] == one  # the ranks take turns along one global stream


def _draws(num_items, batch_size, group_ids, world_size, steps):
    """Per step, the global batch of every rank joined: lists of ``(pass, index)``."""
    streams = [
        full_batches(rank_tokens(num_items, 7, rank, world_size), group_ids, batch_size) for rank in range(world_size)
    ]
    return [[t for s in streams for t in next(s)] for _ in range(steps)]


@pytest.mark.parametrize("num_items", [10, 3, 37])  # not a multiple of the batch; smaller than the batch
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("world_size", [1, 2])
def test_every_batch_is_full_and_every_image_drawn_about_equally(num_items, grouped, world_size):
    batch_size = 4
    group_ids = [i % 3 for i in range(num_items)] if grouped else [0] * num_items
    steps = 12 * num_items  # several passes
    draws = _draws(num_items, batch_size, group_ids, world_size, steps)
    counts = Counter()
    passes_done = 0
    for step, batch in enumerate(draws):
        assert len(batch) == batch_size * world_size, step
        counts.update(i for _, i in batch)
        spread = max(counts[i] for i in range(num_items)) - min(counts[i] for i in range(num_items))
        assert spread <= 1, (step, counts)
        passes_done = (step + 1) * batch_size * world_size // num_items
        assert min(counts.values()) >= passes_done - 1
    if grouped and world_size == 1 and num_items > 30:  # groups of ~12: most batches share one group
        assert sum(len({group_ids[i] for _, i in b}) == 1 for b in draws) > 0.8 * steps


@pytest.mark.parametrize("grouped", [True, False])
def test_the_stream_resumes_at_any_iteration(grouped):
    groups = [i % 3 for i in range(11)] if grouped else None
    dataset = _Ratios([1.0 if g is None else [0.6, 1.0, 1.6][g] for g in (groups or [None] * 11)])
    stream = TrainStream(dataset, 4, 0, seed=5, group_aspect_ratio=grouped, dist_info=DistInfo(1, 2))
    reference = list(itertools.islice(stream.batches(), 40))
    assert all(len(b) == 4 for b in reference)
    first = list(itertools.islice(stream.from_iteration(0), 40))
    for start in (0, 1, 7, 13, 39):
        images, targets = next(stream.from_iteration(start))
        assert [t["index"] for t in targets] == [i for _, i in reference[start]], start
        assert torch.equal(torch.cat(images), torch.cat(first[start][0]))  # the same (pass, index) draw seeds


class _Ratios(torch.utils.data.Dataset):
    def __init__(self, ratios):
        self.ratios = ratios

    def __len__(self):
        return len(self.ratios)

    def __getitem__(self, index):
        return torch.rand(1), {"index": index}  # seeded by (seed, pass, index)

    def aspect_ratios(self):
        return self.ratios


def test_collate_keeps_sizes():
    batch = [(torch.zeros(3, 4, 5), {"image_id": 0}), (torch.zeros(3, 6, 2), {"image_id": 1})]
    images, targets = collate_fn(batch)
    assert isinstance(images, tuple) and [im.shape[1:] for im in images] == [(4, 5), (6, 2)]
    assert targets == ({"image_id": 0}, {"image_id": 1})
