"""Deep imbalanced regression: each piece against a transcription of the reference code it reproduces.

References: YyzHarry/imbalanced-regression (agedb-dir/utils.py get_lds_kernel_window and calibrate_mean_var,
agedb-dir/datasets.py _prepare_weights, agedb-dir/fds.py, agedb-dir/loss.py, agedb-dir/train.py shot_metrics) and
jiawei-ren/BalancedMSE (imdb-wiki-dir/balanaced_mse.py gai_loss, bmc_loss, bni_loss).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from test_e2e import ltbench

from ltbench.config import GroupsConfig, to_schema
from ltbench.errors import ConfigError
from ltbench.losses.regression import L1, MSE, BalancedMSE, fit_gmm
from ltbench.methods.dir import FDS, DensityConfig, FDSConfig, _fill_empty, density_weights, fds_window, lds_window
from ltbench.presets import list_strategies
from ltbench.tasks import LabelStats
from ltbench.tasks.regression import bin_edges, binner, regression_summary


def stats_of(targets, start=0.0, width=1.0, num_bins=10, center=0.0, scale=1.0):
    y = torch.as_tensor(targets, dtype=torch.float64)
    bin_of = binner(bin_edges(start, width, num_bins))
    counts = torch.bincount(bin_of(y), minlength=num_bins).tolist()
    centers = [start + width * (i + 0.5) for i in range(num_bins)]
    return LabelStats(counts, bin_of, centers, center, scale, y.float())


# ------------------------------------------------------------------------------------------------ bins


def test_bins_follow_np_histogram_on_float32_targets():
    """The DIR reference bins float32 scores with np.histogram(range=(0, 5), bins=50), whose edges are then float32."""
    y = np.array([0.0, 0.3, 0.35, 1.4, 3.6, 4.99, 5.0, 0.29], dtype=np.float32)
    ref = np.histogram(y, bins=50, range=(0.0, 5.0))[1]
    expected = [min(int(np.searchsorted(ref, v, side="right")) - 1, 49) for v in y]
    got = binner(bin_edges(0.0, 0.1, 50))(torch.from_numpy(y)).tolist()
    assert got == expected
    assert got[1] == 3 and got[3] == 14 and got[6] == 49  # a score on an edge starts its bin; 5.0 in the last
    assert binner(bin_edges(0.0, 1.0, 10))(torch.tensor([-3.0, 12.0])).tolist() == [0, 9]  # clamped


# ------------------------------------------------------------------------------------------------ LDS


@pytest.mark.parametrize(
    "kernel,ks,sigma,expected",
    [  # the reference's get_lds_kernel_window (scipy gaussian_filter1d on a delta, mode reflect), to 4 decimals
        ("gaussian", 5, 2.0, [0.8583, 0.9458, 1.0, 0.9458, 0.8583]),
        ("gaussian", 5, 1.0, [0.1464, 0.6069, 1.0, 0.6069, 0.1464]),
        ("gaussian", 9, 1.0, [0.0003, 0.0111, 0.1353, 0.6065, 1.0, 0.6065, 0.1353, 0.0111, 0.0003]),
        ("triang", 5, 2.0, [1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3]),
        ("laplace", 5, 2.0, [0.3679, 0.6065, 1.0, 0.6065, 0.3679]),
    ],
)
def test_lds_windows_equal_the_reference(kernel, ks, sigma, expected):
    assert lds_window(kernel, ks, sigma) == pytest.approx(expected, abs=1e-4)


def test_fds_window_is_normalised_to_sum_one():
    assert fds_window("gaussian", 5, 2.0) == pytest.approx([0.1863, 0.2052, 0.2170, 0.2052, 0.1863], abs=1e-4)
    assert fds_window("triang", 5, 1.0).sum() == pytest.approx(1.0)


def convolve1d_constant(values, window):
    """scipy.ndimage.convolve1d(values, window, mode='constant') for an odd, symmetric window: the output has the
    input's dtype (float64 sums cast to it: integer inputs are truncated)."""
    values = np.asarray(values)
    half = len(window) // 2
    out = np.zeros(len(values))
    for i in range(len(values)):
        for j, w in enumerate(window):
            k = i + half - j
            if 0 <= k < len(values):
                out[i] += w * values[k]
    return out.astype(values.dtype)


