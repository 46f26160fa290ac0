"""The tiny training setup the core tests share: a short text and a 2x32 config."""

from __future__ import annotations

from charlm.config import TrainConfig

TEXT = "the quick brown fox jumps over the lazy dog. " * 60


def tiny_cfg(**kw) -> TrainConfig:
    """A 2x32 LSTM on 4 streams of 16 characters, 30 steps in fp32; kw overrides any field."""
    base = dict(
        hidden_size=32,
        embed_size=8,
        num_layers=2,
        dropout=0.1,
        seq_len=16,
        batch_size=4,
        max_steps=30,
        eval_every=10,
        log_every=1,
        warmup_steps=5,
        precision="fp32",
        seed=3,
        lr=1e-2,
    )
    base.update(kw)
    return TrainConfig(**base)
