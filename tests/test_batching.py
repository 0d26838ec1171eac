from prlhf.train.batching import EpochBatchSampler


def test_plain_sampler_covers_every_pair_once_and_reshuffles_per_epoch():
    s = EpochBatchSampler(23, 4, seed=0)
    first = list(s)
    assert sorted(i for b in first for i in b) == list(range(23)) and len(first) == len(s) == 6
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first  # an epoch's order depends only on (seed, epoch): what resume relies on


def test_length_grouping_keeps_similar_lengths_together():
    lengths = [(i * 37) % 101 for i in range(200)]
    batches = list(EpochBatchSampler(200, 8, seed=0, lengths=lengths, bucket=5))
    assert sorted(i for b in batches for i in b) == list(range(200))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 25  # a random batch of 8 from 0..100 spans ~75


def test_length_grouping_gives_the_same_steps_for_any_split_of_a_step():
    """One step of 8 pairs = 2 processes x 4 = 8 accumulated batches of 1: the same pairs in every layout."""
    lengths = [(i * 37) % 101 for i in range(96)]
    one = [set(b) for b in EpochBatchSampler(96, 8, 0, lengths, bucket=3, group=1)]
    for batch_size, group in ((4, 2), (1, 8), (2, 4)):
        split = list(EpochBatchSampler(96, batch_size, 0, lengths, bucket=3, group=group))
        merged = [set().union(*split[k:k + group]) for k in range(0, len(split), group)]
        assert merged == one