def prepare_weights(labels, reweight, max_target, lds, window):
    """Transcribed from YyzHarry/imbalanced-regression agedb-dir/datasets.py (_prepare_weights)."""
    value_dict = {x: 0 for x in range(max_target)}
    for label in labels:
        value_dict[min(max_target - 1, int(label))] += 1
    if reweight == "sqrt_inv":
        value_dict = {k: np.sqrt(v) for k, v in value_dict.items()}
    elif reweight == "inverse":
        value_dict = {k: np.clip(v, 5, 1000) for k, v in value_dict.items()}
    num_per_label = [value_dict[min(max_target - 1, int(label))] for label in labels]
    if lds:
        smoothed = convolve1d_constant(np.asarray(list(value_dict.values())), window)
        num_per_label = [smoothed[min(max_target - 1, int(label))] for label in labels]
    weights = [np.float32(1 / x) for x in num_per_label]
    scaling = len(weights) / np.sum(weights)
    return [scaling * x for x in weights]


@pytest.mark.parametrize("reweight,name,clip", [("sqrt_inv", "sqinv", None), ("inverse", "inv", [5.0, 1000.0])])
@pytest.mark.parametrize("lds", [False, True])
def test_lds_weights_equal_the_reference(reweight, name, clip, lds):
    rng = np.random.default_rng(0)
    labels = np.concatenate([rng.integers(10, 14, 300), rng.integers(0, 20, 40), [25, 25, 29]]).astype(float)
    cfg = DensityConfig(name=name, lds=lds, kernel="gaussian", ks=5, sigma=2.0, clip=clip)
    counts = torch.bincount(torch.as_tensor(np.minimum(labels, 29).astype(int)), minlength=30)
    per_bin = density_weights(cfg, counts)
    ours = per_bin[np.minimum(labels, 29).astype(int)].numpy()
    ref = prepare_weights(labels, reweight, 30, lds, lds_window("gaussian", 5, 2.0))
    assert ours == pytest.approx(np.asarray(ref, dtype=np.float64), rel=1e-5)
    assert ours.mean() == pytest.approx(1.0, rel=1e-5)  # the mean weight over the training samples is 1


# ------------------------------------------------------------------------------------------------ FDS


def calibrate_mean_var(matrix, m1, v1, m2, v2, clip_min=0.1, clip_max=10):
    """Transcribed from YyzHarry/imbalanced-regression agedb-dir/utils.py (calibrate_mean_var)."""
    matrix = matrix.clone()
    if torch.sum(v1) < 1e-10:
        return matrix
    if (v1 == 0.0).any():
        valid = v1 != 0.0
        factor = torch.clamp(v2[valid] / v1[valid], clip_min, clip_max)
        matrix[:, valid] = (matrix[:, valid] - m1[valid]) * torch.sqrt(factor) + m2[valid]
        return matrix
    factor = torch.clamp(v2 / v1, clip_min, clip_max)
    return (matrix - m1) * torch.sqrt(factor) + m2


def smooth_over_bins(stats, window):
    """The smoothing of agedb-dir/fds.py (update_last_epoch_stats): reflect padding, conv1d over the bin axis."""
    half = (len(window) - 1) // 2
    x = F.pad(stats.permute(1, 0).unsqueeze(1), pad=(half, half), mode="reflect")
    return F.conv1d(x, weight=torch.as_tensor(window, dtype=torch.float32).view(1, 1, -1)).permute(2, 1, 0)[:, 0]


