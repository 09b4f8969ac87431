"""The DIR and Balanced MSE settings against transcriptions of the reference code, on identical inputs (issue 17):

- LDS weights: YyzHarry/imbalanced-regression agedb-dir/datasets.py ``_prepare_weights`` and sts-b-dir/tasks.py
  ``load_tsv`` (``scipy.ndimage.convolve1d`` of integer counts returns integers: truncated);
- FDS buckets: agedb-dir/fds.py ``FDS.update_running_stats`` with train.py's AgeDB ``bucket_start=3, bucket_num=100``;
- per-dataset clips: agedb-dir/datasets.py (inverse clip [5, 1000]), agedb-dir/utils.py and sts-b-dir/util.py
  ``calibrate_mean_var`` (FDS clip [0.1, 10] / [0.5, 2]), sts-b-dir/tasks.py (no weight clip);
- BNI buckets: jiawei-ren/BalancedMSE imdb-wiki-dir/datasets.py ``get_bucket_info`` (bucket centre = integer label);
- the synthetic recipe: jiawei-ren/BalancedMSE synthetic_benchmark/main_1d.py, loss.py and utils.py ``get_gmm``.

scipy and sklearn are not dependencies: ``convolve1d`` is transcribed in tests/test_regression.py (mode 'constant',
output in the input's dtype), and the one-component Gaussian mixture of the synthetic normal case is the sample mean
and (biased) variance plus sklearn's ``reg_covar`` 1e-6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from test_regression import convolve1d_constant as convolve1d
from test_regression import prepare_weights

from ltbench.config import to_schema
from ltbench.data.regression import synthetic_dir
from ltbench.losses.regression import BalancedMSE
from ltbench.methods.dir import FDS, FDSConfig, bucket_map, density_weights, lds_window
from ltbench.tasks.regression import Regression, RegressionConfig, bin_edges, binner


@pytest.fixture(scope="module")
def cfg_of():
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        yield lambda *o: to_schema(compose("train", overrides=list(o)))


def agedb_prepare_weights(labels, reweight: str, lds: bool, max_target: int = 121) -> np.ndarray:
    """YyzHarry/imbalanced-regression agedb-dir/datasets.py (AgeDB._prepare_weights), as transcribed in
    tests/test_regression.py, with the reference's LDS window (Gaussian, ks 5, sigma 2)."""
    return np.asarray(prepare_weights(labels, reweight, max_target, lds, lds_window("gaussian", 5, 2.0)))


def stsb_weights(targs, reweight: str, lds: bool, bins: int = 50) -> np.ndarray:
    """Transcribed from YyzHarry/imbalanced-regression sts-b-dir/tasks.py (load_tsv, the re-weighting part)."""
    value_lst, bins_edges = np.histogram(targs, bins=bins, range=(0.0, 5.0))

    def get_bin_idx(label):
        return bins - 1 if label == 5.0 else np.where(bins_edges > label)[0][0] - 1

    if reweight == "sqrt_inv":
        value_lst = [np.sqrt(x) for x in value_lst]
    num_per_label = [value_lst[get_bin_idx(label)] for label in targs]
    if lds:
        smoothed = convolve1d(np.asarray(value_lst), lds_window("gaussian", 5, 2.0))
        num_per_label = [smoothed[get_bin_idx(label)] for label in targs]
    weights = [np.float32(1 / x) for x in num_per_label]
    scaling = len(weights) / np.sum(weights)
    return np.asarray([scaling * x for x in weights], dtype=np.float64)


def skewed_ages(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.gamma(6.0, 7.0, 4000)), 0, 130).astype(np.float64)  # AgeDB-like: few old, few young


def ltbench_sample_weights(reweight_cfg, labels: np.ndarray, start: float, width: float, num_bins: int) -> np.ndarray:
    bin_of = binner(bin_edges(start, width, num_bins))
    bins = bin_of(torch.as_tensor(labels, dtype=torch.float32))
    per_bin = density_weights(reweight_cfg, torch.bincount(bins, minlength=num_bins))
    return per_bin[bins].double().numpy()


