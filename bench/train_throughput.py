"""Training throughput: charlm's training loop vs a plain PyTorch loop, same config, same run.

The plain loop is the textbook one: embedding -> nn.LSTM(dropout) -> linear, Adam, grad clip,
state carried across batches, in fp32 and under bf16 autocast. charlm is measured through its
real `train()` (the function `charlm train` runs) with a callback timing each step, at
--precision fp32 and --precision auto. Runs alternate (plain fp32, charlm fp32, plain bf16,
charlm auto) for --rounds rounds so that drift on a shared machine hits both sides alike.

    python bench/train_throughput.py [--hidden-size 512 --num-layers 2 --batch-size 64 --seq-len 100]
Prints one JSON object: chars/s per variant (median of rounds) and the ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from charlm.config import TrainConfig
from charlm.train import Callback, resolve_precision, train
from charlm.vocab import Vocab

V = 65  # tinyshakespeare's vocabulary size


class PlainLM(nn.Module):
    def __init__(self, E: int, H: int, L: int, dropout: float) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.rnn = nn.LSTM(E, H, L, dropout=dropout, batch_first=True)
        self.head = nn.Linear(H, V)

    def forward(self, x, state=None):
        out, state = self.rnn(self.emb(x), state)
        return self.head(out), state


def plain_loop(args, data: np.ndarray, bf16: bool) -> float:
    torch.manual_seed(0)
    model = PlainLM(args.embed_size, args.hidden_size, args.num_layers, args.dropout)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    B, T = args.batch_size, args.seq_len
    L = (len(data) - 1) // B
    xs = torch.from_numpy(data[: B * L].reshape(B, L).astype(np.int64))
    ys = torch.from_numpy(data[1 : B * L + 1].reshape(B, L).astype(np.int64))
    state, t0 = None, 0.0
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            t0 = time.perf_counter()
        x, y = xs[:, i * T : (i + 1) * T], ys[:, i * T : (i + 1) * T]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, state = model(x, state)
        loss = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1))
        state = tuple(s.detach() for s in state)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        loss.item()
    return B * T * args.steps / (time.perf_counter() - t0)


class StepTimer(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.seconds, self.steps = warmup, 0.0, 0

    def on_log(self, run, metrics) -> None:  # log_every=1: one record per step
        if metrics["step"] > self.warmup:
            self.seconds += metrics["chars_per_s"] and run.chars_per_step / metrics["chars_per_s"]
            self.steps += 1


def charlm_loop(args, data: np.ndarray, precision: str) -> float:
    vocab = Vocab(tuple(chr(32 + i) for i in range(V)))
    B, T = args.batch_size, args.seq_len
    splits = {"train": data, "val": data[: B * T + 1], "test": data[:0]}
    cfg = TrainConfig(
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        embed_size=args.embed_size,
        dropout=args.dropout,
        weight_drop=0.0,  # the plain loop has none
        ema=0.0,  # nor a weight average
        optimizer="adam",
        batch_size=B,
        seq_len=T,
        max_steps=args.warmup + args.steps,
        eval_every=10**9,
        log_every=1,
        precision=precision,
        eval_max_batches=1,
    )
    timer = StepTimer(args.warmup)
    train(cfg, vocab, splits, callbacks=[timer], device="cpu")
    return B * T * timer.steps / timer.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--embed-size", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    need = args.batch_size * args.seq_len * (args.steps + args.warmup + 1) + 1
    data = rng.integers(0, V, size=need).astype(np.uint8)
    auto = resolve_precision("auto", "cpu")
    runs: dict[str, list[float]] = {"plain_fp32": [], "charlm_fp32": [], "plain_bf16": [], "charlm_auto": []}
    for _ in range(args.rounds):
        runs["plain_fp32"].append(plain_loop(args, data, bf16=False))
        runs["charlm_fp32"].append(charlm_loop(args, data, "fp32"))
        runs["plain_bf16"].append(plain_loop(args, data, bf16=True))
        runs["charlm_auto"].append(charlm_loop(args, data, "auto"))
    med = {k: statistics.median(v) for k, v in runs.items()}
    with open("/proc/cpuinfo") as f:
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor()
        )
    print(
        json.dumps(
            {
                "bench": "train_throughput",
                "config": {
                    k: getattr(args, k)
                    for k in (
                        "hidden_size",
                        "num_layers",
                        "embed_size",
                        "dropout",
                        "batch_size",
                        "seq_len",
                        "steps",
                        "rounds",
                    )
                },
                "cpu": cpu,
                "threads": torch.get_num_threads(),
                "auto_precision": auto,
                "chars_per_s": {k: round(v) for k, v in med.items()},
                "all_rounds": {k: [round(x) for x in v] for k, v in runs.items()},
                "ratio_charlm_fp32_vs_plain_fp32": round(med["charlm_fp32"] / med["plain_fp32"], 3),
                "ratio_charlm_auto_vs_plain_bf16": round(med["charlm_auto"] / med["plain_bf16"], 3),
                "ratio_charlm_auto_vs_plain_fp32": round(med["charlm_auto"] / med["plain_fp32"], 3),
                "ratio_plain_bf16_vs_plain_fp32": round(med["plain_bf16"] / med["plain_fp32"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