def test_fds_statistics_smoothing_and_calibration_equal_the_reference():
    torch.manual_seed(0)
    cfg = FDSConfig(ks=3, sigma=1.0, momentum=0.9)
    fds = FDS(cfg, feature_dim=4, num_bins=6)
    feats = torch.randn(60, 4) * torch.arange(1, 5)
    bins = torch.arange(60) % 6
    fds.accumulate(feats, bins)
    fds.update(first=True)
    mean = torch.stack([feats[bins == b].mean(0) for b in range(6)])
    var = torch.stack([feats[bins == b].var(0, unbiased=True) for b in range(6)])
    assert torch.allclose(fds.running_mean, mean, atol=1e-5) and torch.allclose(fds.running_var, var, atol=1e-4)
    window = fds_window("gaussian", 3, 1.0)
    assert torch.allclose(fds.smoothed_mean, smooth_over_bins(mean, window), atol=1e-5)
    assert torch.allclose(fds.smoothed_var, smooth_over_bins(var, window), atol=1e-4)
    # the second epoch folds in with momentum: 0.1 new + 0.9 history
    feats2 = torch.randn(60, 4)
    fds.accumulate(feats2, bins)
    fds.update(first=False)
    mean2 = torch.stack([feats2[bins == b].mean(0) for b in range(6)])
    assert torch.allclose(fds.running_mean, 0.1 * mean2 + 0.9 * mean, atol=1e-5)
    # calibration of a batch, bin by bin, against calibrate_mean_var
    z, zb = torch.randn(12, 4), torch.arange(12) % 6
    ours = fds.calibrate(z, zb)
    for b in range(6):
        ref = calibrate_mean_var(
            z[zb == b], fds.running_mean[b], fds.running_var[b], fds.smoothed_mean[b], fds.smoothed_var[b]
        )
        assert torch.allclose(ours[zb == b], ref, atol=1e-5)


def test_fds_is_the_identity_without_smoothing_and_before_any_update():
    cfg = FDSConfig(ks=1, sigma=1.0)
    fds = FDS(cfg, feature_dim=3, num_bins=4)
    z, b = torch.randn(8, 3), torch.arange(8) % 4
    assert torch.allclose(fds.calibrate(z, b), z)  # running 0/1 = smoothed 0/1
    fds.accumulate(torch.randn(40, 3), torch.arange(40) % 4)
    fds.update(first=True)
    assert torch.allclose(fds.calibrate(z, b), z, atol=1e-6)  # a window of one bin: smoothed = running


def test_empty_bins_take_their_neighbours():
    stats = torch.tensor([[1.0], [0.0], [0.0], [4.0], [0.0]])
    filled = torch.tensor([True, False, False, True, False])
    assert _fill_empty(stats, filled).flatten().tolist() == pytest.approx([1.0, 2.0, 3.0, 4.0, 4.0])


# ------------------------------------------------------------------------------------------------ losses


def test_dir_losses_take_the_plain_mean_of_weighted_terms():
    """agedb-dir/loss.py weighted_mse_loss / weighted_l1_loss: mean(w * l), not divided by sum(w)."""
    s = stats_of([1.0, 2.0, 2.0, 3.0], num_bins=5)
    out, y = torch.tensor([[1.5], [2.0], [0.0], [3.0]]), torch.tensor([1.0, 2.0, 2.0, 3.0])
    w = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])
    wy = w[s.bin_of(y)]
    assert MSE(s)(out, y, w).item() == pytest.approx(((out[:, 0] - y) ** 2 * wy).mean().item())
    assert L1(s)(out, y, w).item() == pytest.approx(((out[:, 0] - y).abs() * wy).mean().item())
    # targets are normalised for the loss: (y - center) / scale
    s2 = stats_of([1.0, 2.0, 2.0, 3.0], num_bins=5, center=2.0, scale=0.5)
    assert MSE(s2)(out, y).item() == pytest.approx(((out[:, 0] - (y - 2.0) / 0.5) ** 2).mean().item())


