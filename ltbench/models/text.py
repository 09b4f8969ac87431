"""Text models over token-id sentence pairs (dataset inputs "text", e.g. STS-B-DIR).

``bilstm``: the pair encoder of the STS-B-DIR reference (YyzHarry/imbalanced-regression, sts-b-dir/models.py,
after jiant / the GLUE baselines), sized for a CPU. A shared embedding and a shared bidirectional LSTM encode each
sentence; a masked max-pool over time gives its vector u (v for the second sentence); the pair vector is
``[u, v, |u - v|, u * v]`` (``features(x)``, 4 * 2 * hidden dims) and the head maps it to the output.

Differences from the reference, which uses frozen 300-d GloVe 840B embeddings and a 2-layer BiLSTM of 1,500 units
per direction (a 12,000-d pair vector): no pre-trained embeddings can be fetched here, so the embedding is learnt
from the training pairs, and the defaults (emb_dim 128, hidden 256, 1 layer) fit a CPU. Dropout 0.2 on the
embeddings and on the LSTM outputs, as the reference's ``dropout_embs`` and ``dropout``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ltbench.errors import ConfigError
from ltbench.models import MODELS, NetConfig
from ltbench.models.heads import build_head

PAD = 0


@dataclass
class BiLSTMConfig(NetConfig):
    """A shared-BiLSTM sentence-pair encoder with max pooling (the STS-B-DIR reference's, CPU-sized)."""

    reads = ("text",)

    name: str = "bilstm"
    emb_dim: int = 128
    hidden: int = 256  # units per direction (reference: 1500)
    layers: int = 1  # reference: 2
    dropout: float = 0.2  # on embeddings, LSTM outputs and between LSTM layers

    def __post_init__(self) -> None:
        if min(self.emb_dim, self.hidden, self.layers) < 1 or not 0 <= self.dropout < 1:
            raise ConfigError("model.emb_dim, model.hidden and model.layers must be >= 1, model.dropout in [0, 1)")


class PairBiLSTM(nn.Module):
    """Sentence pairs [B, 2, L] of token ids (0 = padding, right-padded) -> outputs [B, out_dim].

    Invariants: a sentence's vector depends only on its tokens up to its last non-padding one (trailing padding,
    however long, changes nothing: the LSTM reads packed sequences); padding positions never win the max-pool; a
    sentence of padding only has the zero vector. ``feature_dim`` = 8 * hidden.
    """

    def __init__(
        self, vocab_size: int, emb_dim: int, hidden: int, layers: int, dropout: float, out_dim: int, head: str
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, emb_dim, padding_idx=PAD)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            emb_dim, hidden, num_layers=layers, batch_first=True, bidirectional=True,
            dropout=dropout if layers > 1 else 0.0,
        )  # fmt: skip
        self.feature_dim = 4 * 2 * hidden
        self.head = build_head(head, self.feature_dim, out_dim)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [M, L] -> sentence vectors [M, 2 * hidden] (masked max over time of the BiLSTM outputs)."""
        positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
        lengths = ((tokens != PAD) * positions).amax(1)  # after the last non-padding token; 0: padding only
        span = max(int(lengths.max()), 1)  # the batch's longest sentence: the LSTM never reads beyond it
        emb = self.drop(self.embed(tokens[:, :span]))
        packed = pack_padded_sequence(emb, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=span)
        out = self.drop(out)
        inside = positions[:span][None, :] <= lengths[:, None]  # [M, span]
        pooled = out.masked_fill(~inside[..., None], float("-inf")).amax(1)
        return pooled.masked_fill((lengths == 0)[:, None], 0.0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pairs [B, 2, L] -> [B, 8 * hidden]: ``[u, v, |u - v|, u * v]`` of the two sentence vectors."""
        if x.dim() != 3 or x.shape[1] != 2:
            raise ValueError(f"bilstm reads sentence pairs [B, 2, L] of token ids, got shape {list(x.shape)}")
        both = self.encode(torch.cat([x[:, 0], x[:, 1]]).long())
        u, v = both[: len(x)], both[len(x) :]
        return torch.cat([u, v, (u - v).abs(), u * v], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@MODELS.register("bilstm", BiLSTMConfig)
def _bilstm(cfg: BiLSTMConfig, out_dim: int, data: Any = None) -> PairBiLSTM:
    """A shared-BiLSTM sentence-pair encoder ([u, v, |u-v|, u*v] of max-pooled states) over token ids."""
    vocab = (getattr(data, "info", None) or {}).get("vocab_size")
    x = getattr(data, "train_x", None)
    if not vocab or x is None or x.dim() != 3 or x.shape[1] != 2:
        raise ConfigError("model=bilstm needs a dataset of token-id sentence pairs [N, 2, L] with info['vocab_size']")
    return PairBiLSTM(int(vocab), cfg.emb_dim, cfg.hidden, cfg.layers, cfg.dropout, out_dim, cfg.head)
