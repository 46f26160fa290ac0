"""Scoring a model on held-out text (what ``charlm models compare`` ranks versions by), without
MLflow: the text's ids in the model's vocab, then char-rnn's stream evaluation in fp32.

A model whose vocab lacks some characters of the text is scored on the text with those
characters removed; the score says how many (``coverage`` < 1) and which (``dropped``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from charlm.model import CharLM
from charlm.train import LN2, evaluate
from charlm.vocab import Vocab


def map_ids(text_vocab: Vocab, model_vocab: Vocab, ids: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """ids (text_vocab) as the model's ids, dropping characters it cannot encode; the dropped
    characters with counts."""
    if text_vocab.chars == model_vocab.chars:
        return ids, {}
    mapping = np.array(
        [model_vocab.index(c) if c in model_vocab else -1 for c in text_vocab.chars], dtype=np.int64
    )
    mapped = mapping[np.asarray(ids, dtype=np.int64)]
    keep = mapped >= 0
    dropped: dict[str, int] = {}
    if not keep.all():
        values, counts = np.unique(np.asarray(ids)[~keep], return_counts=True)
        dropped = {text_vocab.chars[int(v)]: int(n) for v, n in zip(values, counts, strict=True)}
    return mapped[keep].astype(model_vocab.dtype), dropped


@dataclass
class Score:
    """A model's score on a text of `chars` characters; loss/bpc None when it encodes too little
    of it (fewer than 2 characters) to be scored."""

    chars: int
    chars_skipped: int
    same_vocab: bool
    loss: float | None = None
    bpc: float | None = None
    chars_scored: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def coverage(self) -> float:
        return (self.chars - self.chars_skipped) / self.chars


def score_text(
    model: CharLM,
    model_vocab: Vocab,
    text_vocab: Vocab,
    ids: np.ndarray,
    batch_size: int,
    seq_len: int,
    device: str = "cpu",
) -> Score:
    """Mean loss and bits per character of model on ids (encoded with text_vocab), every model
    seeing the same characters in the same stream layout (fp32, state carried across batches)."""
    mapped, dropped = map_ids(text_vocab, model_vocab, ids)
    score = Score(
        chars=len(ids),
        chars_skipped=sum(dropped.values()),
        same_vocab=text_vocab.chars == model_vocab.chars,
        dropped=dropped,
    )
    if len(mapped) >= 2:
        loss, n = evaluate(model, mapped, batch_size, seq_len, device=device, precision="fp32")
        score.loss, score.bpc, score.chars_scored = loss, loss / LN2, n
    return score
