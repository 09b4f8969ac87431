"""STS-B-DIR: semantic textual similarity as imbalanced regression (Yang et al. 2021, "Delving into Deep Imbalanced
Regression", YyzHarry/imbalanced-regression, sts-b-dir/).

Data. The GLUE STS-B sentence pairs (train + dev pooled) re-split by the DIR authors: 5,249 training pairs with the
natural, skewed score distribution, and a dev (validation) and a test set of 1,000 pairs each, balanced over 20
score bins of 0.25 (50 pairs per bin each). Files ``stsb_train_new.tsv``, ``stsb_dev_new.tsv`` and
``stsb_test_new.tsv`` (the reference's ``glue_data/STS-B/{train,dev,test}_new.tsv``), read from ``<root>/dir/``
when that folder holds all three, else from ``<root>/``. Format: the GLUE TSV, tab-separated, UTF-8, one header
line (``index genre filename year old_index source1 source2 sentence1 sentence2 score``); the columns are found by
their header names (the reference reads columns 7, 8, 9). The score is a similarity in [0, 5], kept as float32
(the reference's ``np.float32(x)``). The dev split is published, so the builder ignores ``holdout``.

Inputs. A regex tokenizer (no NLTK): optionally lowercased, then numbers with decimal or thousands separators
("3.5", "1,000"), runs of letters and digits, and single punctuation marks. The vocabulary comes from the training
split only, ordered by frequency and then alphabetically, at most ``max_vocab`` words; id 0 is padding and id 1
the unknown word, so ``vocab_size`` = words + 2. A pair is an int64 tensor [2, max_len]: each sentence's first
``max_len`` tokens, right-padded with 0 (so a sentence's length is the position after its last non-zero id). The
x tensor of a split is [N, 2, max_len]; ``data.info`` holds ``vocab_size`` and ``max_len``.

Bins. 50 bins of 0.1 on [0, 5] (``np.histogram(range=(0, 5))``; 5.0 goes to the last bin). The reference bins
np.float32 scores against np.float32 edges, so a score on an edge (0.3, 1.4) goes to the bin it starts; the 50
training counts are listed in tests/test_stsb.py. Shot groups: the reference's hard-coded lists
(sts-b-dir/util.py ``STSShotAverage``) are exactly many > 100 and few < 30 training pairs per bin (not DIR's
usual < 20: five bins with 20-27 pairs are listed as few), so conf/dataset/stsb_dir.yaml sets groups.few_below: 30.

Not comparable with the paper. The reference encodes sentences with frozen 300-d GloVe 840B vectors; no
pre-trained embeddings can be fetched here, so ltbench's text model (model=bilstm) learns its embeddings from the
5,249 training pairs. Its MSE / Pearson numbers are a benchmark of their own, not a reproduction of the paper's.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ltbench.config import default_data_root, runtime
from ltbench.data import DATASETS, LTData
from ltbench.data.regression import RegressionDatasetConfig, regression_data
from ltbench.errors import ConfigError, DataError

FILES = {"train": "stsb_train_new.tsv", "val": "stsb_dev_new.tsv", "test": "stsb_test_new.tsv"}
COLUMNS = ("sentence1", "sentence2", "score")
PUBLISHED = {"train": 5249, "val": 1000, "test": 1000}  # pairs per split of the published files
PAD, UNK = 0, 1
SCORE_RANGE = (0.0, 5.0)

# A number with separators ("3.5", "1,000"), else a run of letters/digits, else one punctuation mark.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+|[^\w\s]|_")


@dataclass
class StsbDIRConfig(RegressionDatasetConfig):
    """STS-B-DIR: sentence pairs and their 0-5 similarity, 50 bins of 0.1; token ids from the training split."""

    inputs = "text"

    name: str = "stsb_dir"
    bin_start: float = 0.0
    bin_width: float = 0.1
    num_bins: int = 50
    max_len: int = 40  # tokens kept per sentence (the reference's max_seq_len)
    max_vocab: int = 30000  # words in the vocabulary, padding and unknown not counted (max_word_v_size)
    lowercase: bool = True
    check_counts: bool = runtime(True)  # the files must have the published 5,249 / 1,000 / 1,000 pairs

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_len < 1 or self.max_vocab < 1:
            raise ConfigError("dataset.max_len and dataset.max_vocab must be >= 1")


@dataclass
class Pairs:
    """One split as read from its TSV: the two sentences of every pair and its score (float32, in [0, 5])."""

    first: list[str]
    second: list[str]
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def tokenize(text: str, lowercase: bool = True) -> list[str]:
    """Words, numbers and single punctuation marks, in order; no token holds whitespace; never fails."""
    return _TOKEN.findall(text.lower() if lowercase else text)


def build_vocab(sentences: Iterable[list[str]], max_vocab: int) -> dict[str, int]:
    """word -> id for the ``max_vocab`` most frequent words (ties: alphabetical); ids are 2, 3, ... in that order
    (0 = padding and 1 = unknown are never assigned to a word)."""
    counts = Counter(t for s in sentences for t in s)
    ordered = sorted(counts, key=lambda t: (-counts[t], t))[:max_vocab]
    return {t: i + 2 for i, t in enumerate(ordered)}


def encode(sentences: list[list[str]], vocab: dict[str, int], max_len: int) -> torch.Tensor:
    """int64 [N, max_len]: the first ``max_len`` token ids of each sentence (UNK for words outside ``vocab``),
    then PAD; a non-empty sentence never holds PAD before its last token."""
    out = np.full((len(sentences), max_len), PAD, dtype=np.int64)
    for i, tokens in enumerate(sentences):
        ids = [vocab.get(t, UNK) for t in tokens[:max_len]]
        out[i, : len(ids)] = ids
    return torch.from_numpy(out)


def encode_pairs(first: list[list[str]], second: list[list[str]], vocab: dict[str, int], max_len: int) -> torch.Tensor:
    """int64 [N, 2, max_len]: ``x[i, 0]`` the first sentence of pair i, ``x[i, 1]`` the second (see :func:`encode`)."""
    return torch.stack([encode(first, vocab, max_len), encode(second, vocab, max_len)], dim=1)


def find_files(root: Path) -> dict[str, Path]:
    """The three split files: in ``root/dir`` if it holds all three, else in ``root``; DataError otherwise."""
    for folder in (root / "dir", root):
        if all((folder / n).is_file() for n in FILES.values()):
            return {split: folder / n for split, n in FILES.items()}
    folder = root / "dir" if (root / "dir").is_dir() else root
    missing = [n for n in FILES.values() if not (folder / n).is_file()]
    raise DataError(
        f"stsb_dir: no STS-B-DIR files in {root / 'dir'} or {root} ({folder} lacks {', '.join(missing)}); expected "
        f"{', '.join(FILES.values())} (set dataset.root or $LTBENCH_DATA)"
    )


def _header(path: Path, line: str) -> list[int]:
    names = line.rstrip("\r").split("\t")
    absent = [c for c in COLUMNS if c not in names]
    if absent:
        raise DataError(f"{path}:1: the header lacks column(s) {', '.join(absent)} (GLUE STS-B format expected)")
    return [names.index(c) for c in COLUMNS]


def read_tsv(path: Path) -> Pairs:
    """A GLUE STS-B TSV: the header names the columns; every other non-empty line is one pair. DataError (naming
    file:line) for a line with another number of fields than the header or a score that is not a number in [0, 5]."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as UTF-8 text: {e}") from e
    cols = _header(path, lines[0])
    width = len(lines[0].rstrip("\r").split("\t"))
    first: list[str] = []
    second: list[str] = []
    scores: list[float] = []
    for no, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != width:
            raise DataError(f"{path}:{no}: {len(fields)} tab-separated fields, the header has {width}")
        a, b, s = (fields[c] for c in cols)
        try:
            score = float(s)
        except ValueError:
            score = math.nan
        if not SCORE_RANGE[0] <= score <= SCORE_RANGE[1]:
            raise DataError(f"{path}:{no}: score {s!r} is not a number in [0, 5]")
        first.append(a)
        second.append(b)
        scores.append(score)
    if not scores:
        raise DataError(f"{path}: no sentence pairs after the header")
    return Pairs(first, second, np.asarray(scores, dtype=np.float32))