def gai_loss(pred, target, gmm, noise_var):
    """Transcribed from jiawei-ren/BalancedMSE imdb-wiki-dir/balanaced_mse.py (gai_loss)."""
    gmm = {k: gmm[k].reshape(1, -1).expand(pred.shape[0], -1) for k in gmm}
    mse_term = F.mse_loss(pred, target, reduction="none") / 2 / noise_var + 0.5 * noise_var.log()
    sum_var = gmm["variances"] + noise_var
    balancing_term = -0.5 * sum_var.log() - 0.5 * (pred - gmm["means"]).pow(2) / sum_var + gmm["weights"].log()
    balancing_term = torch.logsumexp(balancing_term, dim=-1, keepdim=True)
    loss = mse_term + balancing_term
    return (loss * (2 * noise_var).detach()).mean()


def bmc_loss(pred, target, noise_var):
    """Transcribed from jiawei-ren/BalancedMSE imdb-wiki-dir/balanaced_mse.py (bmc_loss)."""
    logits = -(pred - target.T).pow(2) / (2 * noise_var)
    loss = F.cross_entropy(logits, torch.arange(pred.shape[0]))
    return loss * (2 * noise_var).detach()


def bni_loss(pred, target, noise_var, bucket_centers, bucket_weights):
    """Transcribed from jiawei-ren/BalancedMSE imdb-wiki-dir/balanaced_mse.py (bni_loss)."""
    mse_term = F.mse_loss(pred, target, reduction="none") / 2 / noise_var
    num_bucket = bucket_centers.shape[0]
    bucket_center = bucket_centers.unsqueeze(0).repeat(pred.shape[0], 1)
    bucket_weights = bucket_weights.unsqueeze(0).repeat(pred.shape[0], 1)
    balancing_term = -0.5 * (pred.expand(-1, num_bucket) - bucket_center).pow(2) / noise_var + bucket_weights.log()
    balancing_term = torch.logsumexp(balancing_term, dim=-1, keepdim=True)
    return ((mse_term + balancing_term) * (2 * noise_var).detach()).mean()


@pytest.mark.parametrize("method", ["gai", "bmc", "bni"])
def test_balanced_mse_value_and_noise_gradient_equal_the_reference(method):
    g = torch.Generator().manual_seed(0)
    targets = torch.cat([torch.randn(300, generator=g) * 0.5 + 5, torch.rand(40, generator=g) * 10])
    s = stats_of(targets, num_bins=10)
    loss = BalancedMSE(s, method, noise_sigma=1.3, learn_noise=True, components=3)
    pred = (torch.rand(32, 1, generator=g) * 10).requires_grad_(True)
    y = torch.rand(32, generator=g) * 10
    ours = loss(pred, y)
    ours.backward()
    sigma = torch.tensor(1.3, requires_grad=True)
    p2 = pred.detach().clone().requires_grad_(True)
    if method == "gai":
        gmm = {"means": loss.gmm_mu, "variances": loss.gmm_var, "weights": loss.gmm_pi}
        ref = gai_loss(p2, y[:, None], gmm, sigma**2)
    elif method == "bmc":
        ref = bmc_loss(p2, y[:, None], sigma**2)
    else:
        ref = bni_loss(p2, y[:, None], sigma**2, loss.bucket_centers, loss.bucket_log_weights.exp())
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(pred.grad, p2.grad, rtol=1e-4, atol=1e-7)
    assert loss.noise_sigma.grad.item() == pytest.approx(sigma.grad.item(), rel=1e-4)  # the learnable noise
    assert [g.name for g in loss.param_groups()] == ["noise_sigma"] and loss.param_groups()[0].fixed_lr == 0.01


def test_bni_buckets_are_the_occupied_bins_with_their_shares():
    s = stats_of([0.2, 0.4, 1.5, 1.5, 7.1], num_bins=10)
    loss = BalancedMSE(s, "bni", components=2)
    assert loss.bucket_centers.tolist() == pytest.approx([0.0, 1.0, 7.0])  # bin k's bucket at k (the reference)
    mid = BalancedMSE(s, "bni", components=2, centers="midpoint")
    assert mid.bucket_centers.tolist() == pytest.approx([0.5, 1.5, 7.5])  # ltbench's former variant, an option
    assert loss.bucket_log_weights.exp().tolist() == pytest.approx([0.4, 0.4, 0.2])


