import pytest
import torch

from ltbench.config import AugmentConfig
from ltbench.data.augment import augment_batch, cutout, random_crop
from ltbench.synth import NoiseConfig, SmoteConfig, build_synth, knn_within_class, mixup, remix_labels


def test_random_crop_equals_a_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = random_crop(x, 2, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    g2 = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 5, (16,), generator=g2), torch.randint(0, 5, (16,), generator=g2)
    for i in range(16):
        assert torch.equal(out[i], padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8])


def test_flip_is_identity_or_mirror():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (64, 3, 4, 4), dtype=torch.uint8)
    out = augment_batch(x, AugmentConfig(crop=False, flip=True), g)
    flipped = [torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)]
    same = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or s for f, s in zip(flipped, same)) and 10 < sum(flipped) < 54


def test_cutout_zeroes_a_square():
    x = torch.ones(8, 3, 32, 32)
    out = cutout(x, 16, torch.Generator().manual_seed(0))
    zeros = (out[:, 0] == 0).sum((1, 2))
    assert (zeros <= 256).all() and (zeros >= 64).all()  # clipped at borders: at least a quarter remains


def test_mixup_labels_and_inputs():
    x = torch.randn(32, 3, 4, 4)
    y = torch.arange(32) % 5
    m = mixup(x, y, 1.0, torch.Generator().manual_seed(0))
    lam = float(m.lam[0])
    assert torch.all(m.lam == lam) and 0 <= lam <= 1
    perm = [int((y == yb).nonzero()[0]) for yb in m.y_b]  # y_b is a permutation of y
    assert sorted(m.y_b.tolist()) == sorted(y.tolist()) and len(perm) == 32
    # x_mix = lam x + (1 - lam) x[partner], partner's label is y_b
    for i in range(32):
        partners = [j for j in range(32) if torch.allclose(m.x[i], lam * x[i] + (1 - lam) * x[j], atol=1e-5)]
        assert any(y[j] == m.y_b[i] for j in partners)


def test_remix_label_rule():
    counts = torch.tensor([1000.0, 100.0, 500.0])
    y_a = torch.tensor([0, 0, 1, 1, 0, 0])
    y_b = torch.tensor([1, 1, 0, 0, 2, 1])
    lam = torch.tensor([0.3, 0.7, 0.8, 0.3, 0.3, 0.5])
    out = remix_labels(lam, y_a, y_b, counts, kappa=3.0, tau=0.5)
    # 0: a majority (10x), lam < tau -> label all minority (b): 0
    # 1: a majority, lam >= tau -> plain mixup label 0.7
    # 2: a minority (1/10), 1-lam = 0.2 < tau -> label all a: 1
    # 3: a minority, 1-lam = 0.7 >= tau -> 0.3
    # 4: ratio 2 < kappa -> 0.3
    # 5: a majority, lam == tau (not < tau) -> 0.5
    assert out.tolist() == pytest.approx([0.0, 0.7, 1.0, 0.3, 0.3, 0.5])


def _two_class_set():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (60, 3, 4, 4), generator=g, dtype=torch.uint8)
    y = torch.tensor([0] * 50 + [1] * 10)
    return x, y


def test_knn_neighbours_are_same_class_nearest():
    x, y = _two_class_set()
    nb = knn_within_class(x, y, [1], k=3)
    assert (nb[:50] == -1).all()
    flat = x.reshape(60, -1).float()
    for i in range(50, 60):
        assert set(nb[i].tolist()) <= set(range(50, 60)) and i not in nb[i].tolist()
        d = ((flat[50:] - flat[i]) ** 2).sum(1)
        d[i - 50] = float("inf")
        assert set(nb[i].tolist()) == set((d.topk(3, largest=False).indices + 50).tolist())


def test_smote_points_lie_on_segments_to_same_class_neighbours():
    x, y = _two_class_set()
    s = build_synth(SmoteConfig(k=3), x, y, [50, 10])
    assert s.replace_p.tolist() == pytest.approx([0.0, 0.8])
    idx = torch.arange(60).repeat(5)
    out, mask = s.replace(x[idx], y[idx], idx, x, torch.Generator().manual_seed(0))
    assert not mask[y[idx] == 0].any()  # the largest class is never touched
    assert 0.6 < mask[y[idx] == 1].double().mean() < 0.95
    for j in torch.nonzero(mask).flatten().tolist():
        a = x[idx[j]].double().flatten()
        p = out[j].double().flatten()
        ok = False
        for n in s.neighbours[idx[j]].tolist():
            b = x[n].double().flatten()
            d = b - a
            t = float(((p - a) @ d) / (d @ d).clamp(min=1e-9))
            if -0.01 <= t <= 1.01 and (p - (a + t * d)).abs().max() <= 1.0:  # uint8 rounding
                ok = True
        assert ok, f"sample {j} is not on a segment to a same-class neighbour"


def test_noise_copies_only_minority():
    x, y = _two_class_set()
    s = build_synth(NoiseConfig(sigma=0.1), x, y, [50, 10])
    idx = torch.arange(60)
    out, mask = s.replace(x, y, idx, x, torch.Generator().manual_seed(0))
    assert torch.equal(out[:50], x[:50])
    changed = (out[50:] != x[50:]).flatten(1).any(1)
    assert torch.equal(changed, mask[50:])