@pytest.mark.parametrize("strategy,reweight", [("lds", "sqrt_inv"), ("inv", "inverse")])
def test_agedb_lds_weights_equal_the_reference_with_truncated_integer_counts(cfg_of, strategy, reweight):
    cfg = cfg_of("experiment=agedb_dir", f"strategy={strategy}", "reweight.lds=true")
    assert cfg.reweight.clip == ([5.0, 1000.0] if strategy == "inv" else None)
    labels = skewed_ages()
    ours = ltbench_sample_weights(cfg.reweight, labels, 0.0, 1.0, 121)
    ref = agedb_prepare_weights(labels, reweight, lds=True)
    assert ours == pytest.approx(ref, rel=1e-5)
    if strategy == "inv":  # the float variant is still there, and is not the reference
        cfg.reweight.lds_truncate = False
        assert np.abs(ltbench_sample_weights(cfg.reweight, labels, 0.0, 1.0, 121) / ref - 1).max() > 1e-3


def test_stsb_weights_equal_the_reference_without_a_clip(cfg_of):
    cfg = cfg_of("experiment=stsb_dir", "strategy=inv", "reweight.lds=true")
    assert cfg.reweight.clip is None  # sts-b-dir/tasks.py clips nothing
    rng = np.random.default_rng(1)
    targs = np.clip(np.concatenate([rng.normal(3.5, 0.8, 3000), rng.uniform(0, 5, 200)]), 0, 5)
    targs = np.minimum(np.floor(targs * 100) / 100 + 0.003, 4.999)  # off the 0.1 edges: float32, float64 agree
    ours = ltbench_sample_weights(cfg.reweight, targs, 0.0, 0.1, 50)
    assert ours == pytest.approx(stsb_weights(targs, "inverse", lds=True), rel=1e-5)


def test_reference_clips_per_dataset(cfg_of):
    for exp, inv_clip, fds_clip in [("agedb_dir", [5.0, 1000.0], [0.1, 10.0]), ("imdbwiki_dir", [5.0, 1000.0],
                                    [0.1, 10.0]), ("stsb_dir", None, [0.5, 2.0])]:  # fmt: skip
        assert cfg_of(f"experiment={exp}", "strategy=inv").reweight.clip == inv_clip
        assert cfg_of(f"experiment={exp}", "strategy=fds").method.clip == fds_clip
    assert cfg_of("experiment=stsb_dir", "strategy=inv", "reweight.clip=[1,10]").reweight.clip == [1.0, 10.0]


# ------------------------------------------------------------------------------------------------ FDS buckets


def reference_fds_update(features, labels, bucket_start=3, bucket_num=100, momentum=0.9):
    """Transcribed from YyzHarry/imbalanced-regression agedb-dir/fds.py (FDS.update_running_stats at the epoch
    start_update, i.e. factor 0): per-bucket mean and variance with the end buckets pooled."""
    feature_dim = features.shape[1]
    running_mean = torch.zeros(bucket_num - bucket_start, feature_dim)
    running_var = torch.ones(bucket_num - bucket_start, feature_dim)
    for label in torch.unique(labels):
        if label > bucket_num - 1 or label < bucket_start:
            continue
        elif label == bucket_start:
            curr_feats = features[labels <= label]
        elif label == bucket_num - 1:
            curr_feats = features[labels >= label]
        else:
            curr_feats = features[labels == label]
        curr_mean = torch.mean(curr_feats, 0)
        curr_var = torch.var(curr_feats, 0, unbiased=True if curr_feats.size(0) != 1 else False)  # noqa: SIM210
        factor = 0  # epoch == start_update
        b = int(label - bucket_start)
        running_mean[b] = (1 - factor) * curr_mean + factor * running_mean[b]
        running_var[b] = (1 - factor) * curr_var + factor * running_var[b]
    return running_mean, running_var


