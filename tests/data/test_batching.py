import torch
from torch.utils.data import RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from fl_rpn.data import GroupedBatchSampler, collate_fn, create_aspect_ratio_groups


def test_aspect_ratio_groups():
    # k=3: edges 2 ** linspace(-1, 1, 7) = 0.5, 0.63, 0.79, 1, 1.26, 1.59, 2
    assert create_aspect_ratio_groups([0.4, 0.7, 1.0, 1.33, 1.5, 3.0], k=3) == [0, 2, 4, 5, 5, 7]
    assert create_aspect_ratio_groups([0.75, 1.0, 1.5], k=0) == [0, 1, 1]


def test_grouped_batches_exact_order():
    groups = [0, 1, 0, 1, 1, 0, 2]
    sampler = GroupedBatchSampler(SequentialSampler(range(7)), groups, batch_size=2)
    assert list(sampler) == [[0, 2], [1, 3], [4], [5], [6]]
    assert len(sampler) == 5


def _check_cover(batches, groups, indices, batch_size):
    flat = [i for b in batches for i in b]
    assert sorted(flat) == sorted(indices)
    assert all(len({groups[i] for i in b}) == 1 and 1 <= len(b) <= batch_size for b in batches)


def test_grouped_random_sampler_covers_each_index_once_deterministically():
    groups = [i % 3 for i in range(50)]

    def make():
        return GroupedBatchSampler(RandomSampler(range(50), generator=torch.Generator().manual_seed(0)), groups, 4)

    a = make()
    assert len(a) == 5 + 5 + 4  # 17, 17, 16 images per group
    batches = list(a)
    _check_cover(batches, groups, range(50), 4)
    assert len(batches) == len(a)
    assert batches == list(make())
    assert list(a) != batches  # the next epoch draws a new permutation from the same generator


def test_grouped_distributed_sampler():
    groups = [0] * 7 + [1] * 4
    per_rank = []
    for rank in range(2):
        base = DistributedSampler(range(11), num_replicas=2, rank=rank, shuffle=True, seed=1)
        sampler = GroupedBatchSampler(base, groups, 3)
        batches = list(sampler)
        assert len(sampler) == len(batches) and batches == list(sampler)
        _check_cover(batches, groups, list(base), 3)
        per_rank += [i for b in batches for i in b]
    assert set(per_rank) == set(range(11)) and len(per_rank) == 12  # DistributedSampler pads one


def test_collate_keeps_sizes():
    batch = [(torch.zeros(3, 4, 5), {"image_id": 0}), (torch.zeros(3, 6, 2), {"image_id": 1})]
    images, targets = collate_fn(batch)
    assert isinstance(images, tuple) and [im.shape[1:] for im in images] == [(4, 5), (6, 2)]
    assert targets == ({"image_id": 0}, {"image_id": 1})
