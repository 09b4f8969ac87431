import pytest
import torch

from ltbench.config import SamplerConfig
from ltbench.samplers import DRSConfig, Sampler, sampler_config, shard

COUNTS = [400, 160, 64, 25, 10]
LABELS = torch.repeat_interleave(torch.arange(5), torch.tensor(COUNTS))[
    torch.randperm(659, generator=torch.Generator().manual_seed(0))
]
N = sum(COUNTS)


def hist(name, epoch=0, epochs=10, reps=40, **kw):
    s = Sampler(sampler_config(name, **kw), LABELS, 5, epochs)
    draws = torch.cat([s.epoch_indices(epoch, torch.Generator().manual_seed(r)) for r in range(reps)])
    return torch.bincount(LABELS[draws], minlength=5).double() / len(draws), s


def assert_probs(p, expected, tol=0.01):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(p, expected / expected.sum(), atol=tol), (p, expected / expected.sum())


def test_instance_is_a_permutation():
    s = Sampler(SamplerConfig(name="instance"), LABELS, 5, 10)
    idx = s.epoch_indices(0, torch.Generator().manual_seed(0))
    assert sorted(idx.tolist()) == list(range(N))


def test_class_balanced_histogram():
    p, _ = hist("class_balanced")
    assert_probs(p, [1] * 5)


def test_sqrt_histogram():
    p, _ = hist("sqrt")
    assert_probs(p, [c**0.5 for c in COUNTS])


def test_images_within_a_class_are_uniform():
    s = Sampler(SamplerConfig(name="class_balanced"), LABELS, 5, 10)
    draws = torch.cat([s.epoch_indices(0, torch.Generator().manual_seed(r)) for r in range(200)])
    rare = torch.nonzero(LABELS == 4).flatten()
    per_image = torch.bincount(draws, minlength=N)[rare].double()
    assert (per_image / per_image.mean() - 1).abs().max() < 0.15  # 10 images, ~2600 draws each


def test_progressive_end_points_and_middle():
    p0, _ = hist("progressive", epoch=0, epochs=11)
    assert_probs(p0, COUNTS)
    p_end, _ = hist("progressive", epoch=10, epochs=11)
    assert_probs(p_end, [1] * 5)
    p_mid, _ = hist("progressive", epoch=5, epochs=11)
    inst = torch.tensor(COUNTS, dtype=torch.float64) / N
    assert_probs(p_mid, 0.5 * inst + 0.5 * torch.full((5,), 0.2))


def test_oversampling_epoch_size_and_exact_counts():
    s = Sampler(SamplerConfig(name="oversample"), LABELS, 5, 10)
    idx = s.epoch_indices(0, torch.Generator().manual_seed(0))
    assert len(idx) == 5 * 400
    assert torch.bincount(LABELS[idx]).tolist() == [400] * 5
    # every image of every class appears at least floor(400 / n_c) times
    per_image = torch.bincount(idx, minlength=N)
    for c, n in enumerate(COUNTS):
        assert per_image[LABELS == c].min() >= 400 // n


def test_undersampling_epoch_size_and_redraw():
    s = Sampler(SamplerConfig(name="undersample"), LABELS, 5, 10)
    a = s.epoch_indices(0, torch.Generator().manual_seed(0))
    b = s.epoch_indices(1, torch.Generator().manual_seed(1))
    assert len(a) == 5 * 10 and torch.bincount(LABELS[a]).tolist() == [10] * 5
    assert len(set(a.tolist())) == 50  # without replacement within an epoch
    assert set(a.tolist()) != set(b.tolist())  # redrawn


def test_class_reorg_fills_every_class_to_max():
    s = Sampler(SamplerConfig(name="class_reorg"), LABELS, 5, 10)
    idx = s.epoch_indices(0, torch.Generator().manual_seed(0))
    assert len(idx) == 5 * 400 and torch.bincount(LABELS[idx]).tolist() == [400] * 5
    assert (LABELS[idx[:50]] != LABELS[idx[:50]].sort().values).any()  # shuffled across classes


def test_drs_switches_at_start_epoch():
    s = Sampler(DRSConfig(start=0.3), LABELS, 5, 10)
    before = s.epoch_indices(2, torch.Generator().manual_seed(0))
    assert sorted(before.tolist()) == list(range(N))
    p, _ = hist("drs", epoch=3, start=0.3)
    assert_probs(p, [1] * 5)


def test_same_generator_same_stream():
    s = Sampler(SamplerConfig(name="class_balanced"), LABELS, 5, 10)
    a = s.epoch_indices(4, torch.Generator().manual_seed(9))
    b = s.epoch_indices(4, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["class_balanced", "class_reorg", "oversample"])
@pytest.mark.parametrize("world", [2, 3])
def test_sharding_keeps_class_balance_and_covers_stream(name, world):
    s = Sampler(SamplerConfig(name=name), LABELS, 5, 10)
    per_rank = [torch.zeros(5, dtype=torch.float64) for _ in range(world)]
    for r in range(60):
        stream = s.epoch_indices(0, torch.Generator().manual_seed(r))
        shards = [shard(stream, k, world) for k in range(world)]
        assert len({len(x) for x in shards}) == 1  # every rank the same number of steps
        pad = (-len(stream)) % world
        # together the shards are the stream plus its first `pad` entries (the wrap-around padding)
        assert sorted(torch.cat(shards).tolist()) == sorted(stream.tolist() + stream[:pad].tolist())
        for k in range(world):
            per_rank[k] += torch.bincount(LABELS[shards[k]], minlength=5)
    for k in range(world):
        assert_probs(per_rank[k] / per_rank[k].sum(), [1] * 5, tol=0.015)  # ~4 sigma


def test_shard_pads_by_wrapping():
    stream = torch.arange(7)
    assert shard(stream, 0, 3).tolist() == [0, 3, 6]
    assert shard(stream, 2, 3).tolist() == [2, 5, 1]
    assert shard(stream, 0, 1).tolist() == list(range(7))