def test_fds_buckets_of_agedb_pool_the_ends_as_the_reference(cfg_of):
    cfg = cfg_of("experiment=agedb_dir", "strategy=fds")
    assert (cfg.method.bucket_start, cfg.method.bucket_num) == (3, 100)
    assert (cfg_of("experiment=imdbwiki_dir", "strategy=fds").method.bucket_num,
            cfg_of("experiment=stsb_dir", "strategy=fds").method.bucket_num) == (100, 50)  # fmt: skip
    torch.manual_seed(0)
    labels = torch.as_tensor(skewed_ages(2), dtype=torch.float32)
    labels[:3] = torch.tensor([0.0, 3.0, 99.0])  # both end buckets occupied, as in AgeDB's training set
    feats = torch.randn(len(labels), 4) + labels[:, None] / 50
    fds = FDS(cfg.method, 4, 97)
    bins = bucket_map(binner(bin_edges(0.0, 1.0, 121)), 3, 100)(labels)
    fds.accumulate(feats, bins)
    fds.update(first=True)
    ref_mean, ref_var = reference_fds_update(feats, labels)
    assert int(fds.seen_bins.sum()) > 80  # buckets without a sample keep mean 0, variance 1 in both
    assert fds.running_mean == pytest.approx(ref_mean, abs=1e-5)
    assert fds.running_var == pytest.approx(ref_var, abs=1e-4)


def test_fds_bucket_settings_are_checked():
    from ltbench.errors import ConfigError

    with pytest.raises(ConfigError, match="bucket"):
        FDSConfig(bucket_start=5, bucket_num=5)
    c = FDSConfig()
    c.resolve("some_dataset", 40)
    assert (c.bucket_start, c.bucket_num, c.clip) == (0, 40, [0.1, 10.0])


# ------------------------------------------------------------------------------------------------ BNI


def get_bucket_info(labels, max_target=121):
    """Transcribed from jiawei-ren/BalancedMSE imdb-wiki-dir/datasets.py (IMDBWIKI.get_bucket_info, lds=False)."""
    value_dict = {x: 0 for x in range(max_target)}
    for label in labels:
        if int(label) < max_target:
            value_dict[int(label)] += 1
    bucket_centers = np.asarray([k for k, _ in value_dict.items()])
    bucket_weights = np.asarray([v for _, v in value_dict.items()])
    bucket_centers = np.asarray([bucket_centers[k] for k, v in enumerate(bucket_weights) if v > 0])
    bucket_weights = np.asarray([bucket_weights[k] for k, v in enumerate(bucket_weights) if v > 0])
    return bucket_centers, bucket_weights / bucket_weights.sum()


def bni_loss(pred, target, noise_var, bucket_centers, bucket_weights):
    """Transcribed from jiawei-ren/BalancedMSE imdb-wiki-dir/balanaced_mse.py (bni_loss)."""
    mse_term = torch.nn.functional.mse_loss(pred, target, reduction="none") / 2 / noise_var
    num_bucket = bucket_centers.shape[0]
    bucket_center = bucket_centers.unsqueeze(0).repeat(pred.shape[0], 1)
    bucket_weights = bucket_weights.unsqueeze(0).repeat(pred.shape[0], 1)
    balancing_term = -0.5 * (pred.expand(-1, num_bucket) - bucket_center).pow(2) / noise_var + bucket_weights.log()
    balancing_term = torch.logsumexp(balancing_term, dim=-1, keepdim=True)
    return ((mse_term + balancing_term) * (2 * noise_var).detach()).mean()


def test_bni_buckets_sit_at_the_integer_label_as_the_reference():
    ages = skewed_ages(3)[:500]
    ages = ages[ages < 121]
    task = Regression(RegressionConfig())

    class Data:
        bin_start, bin_width, num_bins, train_y = 0.0, 1.0, 121, torch.as_tensor(ages, dtype=torch.float32)

    stats = task.label_stats(Data)
    loss = BalancedMSE(stats, "bni", noise_sigma=3.0, learn_noise=False)
    centers, weights = get_bucket_info(ages)
    assert loss.bucket_centers.tolist() == pytest.approx(centers.tolist())
    assert loss.bucket_log_weights.exp().tolist() == pytest.approx(weights.tolist(), rel=1e-5)
    pred = torch.linspace(0, 100, 64)[:, None]
    target = torch.as_tensor(ages[:64], dtype=torch.float32)[:, None]
    ref = bni_loss(pred, target, torch.tensor(9.0), torch.as_tensor(centers, dtype=torch.float32),
                   torch.as_tensor(weights, dtype=torch.float32))  # fmt: skip
    assert float(loss(pred, target[:, 0])) == pytest.approx(float(ref), rel=1e-5)


