"""RankSim and ConR combined with FDS (``method=ranksim_fds`` / ``conr_fds``): the combined step against the reference.

Transcribed here: BorealisAI/ranksim-imbalanced-regression ``agedb-dir/resnet.py`` (``ResNet.forward`` after the
backbone and ``FDS.smooth``: the calibration is written into ``encoding`` in place, so the features returned to the
regulariser are the calibrated ones) and ``agedb-dir/utils.py`` (``calibrate_mean_var``); ``agedb-dir/train.py``
(``train``: ``loss = L1(outputs) + regularization_weight * batchwise_ranking_regularizer(features, ...)``);
BorealisAI/ConR ``agedb-dir/train.py`` (``model(imgs_c, ..., reg=False)``: the ConR views skip FDS). RankSim's and
ConR's regularisers are the transcriptions of tests/test_ranksim_conr.py (``ref_ranksim``, ``ref_conr``).
"""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch
from test_ranksim_conr import ref_conr, ref_ranksim
from torch import nn

from ltbench.config import to_schema
from ltbench.core import Batch, Epoch
from ltbench.errors import ConfigError
from ltbench.methods.conr import ConR, ConRConfig
from ltbench.methods.dir import FDSConfig
from ltbench.methods.ranksim import RankSim, RankSimConfig, unique_label_subset

START, NUM, D = 2, 8, 5  # FDS buckets 2..7 (labels below 2 pooled into 2, above 7 into 7), feature dimension


def ref_calibrate_mean_var(matrix, m1, v1, m2, v2, clip_min=0.1, clip_max=10):
    """agedb-dir/utils.py calibrate_mean_var."""
    if torch.sum(v1) < 1e-10:
        return matrix
    if (v1 == 0.0).any():
        valid = v1 != 0.0
        factor = torch.clamp(v2[valid] / v1[valid], clip_min, clip_max)
        matrix[:, valid] = (matrix[:, valid] - m1[valid]) * torch.sqrt(factor) + m2[valid]
        return matrix
    factor = torch.clamp(v2 / v1, clip_min, clip_max)
    return (matrix - m1) * torch.sqrt(factor) + m2


def ref_smooth(features, labels, stats):
    """agedb-dir/resnet.py FDS.smooth (epoch >= start_smooth), in place on ``features``; labels N x 1."""
    rm, rv, sm, sv = stats
    labels = labels.squeeze(1)
    for label in torch.unique(labels):
        if label > NUM - 1 or label < START:
            continue
        mask = labels <= label if label == START else (labels >= label if label == NUM - 1 else labels == label)
        b = int(label - START)
        features[mask] = ref_calibrate_mean_var(features[mask], rm[b], rv[b], sm[b], sv[b])
    return features


def ref_forward(encoder, head, x, targets, stats, smooth=True):
    """agedb-dir/resnet.py ResNet.forward from ``encoding`` on (training, FDS on): returns (x, encoding)."""
    encoding = encoder(x).view(x.size(0), -1)
    encoding_s = encoding
    if smooth:
        encoding_s = ref_smooth(encoding_s, targets, stats)
    return head(encoding_s), encoding


def _stats(seed: int):
    g = torch.Generator().manual_seed(seed)
    rm, sm = torch.randn(NUM - START, D, generator=g), torch.randn(NUM - START, D, generator=g)
    rv, sv = torch.rand(NUM - START, D, generator=g) + 0.2, torch.rand(NUM - START, D, generator=g) * 3 + 0.05
    rv[1, 2] = 0.0  # bucket 3: one dimension without variance (left as it is)
    rv[4] = 0.0  # bucket 6: no variance at all (the reference returns the features unchanged)
    return rm, rv, sm, sv


class _L1:
    """The supervised method's loss as the reference's (plain L1 on the first output); no sample weights."""

    def __call__(self, out, y, weight):
        return (out[:, 0] - y).abs().mean()

    def sample_weights(self, y, weight):
        return None


def _parts(seed: int = 0):
    torch.manual_seed(seed)  # the tiny network's initial weights only (the test's, not the method's draws)
    encoder = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, D))  # ends as ResNet: no op needing its output
    head = nn.Linear(D, 1)
    data = NS(name="", kind="features", mean=None, std=None, transforms=None)
    ctx = NS(data=data, cfg=NS(augment=None, dataset=NS()),
             stats=NS(num_bins=12, bin_of=lambda y: y.long(), center=0.0, scale=1.0))  # fmt: skip
    base = NS(loss_fn=_L1(), weight=None, task=NS(step_sums=lambda out, y: {}), on_epoch_start=lambda ep: None)
    model = NS(features=encoder, head=head, feature_dim=D)
    return encoder, head, ctx, base, model


