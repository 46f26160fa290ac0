"""GPU training throughput: charlm's training loop vs a plain PyTorch loop on the same GPU.

Model: 2x512 LSTM (embedding 64, dropout 0.5), bf16 autocast, batch 128 x seq 100 by default.
The plain loop is the textbook one (nn.LSTM with cuDNN, Adam fused, grad clip, state carried);
charlm runs its real `train()` (what `charlm train` and every Ray worker call) at --precision bf16
with a callback timing each step. Steps are timed with CUDA events after --warmup steps; the runs
alternate for --rounds rounds so that clock drift hits both alike.

    python bench/gpu_train.py [--batch-size 128 --seq-len 100 --steps 50 --rounds 3]
Prints one JSON object: chars/s per variant (median of rounds), the ratio, the GPU's name.
Needs a CUDA device; exits with a one-line error otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from charlm.config import TrainConfig
from charlm.train import Callback, train
from charlm.vocab import Vocab

V = 65


class PlainLM(nn.Module):
    def __init__(self, E: int, H: int, L: int, dropout: float) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.rnn = nn.LSTM(E, H, L, dropout=dropout, batch_first=True)
        self.head = nn.Linear(H, V)

    def forward(self, x, state=None):
        out, state = self.rnn(self.emb(x), state)
        return self.head(out), state


def plain_loop(args, data: np.ndarray, device: torch.device) -> float:
    torch.manual_seed(0)
    model = PlainLM(args.embed_size, args.hidden_size, args.num_layers, args.dropout).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, fused=True)
    B, T = args.batch_size, args.seq_len
    L = (len(data) - 1) // B
    xs = torch.from_numpy(data[: B * L].reshape(B, L).astype(np.int64))
    ys = torch.from_numpy(data[1 : B * L + 1].reshape(B, L).astype(np.int64))
    state = None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            torch.cuda.synchronize()
            start.record()
        x = xs[:, i * T : (i + 1) * T].to(device, non_blocking=True)
        y = ys[:, i * T : (i + 1) * T].to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, state = model(x, state)
        loss = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1))
        state = tuple(s.detach() for s in state)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    end.record()
    torch.cuda.synchronize()
    return B * T * args.steps / (start.elapsed_time(end) / 1000.0)


class WallTimer(Callback):
    """Wall time from the end of step `warmup` to the end of the last step, synchronised. Logging
    every LOG_EVERY steps (charlm's default 10): one host sync per 10 steps, like a real run."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1 = warmup, 0.0, 0.0

    def on_log(self, run, metrics) -> None:
        if metrics["step"] == self.warmup:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        elif metrics["step"] == run.config.max_steps:
            torch.cuda.synchronize()
            self.t1 = time.perf_counter()


LOG_EVERY = 10


def charlm_loop(args, data: np.ndarray, device: torch.device) -> float:
    vocab = Vocab(tuple(chr(32 + i) for i in range(V)))
    B, T = args.batch_size, args.seq_len
    splits = {"train": data, "val": data[: B * T + 1], "test": data[:0]}
    cfg = TrainConfig(
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        embed_size=args.embed_size,
        dropout=args.dropout,
        batch_size=B,
        seq_len=T,
        max_steps=args.warmup + args.steps,
        eval_every=10**9,
        eval_max_batches=1,
        log_every=LOG_EVERY,
        precision="bf16",
    )
    timer = WallTimer(args.warmup)
    train(cfg, vocab, splits, callbacks=[timer], device=device)
    return B * T * args.steps / (timer.t1 - timer.t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--embed-size", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.warmup % LOG_EVERY or args.steps % LOG_EVERY or args.warmup < LOG_EVERY:
        p.error(f"--warmup and --steps must be positive multiples of {LOG_EVERY}")
    if not torch.cuda.is_available():
        print("gpu_train: no CUDA device here; this benchmark needs a GPU", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda:0")
    rng = np.random.default_rng(0)
    need = args.batch_size * args.seq_len * (args.steps + args.warmup + 1) + 1
    data = rng.integers(0, V, size=need).astype(np.uint8)
    runs: dict[str, list[float]] = {"plain_bf16": [], "charlm_bf16": []}
    for _ in range(args.rounds):
        runs["plain_bf16"].append(plain_loop(args, data, device))
        runs["charlm_bf16"].append(charlm_loop(args, data, device))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(
        json.dumps(
            {
                "bench": "gpu_train",
                "gpu": torch.cuda.get_device_name(device),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "config": {
                    k: getattr(args, k)
                    for k in (
                        "hidden_size",
                        "num_layers",
                        "embed_size",
                        "batch_size",
                        "seq_len",
                        "steps",
                        "rounds",
                    )
                },
                "chars_per_s": {k: round(v) for k, v in med.items()},
                "all_rounds": {k: [round(x) for x in v] for k, v in runs.items()},
                "ratio_charlm_vs_plain": round(med["charlm_bf16"] / med["plain_bf16"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