# ------------------------------------------------------------------------------------------------ synthetic


def gai_loss_md(pred, target, gmm, noise_var):
    """Transcribed from jiawei-ren/BalancedMSE synthetic_benchmark/loss.py (gai_loss_md)."""
    from torch.distributions import MultivariateNormal as MVN

    eye = torch.eye(pred.shape[-1])
    mse_term = -MVN(pred, noise_var * eye).log_prob(target)
    balancing = MVN(gmm["means"], gmm["variances"] + noise_var * eye).log_prob(pred.unsqueeze(1)) + gmm["weights"].log()
    loss = mse_term + torch.logsumexp(balancing, dim=1)
    return (loss * (2 * noise_var).detach()).mean()


def test_synthetic_recipe_is_main_1d(cfg_of):
    cfg = cfg_of("experiment=synthetic_dir", "strategy=bmse_gai")
    s, loss = cfg.schedule, cfg.loss
    # main_1d.py: SGD lr 0.001, momentum 0.9, batch 256, CosineAnnealingLR(T_max=2000) stepped per epoch
    assert (s.optimizer, s.lr, s.momentum, s.batch_size, s.epochs, s.decay, s.weight_decay) == (
        "sgd", 0.001, 0.9, 256, 2000, "cosine", 0.0)  # fmt: skip
    # get_gmm(n_components=1 if normal else 64) on draws of the law; learnable sigma at lr 0.001
    assert (loss.gmm_components, loss.gmm_prior, loss.sigma_lr, loss.noise_sigma) == (1, "generator", 0.001, 1.0)
    assert cfg_of("experiment=synthetic_dir", "strategy=bmse_gai", "dataset.dist=exp").loss.gmm_components == 64
    dir_cfg = cfg_of("experiment=agedb_dir", "strategy=bmse_gai").loss  # the DIR code's settings elsewhere
    assert (dir_cfg.gmm_components, dir_cfg.gmm_prior, dir_cfg.sigma_lr) == (8, "train", 0.01)


def test_synthetic_gai_prior_is_the_generating_law_and_the_loss_is_the_reference(cfg_of):
    cfg = cfg_of("experiment=synthetic_dir", "strategy=bmse_gai", "loss.learn_noise=false")
    data = synthetic_dir(cfg.dataset, None)
    task = Regression(cfg.task)
    stats = task.label_stats(data)
    assert stats.prior_targets is not None and len(stats.prior_targets) == 10_000
    loss = BalancedMSE.from_config(cfg.loss, stats)
    law = stats.prior_targets.double()
    # sklearn GaussianMixture(n_components=1): the mean and the biased variance (+ reg_covar 1e-6)
    assert float(loss.gmm_mu[0]) == pytest.approx(float(law.mean()), abs=1e-4)
    assert float(loss.gmm_var[0]) == pytest.approx(float(law.var(unbiased=False)) + 1e-6, rel=1e-4)
    assert float(loss.gmm_mu[0]) == pytest.approx(5.0, abs=0.02) and math.sqrt(float(loss.gmm_var[0])) == \
        pytest.approx(0.5, abs=0.01)  # fmt: skip
    gmm = {"means": loss.gmm_mu[:, None].double(), "variances": loss.gmm_var[:, None, None].double(),
           "weights": loss.gmm_pi.double()}  # fmt: skip
    x = data.train_x[:256]
    pred, target = (x * 0.8 + 1.0).double(), data.train_y[:256, None].double()
    ref = gai_loss_md(pred, target, gmm, torch.tensor(1.0, dtype=torch.float64))
    assert float(loss(pred.float(), target[:, 0].float())) == pytest.approx(float(ref), rel=1e-4)
    assert not loss.noise_sigma.requires_grad and loss.param_groups() == []  # main_1d.py's fixed-noise GAI