def _load(fds, stats):
    for name, value in zip(("running_mean", "running_var", "smoothed_mean", "smoothed_var"), stats, strict=True):
        getattr(fds, name).copy_(value)


METRICS = ("mae", "mse", "gm", "per_bin_mae")
X = torch.randn(9, 3, generator=torch.Generator().manual_seed(7))
Y = torch.tensor([0.0, 2, 3, 5, 5, 6, 7, 9, 4])  # 0 pooled into bucket 2 and 9 into 7; a label twice; bucket 6: var 0


def _grads(loss, *modules):
    loss.backward()
    return [p.grad.clone() for m in modules for p in m.parameters()]


@pytest.mark.parametrize("epoch", [0, 1])
def test_ranksim_fds_step_equals_the_reference_forward_with_fds_and_ranksim(epoch):
    """Epoch 1 (start_smooth): RankSim on the calibrated features, as the reference's in-place FDS.smooth; epoch 0:
    on the raw ones. Values and gradients (backbone and head) equal; FDS's statistics take the raw features."""
    stats = _stats(1)
    encoder, head, ctx, base, model = _parts()
    cfg = RankSimConfig(gamma=3.0, fds=FDSConfig(bucket_start=START, bucket_num=NUM, clip=[0.1, 10.0]))
    method = RankSim(cfg, ctx, model, base)
    _load(method.fds, stats)
    net = method.wrap(model)
    ep = Epoch("train", epoch, 3, 0.1, torch.Generator().manual_seed(4), amp=False)
    method.on_epoch_start(ep)
    loss, sums = method.step(net, Batch(X, Y), ep)
    ours = _grads(loss, encoder, head)

    picks = iter(unique_label_subset(Y, torch.Generator().manual_seed(4)).tolist())  # the same draw of the 5s
    encoder.zero_grad(), head.zero_grad()
    out, feats = ref_forward(encoder, head, X, Y[:, None], stats, smooth=epoch >= 1)
    reg = ref_ranksim(feats, Y[:, None], 2.0, choice=lambda c: next(picks))
    ref_loss = (out[:, 0] - Y).abs().mean() + 3.0 * reg
    ref = _grads(ref_loss, encoder, head)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert sums["mean_ranksim"].item() == pytest.approx(reg.item() * len(Y), rel=1e-6) and reg > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, ref, strict=True))
    plain = RankSim(RankSimConfig(gamma=3.0), ctx, model, base)
    other = plain.step(plain.wrap(model), Batch(X, Y), Epoch("train", epoch, 3, 0.1, torch.Generator().manual_seed(4),
                                                             amp=False))[0]  # fmt: skip
    assert (other.item() != pytest.approx(loss.item())) == (epoch >= 1)  # FDS changes the step once it calibrates
    method.on_epoch_end(ep)
    raw, buckets = encoder(X).detach(), Y.long().clamp(START, NUM - 1) - START
    for b in range(NUM - START):  # the means of the raw (uncalibrated) features of each bucket, with momentum 0.9
        mean = raw[buckets == b].mean(0)
        expected = mean if epoch == 0 else 0.1 * mean + 0.9 * stats[0][b]  # epoch 0 = start_update: replaced
        assert torch.allclose(method.fds.running_mean[b], expected, atol=1e-5)


@pytest.mark.parametrize("epoch", [0, 1])
def test_conr_fds_step_calibrates_the_regression_view_only_as_the_reference(epoch):
    """ConR agedb-dir/train.py with --fds: ``model(imgs_c, reg=False)`` for the ConR views (no calibration) and
    ``model(inputs, targets, epoch)`` (calibrated from start_smooth) for the loss; feature vectors: views are copies."""
    stats = _stats(2)
    encoder, head, ctx, base, model = _parts(1)
    cfg = ConRConfig(window=1.0, fds=FDSConfig(bucket_start=START, bucket_num=NUM, clip=[0.1, 10.0]))
    method = ConR(cfg, ctx, model, base)
    _load(method.fds, stats)
    ep = Epoch("train", epoch, 3, 0.1, torch.Generator().manual_seed(0), amp=False)
    loss, sums = method.step(method.wrap(model), Batch(X, Y), ep)
    ours = _grads(loss, encoder, head)

    encoder.zero_grad(), head.zero_grad()
    imgs_c, targets_c = torch.cat((X, X)), torch.cat((Y, Y))[:, None]
    outputs_c, features_c = ref_forward(encoder, head, imgs_c, targets_c, stats, smooth=False)
    outputs, _ = ref_forward(encoder, head, X, Y[:, None], stats, smooth=epoch >= 1)
    reg = ref_conr(features_c, targets_c, outputs_c.clone().detach(), w=1.0, weights=1.0, e=0.01, t=0.07)
    ref_loss = (outputs[:, 0] - Y).abs().mean() + 4.0 * reg
    ref = _grads(ref_loss, encoder, head)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5) and reg > 0
    assert sums["mean_conr"].item() == pytest.approx(reg.item() * len(Y), rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, ref, strict=True))


