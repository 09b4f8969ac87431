"""STS-B-DIR: the TSV loader, tokenizer and vocabulary, the score bins, the sentence-pair BiLSTM, a run from the
compose path, and (when LTBENCH_DATA holds them) the published files' sizes and training bin counts."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from ltbench.config import GroupsConfig
from ltbench.data import build_dataset
from ltbench.data.stsb import PAD, UNK, StsbDIRConfig, build_vocab, encode, tokenize
from ltbench.errors import DataError
from ltbench.metrics import class_groups
from ltbench.models import build_model
from ltbench.models.text import BiLSTMConfig, PairBiLSTM
from ltbench.tasks import build_task
from ltbench.tasks.regression import RegressionConfig, bin_edges, binner

HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
TRAIN = [
    ("A man is playing a guitar.", "A man plays the guitar.", "4.000"),
    ("A woman is slicing an onion.", "A man is eating.", "0.3"),
    ("The cat sat on the mat.", "A dog runs in the park, fast!", "1.4"),
    ("Two men are playing guitars.", "Two men are playing guitars.", "5.000"),
    ("A man is playing a flute.", "A man is playing a guitar.", "2.25"),
    ("Stocks fell 3.5 percent on Monday.", "Stocks rose 1,000 points.", "0.8"),
]
DEV = [("A man is playing a zither.", "A man plays music.", "3.6"), ("A dog barks.", "A cat sleeps.", "0.5")]
TEST = [("A zebra is eating grass.", "A man is eating.", "1.0"), ("Stocks fell.", "Stocks fell.", "5")]

# Training pairs per 0.1 bin of the published stsb_train_new.tsv, as the reference bins them (np.histogram of the
# np.float32 scores, range (0, 5)); /work/notes/dir_refs.md 1.7.
REFERENCE_TRAIN_COUNTS = [
    428, 4, 96, 2, 98, 9, 86, 14, 97, 1, 203, 1, 139, 7, 117, 22, 111, 17, 118, 1, 186, 3, 192, 7, 111, 27, 150, 35,
    143, 1, 357, 6, 332, 22, 239, 55, 209, 71, 257, 5, 352, 3, 229, 4, 126, 20, 115, 25, 133, 263,
]  # fmt: skip
# The reference's hard-coded shot lists (sts-b-dir/util.py STSShotAverage._shot_idx).
REFERENCE_MANY = [0, *range(10, 49, 2), 49]
REFERENCE_MEDIUM = [2, 4, 6, 8, 27, 35, 37]


def write_tsv(path: Path, rows: list[tuple[str, str, str]]) -> None:
    lines = [HEADER] + [f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}\t{s}" for i, (a, b, s)
                        in enumerate(rows)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def stsb_root(tmp_path: Path) -> Path:
    """Tiny STS-B-DIR files in the published GLUE format, under tmp_path/dir/."""
    (tmp_path / "dir").mkdir()
    for name, rows in (("train", TRAIN), ("dev", DEV), ("test", TEST)):
        write_tsv(tmp_path / "dir" / f"stsb_{name}_new.tsv", rows)
    return tmp_path


def tiny_cfg(root: Path, **kw) -> StsbDIRConfig:
    return StsbDIRConfig(root=str(root), check_counts=False, **kw)


# ------------------------------------------------------------------------------------- tokens and vocabulary


def test_tokenizer_words_numbers_and_single_punctuation():
    assert tokenize("A man's 3.5-km walk, 1,000 times!!") == [
        "a", "man", "'", "s", "3.5", "-", "km", "walk", ",", "1,000", "times", "!", "!",
    ]  # fmt: skip
    assert tokenize("The Cat", lowercase=False) == ["The", "Cat"]
    assert tokenize("  ") == []


def test_vocabulary_by_frequency_then_alphabet_and_capped():
    sentences = [["b", "a"], ["a", "c"], ["c", "d"], ["c"]]
    assert build_vocab(sentences, 10) == {"c": 2, "a": 3, "b": 4, "d": 5}
    assert build_vocab(sentences, 2) == {"c": 2, "a": 3}


def test_encode_truncates_and_pads():
    vocab = {"a": 2, "b": 3}
    x = encode([["a", "b", "z", "a", "b"], ["b"], []], vocab, max_len=4)
    assert x.dtype == torch.int64
    assert x.tolist() == [[2, 3, UNK, 2], [3, PAD, PAD, PAD], [PAD] * 4]


def test_dataset_vocabulary_from_training_split_only(stsb_root):
    data = build_dataset(tiny_cfg(stsb_root, max_len=6), stsb_root)
    assert data.kind == "features"
    assert data.train_x.shape == (6, 2, 6) and data.val_x.shape == (2, 2, 6) and data.test_x.shape == (2, 2, 6)
    train_words = {t for a, b, _ in TRAIN for t in tokenize(a) + tokenize(b)}
    assert data.info == {"vocab_size": len(train_words) + 2, "max_len": 6}
    assert int(data.train_x.max()) < data.info["vocab_size"] and not bool((data.train_x == UNK).any())
    # by frequency: "." (11 times in training) gets id 2, "a" (10 times) id 3
    assert data.train_x[0, 0, 0] == 3 and data.train_x[3, 0, 5] == 2  # "two men are playing guitars ."
    # "a man is playing a zither" (dev): the ids of the training words, "zither" (dev / test only) is unknown
    assert torch.equal(data.val_x[0, 0, :5], data.train_x[0, 0, :5]) and data.val_x[0, 0, 5] == UNK
    assert data.test_x[0, 0, 1] == UNK  # "zebra"
    assert torch.equal(data.train_y, torch.tensor([4.0, 0.3, 1.4, 5.0, 2.25, 0.8], dtype=torch.float32))
    assert torch.equal(data.test_y, torch.tensor([1.0, 5.0]))


def test_dataset_truncates_and_right_pads(stsb_root):
    short = build_dataset(tiny_cfg(stsb_root, max_len=6), stsb_root).train_x
    full = build_dataset(tiny_cfg(stsb_root), stsb_root).train_x
    assert full.shape == (6, 2, 40)
    assert torch.equal(short, full[:, :, :6])  # the first max_len tokens, same vocabulary
    assert (full[2, 1] != PAD).sum() == 9 and (short[2, 1] != PAD).all()  # "a dog runs in the park , fast !"
    assert short[1, 1, :5].ne(PAD).all() and short[1, 1, 5] == PAD  # "a man is eating ." then padding


def test_files_are_found_in_root_as_well(stsb_root):
    for f in (stsb_root / "dir").iterdir():
        f.rename(stsb_root / f.name)
    data = build_dataset(tiny_cfg(stsb_root), stsb_root)
    assert len(data.train_y) == 6 and data.root == str(stsb_root.resolve())


# -------------------------------------------------------------------------------------------------- bins


def _bins(data, values: list[float]) -> list[int]:
    edges = bin_edges(data.bin_start, data.bin_width, data.num_bins)
    return binner(edges)(torch.tensor(values, dtype=torch.float32)).tolist()


def test_bins_fifty_of_a_tenth_and_the_task_agrees_with_the_dataset(stsb_root):
    data = build_dataset(tiny_cfg(stsb_root), stsb_root)
    assert data.num_bins == 50 and data.class_names[0] == "[0, 0.1)" and data.class_names[-1] == "[4.9, 5)"
    assert _bins(data, [0.0, 0.05, 0.25, 2.25, 4.95, 5.0]) == [0, 0, 2, 22, 49, 49]  # 5.0: the last bin
    task = build_task(RegressionConfig())
    assert task.label_stats(data).counts == data.class_counts  # one binning for the dataset and the task
    assert sum(data.class_counts) == 6 and data.class_counts[49] == 1 and data.class_counts[22] == 1


def test_bins_of_scores_on_an_edge_as_the_reference(stsb_root):
    data = build_dataset(tiny_cfg(stsb_root), stsb_root)
    scores = [0.3, 0.6, 1.4, 3.6, 4.2, 4.6, 0.29]
    reference = [int(np.histogram(np.float32([s]), bins=50, range=(0.0, 5.0))[0].argmax()) for s in scores]
    assert reference == [3, 6, 14, 36, 42, 46, 2]  # np.histogram of float32 scores, as sts-b-dir/tasks.py
    assert _bins(data, scores) == reference
    assert data.class_counts[3] == 1 and data.class_counts[14] == 1


# ------------------------------------------------------------------------------------------------ errors


def test_missing_file_is_one_line_naming_the_folder(stsb_root):
    (stsb_root / "dir" / "stsb_dev_new.tsv").unlink()
    with pytest.raises(DataError) as e:
        build_dataset(tiny_cfg(stsb_root), stsb_root)
    msg = str(e.value)
    assert "\n" not in msg and str(stsb_root / "dir") in msg and "stsb_dev_new.tsv" in msg
    assert "stsb_train_new.tsv" in msg and "stsb_test_new.tsv" in msg


@pytest.mark.parametrize(
    ("line", "why"),
    [("7\tg\tf\ty\to\ts\ts\tonly eight fields", "fields"), ("7\tg\tf\ty\to\ts\ts\ta\tb\tfive", "score"),
     ("7\tg\tf\ty\to\ts\ts\ta\tb\t5.5", "score")],
)  # fmt: skip
def test_malformed_line_names_file_and_line(stsb_root, line, why):
    path = stsb_root / "dir" / "stsb_train_new.tsv"
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(DataError, match=rf"stsb_train_new\.tsv:{len(TRAIN) + 2}: .*{why}"):
        build_dataset(tiny_cfg(stsb_root), stsb_root)


def test_header_without_score_column_and_published_counts(stsb_root):
    path = stsb_root / "dir" / "stsb_test_new.tsv"
    with pytest.raises(DataError, match="has 6 pairs, not 5249"):
        build_dataset(StsbDIRConfig(root=str(stsb_root)), stsb_root)  # check_counts is on by default
    path.write_text(path.read_text().replace("\tscore", "\tlabel", 1))
    with pytest.raises(DataError, match=r"stsb_test_new\.tsv:1: .*score"):
        build_dataset(tiny_cfg(stsb_root), stsb_root)


# ------------------------------------------------------------------------------------------------- model


def _model(hidden: int = 8, vocab: int = 30, seed: int = 0) -> PairBiLSTM:
    torch.manual_seed(seed)
    return PairBiLSTM(vocab, emb_dim=6, hidden=hidden, layers=1, dropout=0.2, out_dim=1, head="linear").eval()


def _pairs(max_len: int) -> torch.Tensor:
    rows = [([5, 9, 3], [7, 2]), ([4], [11, 12, 13, 14, 2]), ([8, 8, 2, 6], []), ([3, 1, 29], [3, 1, 29])]
    x = torch.zeros(len(rows), 2, max_len, dtype=torch.int64)
    for i, (a, b) in enumerate(rows):
        x[i, 0, : len(a)], x[i, 1, : len(b)] = torch.tensor(a), torch.tensor(b, dtype=torch.int64)
    return x


def test_model_output_shape_and_feature_dim():
    model = _model(hidden=8)
    x = _pairs(7)
    assert model.feature_dim == 64 and model.features(x).shape == (4, 64) and model(x).shape == (4, 1)
    with pytest.raises(ValueError, match=r"\[B, 2, L\]"):
        model(x[:, 0])


def test_padding_changes_nothing_and_never_wins_the_max():
    model = _model()
    short, long = _pairs(5), _pairs(23)
    with torch.no_grad():
        f_short, f_long = model.features(short), model.features(long)
        alone = model.features(long[:1, :, :3])  # the first pair without any padding in its first sentence
    torch.testing.assert_close(f_short, f_long, rtol=0, atol=1e-6)
    torch.testing.assert_close(f_long[:1], alone, rtol=0, atol=1e-6)
    u = f_long[:, :16]
    assert bool((u[0] < 0).any())  # negative maxima survive: padding (zero outputs) never wins the max
    assert torch.equal(f_long[2, 16:32], torch.zeros(16))  # an all-padding sentence is the zero vector


def test_model_is_deterministic_given_the_seed_and_trains_with_empty_sentences():
    x = _pairs(9)
    a, b = _model(seed=3).train(), _model(seed=3).train()
    torch.manual_seed(7)
    out_a = a(x)
    torch.manual_seed(7)
    assert torch.equal(out_a, b(x))
    out_a.pow(2).mean().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in a.parameters() if p.grad is not None)
    assert a.embed.weight.grad[PAD].abs().sum() == 0  # padding_idx 0 is never trained


def test_builder_reads_vocab_size_from_the_dataset(stsb_root):
    data = build_dataset(tiny_cfg(stsb_root), stsb_root)
    model = build_model(BiLSTMConfig(hidden=4, emb_dim=4), 1, data)
    assert model.embed.num_embeddings == data.info["vocab_size"] and model.feature_dim == 32
    assert model(data.test_x).shape == (2, 1)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.skipif(not (REPO / "conf/task/regression.yaml").exists(), reason="conf/task/regression.yaml not added")
def test_runs_end_to_end_from_compose(stsb_root, tmp_path):
    from ltbench.runner import run

    overrides = [
        "task=regression", "dataset=stsb_dir", "model=bilstm", f"dataset.root={stsb_root}",
        "dataset.check_counts=false", "schedule.epochs=2", "schedule.batch_size=8", "schedule.warmup=0.0",
        "schedule.milestones=[]", "progress=false", "device=cpu", f"results_dir={tmp_path}", "model.hidden=8",
        "model.emb_dim=8",
    ]  # fmt: skip
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    assert OmegaConf.to_container(cfg.dataset.groups)["few_below"] == 30
    record = run(cfg, tmp_path / "run")
    assert record["status"] == "completed" and record["task"] == "regression"
    for key in ("mae", "mse", "pearson"):
        assert isinstance(record[key], float) and math.isfinite(record[key]), key
    assert record["data_info"]["vocab_size"] > 2 and record["num_train"] == 6


def test_the_experiment_is_the_cpu_recipe_and_predicts_the_score_over_5(stsb_root, tmp_path):
    from ltbench.config import to_schema
    from ltbench.runner import run

    with initialize_config_module("ltbench.conf", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=stsb_dir", "strategy=lds", f"dataset.root={stsb_root}",
                                          "dataset.check_counts=false", "schedule.epochs=1", "schedule.batch_size=4",
                                          "progress=false", "device=cpu", f"results_dir={tmp_path}"])  # fmt: skip
    s = to_schema(cfg)
    assert (s.task.name, s.task.scale, s.loss.name, s.model.name, s.model.hidden) == ("regression", 5.0, "mse",
                                                                                      "bilstm", 64)  # fmt: skip
    assert (s.schedule.optimizer, s.schedule.lr, s.schedule.batch_size) == ("adam", 1e-3, 4)
    assert s.reweight.name == "sqinv" and s.reweight.lds
    record = run(cfg, tmp_path / "run")
    assert record["status"] == "completed" and 0 <= record["mae"] <= 5  # on the 0-5 scale, not the scaled one


# ------------------------------------------------------------------------------------------------ real data


def real_stsb_root() -> Path | None:
    root = os.environ.get("LTBENCH_DATA")
    return Path(root) if root and (Path(root) / "dir" / "stsb_train_new.tsv").exists() else None


requires_real_stsb = pytest.mark.skipif(real_stsb_root() is None, reason="LTBENCH_DATA does not hold dir/stsb_*.tsv")


@pytest.fixture(scope="module")
def real_stsb():
    return build_dataset(StsbDIRConfig(root=str(real_stsb_root())), ".")


@requires_real_stsb
@pytest.mark.realdata
def test_real_files_sizes_scores_and_tokens(real_stsb):
    data = real_stsb
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (5249, 1000, 1000)
    for y in (data.train_y, data.val_y, data.test_y):
        assert float(y.min()) == 0.0 and float(y.max()) == 5.0
    assert data.train_x.shape == (5249, 2, 40) and int(data.train_x.max()) < data.info["vocab_size"]
    assert not bool((data.train_x == UNK).any()) and bool((data.test_x == UNK).any())
    assert not bool((data.train_x[:, :, 0] == PAD).any())  # no empty sentence


@requires_real_stsb
@pytest.mark.realdata
def test_real_training_bin_counts_are_the_references(real_stsb):
    assert real_stsb.class_counts == REFERENCE_TRAIN_COUNTS


def test_yaml_groups_give_the_references_shot_lists():
    """The dataset YAML's rule (many > 100, few < 30) over the reference's training counts gives its hard-coded
    lists (checked without the files: the counts are the published ones)."""
    groups = OmegaConf.load(REPO / "conf/dataset/stsb_dir.yaml").groups
    g = class_groups(GroupsConfig(**OmegaConf.to_container(groups)), REFERENCE_TRAIN_COUNTS)
    assert g["many"] == REFERENCE_MANY and g["medium"] == REFERENCE_MEDIUM
    assert g["few"] == sorted(set(range(50)) - set(REFERENCE_MANY) - set(REFERENCE_MEDIUM))
