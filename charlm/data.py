"""Encoded corpus splits and char-rnn's stateful batching.

Layout (char-rnn / torch-rnn): a split of N ids is cut into S = B * world_size contiguous
streams of length L = (N - 1) // S. Batch i of an epoch is columns [i*T, (i+1)*T) of every
stream, so stream b of batch i+1 continues exactly where stream b of batch i stopped and the
recurrent state can be carried across batches (truncated BPTT). A distributed rank r takes
streams [r*B, (r+1)*B): the global batch is B * world_size streams, disjoint between ranks.

Each epoch starts at a seeded offset in [0, T) so that batch boundaries move between epochs
(more varied TBPTT cuts than char-rnn's fixed ones) while staying deterministic and resumable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where batches are made: ingestion uses split_sizes without it
    import torch


class CorpusTooSmallError(ValueError):
    pass


def split_sizes(n: int, val_frac: float, test_frac: float) -> dict[str, int]:
    """Sizes of the contiguous train | val | test splits of n ids: val and test rounded, train
    the rest (split_ids, and the split files of a published dataset)."""
    n_test = round(n * test_frac)
    n_val = round(n * val_frac)
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def split_ids(ids: np.ndarray, val_frac: float = 0.05, test_frac: float = 0.05) -> dict[str, np.ndarray]:
    """Contiguous train | val | test split (views, no copy), of split_sizes. test may be empty."""
    sizes = split_sizes(len(ids), val_frac, test_frac)
    n_train, n_val = sizes["train"], sizes["val"]
    return {
        "train": ids[:n_train],
        "val": ids[n_train : n_train + n_val],
        "test": ids[n_train + n_val :],
    }


def fingerprint(ids: np.ndarray) -> str:
    """sha256 of the encoded ids; identifies the corpus a checkpoint was trained on."""
    return hashlib.sha256(np.ascontiguousarray(ids).tobytes()).hexdigest()


def chars_needed(batch_size: int, seq_len: int, world_size: int = 1) -> int:
    """Fewest ids a split needs for one batch: every stream holds T inputs plus one target."""
    return batch_size * world_size * seq_len + 1


def check_sizes(
    splits: dict[str, np.ndarray],
    batch_size: int,
    seq_len: int,
    *,
    world_size: int = 1,
    auto_shrink: bool = False,
    name: str = "corpus",
) -> tuple[int, str | None]:
    """Check that train and val hold one batch each; return (batch_size, note about shrinking).

    With auto_shrink the batch is reduced to the largest size that fits (torch-rnn#195), and the
    note says so; without it, a CorpusTooSmallError says what is there and what is needed.
    """
    sizes = {k: len(splits[k]) for k in ("train", "val")}
    smallest = min(sizes, key=lambda k: sizes[k])
    need = chars_needed(batch_size, seq_len, world_size)
    if sizes[smallest] >= need:
        return batch_size, None
    total = sum(len(v) for v in splits.values())
    fit = (sizes[smallest] - 1) // (seq_len * world_size)
    if auto_shrink and fit >= 1:
        note = (
            f"{name}: {smallest} split has {sizes[smallest]:,} characters, fewer than the "
            f"{need:,} that batch size {batch_size} x seq-len {seq_len} needs; "
            f"batch size shrunk to {fit}"
        )
        return fit, note
    raise CorpusTooSmallError(
        f"{name} has {total:,} characters ({sizes['train']:,} train, {sizes['val']:,} val); "
        f"batch size {batch_size} x seq-len {seq_len}"
        + (f" x {world_size} workers" if world_size > 1 else "")
        + f" needs at least {need:,} in each of train and val"
        + (
            " (use a smaller --batch-size/--seq-len)"
            if fit < 1
            else " (use --auto-shrink or a smaller --batch-size)"
        )
    )


@dataclass
class StreamBatcher:
    """Batches (x, y) of shape (B, T) for one rank; see the module doc for the layout."""

    ids: np.ndarray
    batch_size: int
    seq_len: int
    rank: int = 0
    world_size: int = 1
    seed: int | None = None  # None: no per-epoch offset (evaluation)

    def __post_init__(self) -> None:
        need = chars_needed(self.batch_size, self.seq_len, self.world_size)
        if len(self.ids) < need:
            raise CorpusTooSmallError(f"split of {len(self.ids):,} ids, need {need:,}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of {self.world_size}")
        # torch indexes with int64; keep the compact array and widen per batch only.
        self._n_streams = self.batch_size * self.world_size

    def _offset(self, epoch: int) -> int:
        if self.seed is None or epoch == 0:
            return 0
        rng = np.random.default_rng([self.seed, epoch])
        return int(rng.integers(0, self.seq_len))

    def _streams(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        off = self._offset(epoch)
        n = len(self.ids) - off
        length = (n - 1) // self._n_streams
        data = self.ids[off : off + self._n_streams * length + 1]
        x = data[:-1].reshape(self._n_streams, length)
        y = data[1:].reshape(self._n_streams, length)
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return x[rows], y[rows]

    def batches_per_epoch(self, epoch: int = 0) -> int:
        off = self._offset(epoch)
        return ((len(self.ids) - off - 1) // self._n_streams) // self.seq_len

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches start.. of the given epoch, as int64 tensors (B, T)."""
        import torch

        x, y = self._streams(epoch)
        t = self.seq_len
        for i in range(start, self.batches_per_epoch(epoch)):
            cols = slice(i * t, (i + 1) * t)
            yield (
                torch.from_numpy(x[:, cols].astype(np.int64)),
                torch.from_numpy(y[:, cols].astype(np.int64)),
            )