# ------------------------------------------------------------------------------------------------ config and runs


@pytest.fixture(scope="module")
def compose_dir():
    from hydra import compose, initialize_config_module

    with initialize_config_module("ltbench.conf", version_base="1.3"):
        yield lambda *o: compose("train", overrides=["experiment=synthetic_dir", "progress=false", "device=cpu", *o])


def test_the_fds_section_composes_with_fds_defaults_overridable_and_checked(compose_dir):
    from ltbench.identity import identity_tree

    for method in ("ranksim", "conr"):
        cfg = to_schema(compose_dir(f"method={method}_fds", "method.fds.ks=9", "dataset=agedb_dir", "model=resnet10"))
        f = cfg.method.fds
        got = (cfg.method.name, f.kernel, f.ks, f.sigma, f.momentum, f.start_smooth)
        assert got == (method, "gaussian", 9, 2, 0.9, 1)
        assert (f.bucket_start, f.bucket_num, f.clip) == (3, 100, [0.1, 10.0])  # the DIR reference's for AgeDB
        plain = to_schema(compose_dir(f"method={method}"))
        assert plain.method.fds is None and "fds" not in identity_tree(plain, {"stage", "run"})["method"]
        with pytest.raises(ConfigError, match="ks an odd number"):
            to_schema(compose_dir(f"method={method}_fds", "method.fds.ks=4"))
        with pytest.raises(ConfigError, match="does not combine with synth=mixup"):
            to_schema(compose_dir(f"method={method}_fds", "synth=mixup"))
    assert to_schema(compose_dir("experiment=stsb_dir", "method=ranksim_fds")).method.fds.clip == [0.5, 2.0]


def test_ranksim_fds_run_killed_mid_stage_resumes_to_identical_numbers(compose_dir, tmp_path, monkeypatch):
    from conftest import interrupt_at

    from ltbench.runner import run

    """Epoch 2 of 2 calibrates with the statistics of epoch 1: resumed from the checkpoint, it takes them from there."""
    args = ["schedule.epochs=2", "dataset.num_train=256", "dataset.num_eval=64", "model.hidden=[16]", "reweight=sqinv",
            "method=ranksim_fds", "method.gamma=1"]  # fmt: skip
    full = run(compose_dir(*args, f"results_dir={tmp_path / 'a'}"), tmp_path / "full")
    interrupt_at(monkeypatch, lambda: run(compose_dir(*args, f"results_dir={tmp_path / 'b'}"), tmp_path / "cut"),
                 at=2, stage="train")  # fmt: skip
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["method"]
    assert state["fds.seen_bins"].any() and state["fds.running_var"].abs().sum() > 0  # FDS's statistics are kept
    resumed = run(compose_dir(f"resume={tmp_path / 'cut'}"), None)
    assert resumed["resumed_at_epoch"] == [1]
    assert {k: resumed[k] for k in METRICS} == {k: full[k] for k in METRICS}
    logs = [(tmp_path / d / "epochs.csv").read_text().splitlines() for d in ("full", "cut")]
    header = logs[0][0].split(",")
    cols = [header.index(c) for c in ("train_loss", "ranksim", "fds_smooth")]
    picked = [[[r.split(",")[i] for i in cols] for r in log[1:]] for log in logs[:2]]
    assert picked[0] == picked[1]
    assert [r.split(",")[cols[2]] for r in logs[0][1:]] == ["False", "True"]


def test_the_ranksim_rows_of_the_dir_tables_name_their_readme_and_run_with_fds():
    from ltbench.reproduce import load_table

    imdb = {r.name: r for r in load_table("imdbwiki_dir").rows}
    assert imdb["ranksim"].published["dir"].value == 7.42 and "method=ranksim" in imdb["ranksim"].overrides
    lds_fds = imdb["ranksim_lds_fds"]
    assert (lds_fds.strategy, lds_fds.overrides, lds_fds.published["dir"].value) == ("lds_fds", ("method=ranksim_fds",),
                                                                                    7.69)  # fmt: skip
    assert dict(lds_fds.published["dir"].groups) == {"few": 21.43}
    stsb = {r.name: r for r in load_table("stsb_dir").rows}["ranksim_lds"]
    assert stsb.published["dir"].value == 0.889 and "method.gamma=3e-4" in stsb.overrides
    for row in (*imdb.values(), stsb):
        if row.name.startswith("ranksim"):
            assert "9e1c862906e9" in row.published["dir"].source and row.published["dir"].confidence == "checked"