def load_splits(cfg: StsbDIRConfig, paths: dict[str, Path]) -> dict[str, Pairs]:
    """The train / val / test pairs of :func:`find_files`'s paths, in file order; with ``check_counts``,
    DataError unless they have the published sizes."""
    splits = {split: read_tsv(p) for split, p in paths.items()}
    wrong = [f"{FILES[k]} has {len(s)} pairs, not {PUBLISHED[k]}" for k, s in splits.items() if len(s) != PUBLISHED[k]]
    if wrong and cfg.check_counts:
        raise DataError(f"stsb_dir: {'; '.join(wrong)} (dataset.check_counts=false accepts them)")
    return splits


@DATASETS.register("stsb_dir", StsbDIRConfig)
def stsb_dir(cfg: StsbDIRConfig, workdir: Path, holdout: bool = False) -> LTData:
    """STS-B-DIR from its published TSV files: token-id pairs [N, 2, max_len] and float32 scores per split.

    Invariants: the vocabulary depends on the training split only; every id is < ``info["vocab_size"]``; the
    split order is the files' line order (``train_indices`` = 0..N-1). ``holdout`` is ignored (the dev split is
    published and complete).
    """
    root = Path(cfg.root or default_data_root()).expanduser()
    paths = find_files(root)
    splits = load_splits(cfg, paths)
    words = {
        k: ([tokenize(t, cfg.lowercase) for t in s.first], [tokenize(t, cfg.lowercase) for t in s.second])
        for k, s in splits.items()
    }
    vocab = build_vocab([*words["train"][0], *words["train"][1]], cfg.max_vocab)
    x = {k: encode_pairs(a, b, vocab, cfg.max_len) for k, (a, b) in words.items()}
    y = {k: s.scores for k, s in splits.items()}
    folder = str(paths["train"].parent.resolve())
    data = regression_data(cfg, x, y, np.arange(len(splits["train"])), folder, kind="features")
    data.info = {"vocab_size": len(vocab) + 2, "max_len": cfg.max_len}
    return data