def test_gmm_fit_recovers_a_two_component_mixture():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(3000, generator=g) * 0.5 + 2, torch.randn(1000, generator=g) * 0.3 + 7])
    pi, mu, var = fit_gmm(x, 2)
    order = mu.argsort()
    assert mu[order].tolist() == pytest.approx([2.0, 7.0], abs=0.05)
    assert pi[order].tolist() == pytest.approx([0.75, 0.25], abs=0.02)
    assert var[order].sqrt().tolist() == pytest.approx([0.5, 0.3], abs=0.03)


# ------------------------------------------------------------------------------------------------ metrics


def test_shot_groups_over_bins_count_empty_bins_as_few_and_record_sizes():
    # training counts per 1-wide bin: bin 0: 150 (many), bin 1: 50 (medium), bin 2: 5 (few), bin 3: 0 (few)
    train = [0.5] * 150 + [1.5] * 50 + [2.5] * 5
    s = stats_of(train, num_bins=4)
    target = torch.tensor([0.2, 0.7, 1.1, 2.2, 3.3, 3.9], dtype=torch.float64)
    pred = target + torch.tensor([1.0, -1.0, 2.0, -4.0, 0.5, 0.5], dtype=torch.float64)
    m = regression_summary(pred, target, s, GroupsConfig(rule="counts"))
    assert m["group_sizes"] == {"many": 1, "medium": 1, "few": 2}
    assert m["group_test_samples"] == {"many": 2, "medium": 1, "few": 3}
    assert (m["many"], m["medium"], m["few"]) == pytest.approx((1.0, 2.0, 5.0 / 3))
    assert m["mae"] == pytest.approx(9.0 / 6) and m["mse"] == pytest.approx((1 + 1 + 4 + 16 + 0.25 + 0.25) / 6)
    assert m["gm"] == pytest.approx(float(np.exp(np.mean(np.log([1, 1, 2, 4, 0.5, 0.5])))))
    assert m["per_bin_mae"] == pytest.approx([1.0, 2.0, 4.0, 0.5])
    assert m["group_errors"]["few"]["gm"] == pytest.approx(float(np.exp(np.mean(np.log([4, 0.5, 0.5])))))
    exact = regression_summary(target, target, s, GroupsConfig(rule="counts"))
    assert exact["gm"] == 0.0 and exact["pearson"] == pytest.approx(1.0)  # as scipy.stats.gmean: a zero error


# ------------------------------------------------------------------------------------------------ end to end


STRATEGIES = [p.name for p in list_strategies() if "regression" in p.tasks]  # every preset that applies to it


@pytest.mark.slow
def test_every_regression_method_trains_from_the_cli_and_the_report_compares_them(tmp_path):
    r = ltbench("train", "-m", "experiment=synthetic_dir", f"strategy={','.join(STRATEGIES)}", "schedule.epochs=5",
                "progress=false", "device=cpu", f"results_dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in tmp_path.rglob("metrics.json")]
    assert sorted(x["strategy"] for x in recs) == sorted(STRATEGIES)
    assert all(x["status"] == "completed" and x["task"] == "regression" and x["mae"] > 0 for x in recs)
    r = ltbench("report", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (tmp_path / "report.md").read_text()
    assert "synthetic_dir" in md and "Lower is better: MAE" in md and "bins (many/medium/few)" in md
    assert next(tmp_path.glob("per_bin_synthetic_dir_*.png")).stat().st_size > 1000


def test_fds_refuses_a_synth_it_would_silently_skip():
    with (
        initialize_config_module("ltbench.conf", version_base="1.3"),
        pytest.raises(ConfigError, match="does not combine with synth=mixup"),
    ):
        to_schema(compose("train", overrides=["experiment=synthetic_dir", "strategy=fds", "synth=mixup"]))
