"""Training throughput on CPU: charlm's training loop vs a plain PyTorch loop, same config, same run.

Both sides are timed the same way: wall clock over whole optimizer steps, from the end of step
--warmup to the end of step --warmup + --steps. Everything a step does is inside the window:
forward, backward, clipping, the optimizer, logging and the stop check.

The plain loop is what a user writes: nn.Embedding -> nn.LSTM -> dropout -> nn.Linear, with the
same sizes, batch, seq-len, dropout (between layers and before the head, as charlm's model),
optimizer (torch's fused AdamW/Adam kernel where it exists, as charlm asks for), lr, weight decay,
grad clip and log interval as charlm's config; the recurrent state is carried across batches. It
runs in fp32, and under bf16 autocast when charlm's --precision auto resolves to bf16 on this CPU.

charlm runs its real `train()` (what `charlm train` and the Ray workers call) with a callback
that reads the clock at step boundaries, at --precision fp32 and auto. Its weight average and
weight drop are off, since the plain loop has neither. The defaults are `charlm train`'s.

Runs alternate (plain fp32, charlm fp32, plain bf16, charlm auto) for --rounds rounds, so that
drift on a shared machine hits both sides alike.

    python bench/train_throughput.py [--hidden-size 512 --num-layers 2 --batch-size 64 --seq-len 50]
Prints one JSON object: where it ran (`machine`), chars/s per variant (median of rounds) and the
ratios. Ratios compare variants of one run; chars/s from another CPU are not comparable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from charlm import capability
from charlm.config import TrainConfig
from charlm.train import Callback, Run, train
from charlm.vocab import Vocab

V = 65  # tinyshakespeare's vocabulary size
DEFAULTS = TrainConfig(max_steps=1)  # `charlm train`'s defaults


class PlainLM(nn.Module):
    def __init__(self, E: int, H: int, L: int, dropout: float) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.rnn = nn.LSTM(E, H, L, dropout=dropout if L > 1 else 0.0, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(H, V)

    def forward(self, x: torch.Tensor, state=None):
        out, state = self.rnn(self.emb(x), state)
        return self.head(self.drop(out)), state


def plain_optimizer(cfg: TrainConfig, params: Iterable[nn.Parameter]) -> tuple[torch.optim.Optimizer, bool]:
    """torch.optim.AdamW/Adam with the fused kernel where torch has one for the device and dtype."""
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    params = list(params)
    try:
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True), True
    except (RuntimeError, TypeError):
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay), False


def plain_loop(cfg: TrainConfig, data: np.ndarray, bf16: bool, warmup: int, steps: int) -> tuple[float, bool]:
    """chars/s of the plain loop over steps warmup+1 .. warmup+steps, and whether Adam ran fused."""
    torch.manual_seed(cfg.seed)
    model = PlainLM(cfg.embed_size, cfg.hidden_size, cfg.num_layers, cfg.dropout)
    opt, fused = plain_optimizer(cfg, model.parameters())
    B, T = cfg.batch_size, cfg.seq_len
    L = (len(data) - 1) // B
    xs = torch.from_numpy(data[: B * L].reshape(B, L).astype(np.int64))
    ys = torch.from_numpy(data[1 : B * L + 1].reshape(B, L).astype(np.int64))
    state, t0 = None, 0.0
    for i in range(warmup + steps):
        x, y = xs[:, i * T : (i + 1) * T], ys[:, i * T : (i + 1) * T]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, state = model(x, state)
        loss = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1))
        state = tuple(s.detach() for s in state)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if (i + 1) % cfg.log_every == 0:
            loss.item()  # the user's log line, on the steps charlm logs
        if i + 1 == warmup:
            t0 = time.perf_counter()
    return B * T * steps / (time.perf_counter() - t0), fused


class StepClock(Callback):
    """Wall clock at charlm's step boundaries, from the end of step `warmup` to the end of step
    `warmup + steps`, where it stops the run.

    train() asks should_stop once per step, after the whole step (update, weight average,
    logging), so two calls enclose exactly one iteration of its loop, including the stop check's
    own work. The run's max_steps must lie beyond the last timed step: train() checks max_steps
    before it asks the callbacks."""

    def __init__(self, warmup: int, steps: int, sync: Callable[[], None] = lambda: None) -> None:
        self.warmup, self.steps, self.sync = warmup, steps, sync
        self.t0 = self.t1 = 0.0
        self.precision, self.fused = "", False

    def on_start(self, run: Run) -> None:
        self.precision = run.precision
        self.fused = bool(run.optimizer.defaults.get("fused"))

    def should_stop(self, run: Run) -> bool:
        if run.step == self.warmup:
            self.sync()
            self.t0 = time.perf_counter()
        elif run.step == self.warmup + self.steps:
            self.sync()
            self.t1 = time.perf_counter()
            return True
        return False

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0


def charlm_loop(
    cfg: TrainConfig, data: np.ndarray, precision: str, warmup: int, steps: int
) -> tuple[float, StepClock]:
    vocab = Vocab(tuple(chr(32 + i) for i in range(V)))
    B, T = cfg.batch_size, cfg.seq_len
    splits = {"train": data, "val": data[: B * T + 1], "test": data[:0]}
    clock = StepClock(warmup, steps)
    train(cfg.replace(precision=precision), vocab, splits, callbacks=[clock], device="cpu")
    return B * T * steps / clock.seconds, clock


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=DEFAULTS.hidden_size)
    p.add_argument("--num-layers", type=int, default=DEFAULTS.num_layers)
    p.add_argument("--embed-size", type=int, default=DEFAULTS.embed_size)
    p.add_argument("--dropout", type=float, default=DEFAULTS.dropout)
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len)
    p.add_argument("--optimizer", choices=("adamw", "adam"), default=DEFAULTS.optimizer)
    p.add_argument("--lr", type=float, default=DEFAULTS.lr)
    p.add_argument("--weight-decay", type=float, default=None, help="default: charlm's for the optimizer")
    p.add_argument("--grad-clip", type=float, default=DEFAULTS.grad_clip)
    p.add_argument("--log-every", type=int, default=DEFAULTS.log_every)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be at least 1")
    W, S = args.warmup, args.steps
    cfg = TrainConfig(
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        embed_size=args.embed_size,
        dropout=args.dropout,
        weight_drop=0.0,  # the plain loop has none
        ema=0.0,  # nor a weight average
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        max_steps=W + S + 1,  # never reached: StepClock stops the run at step W + S
        eval_every=10**9,
        eval_max_batches=1,
        log_every=args.log_every,
    )
    rng = np.random.default_rng(0)
    need = cfg.batch_size * cfg.seq_len * (W + S + 2) + 1
    data = rng.integers(0, V, size=need).astype(np.uint8)
    auto = capability.resolve("auto", "cpu", "train")
    # (plain loop's precision, charlm's --precision): the plain loop gets what `auto` gives charlm
    pairs = [("fp32", "fp32")] + ([("bf16", "auto")] if auto == "bf16" else [])
    runs: dict[str, list[float]] = {}
    fused: dict[str, bool] = {}
    for _ in range(args.rounds):
        for plain_prec, charlm_prec in pairs:
            cps, fused["plain"] = plain_loop(cfg, data, plain_prec == "bf16", W, S)
            runs.setdefault(f"plain_{plain_prec}", []).append(cps)
            cps, clock = charlm_loop(cfg, data, charlm_prec, W, S)
            if clock.precision != plain_prec:
                raise SystemExit(
                    f"train_throughput: charlm --precision {charlm_prec} ran {clock.precision}, "
                    f"but charlm.capability resolved {plain_prec}: the plain loop would not match"
                )
            fused["charlm"] = clock.fused
            runs.setdefault(f"charlm_{charlm_prec}", []).append(cps)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratios = {"ratio_charlm_fp32_vs_plain_fp32": med["charlm_fp32"] / med["plain_fp32"]}
    if auto == "bf16":
        ratios["ratio_charlm_auto_vs_plain_bf16"] = med["charlm_auto"] / med["plain_bf16"]
        ratios["ratio_charlm_auto_vs_plain_fp32"] = med["charlm_auto"] / med["plain_fp32"]
        ratios["ratio_plain_bf16_vs_plain_fp32"] = med["plain_bf16"] / med["plain_fp32"]
    config = {
        k: getattr(cfg, k)
        for k in (
            "hidden_size",
            "num_layers",
            "embed_size",
            "dropout",
            "batch_size",
            "seq_len",
            "optimizer",
            "lr",
            "weight_decay",
            "grad_clip",
            "log_every",
        )
    }
    print(
        json.dumps(
            {
                "bench": "train_throughput",
                "machine": capability.machine_info(),
                "timing": f"wall clock over whole optimizer steps {W + 1}..{W + S}, both sides alike",
                "config": {**config, "warmup": W, "steps": S, "rounds": args.rounds},
                "auto_precision": auto,
                "fused_optimizer": fused,
                "chars_per_s": {k: round(v) for k, v in med.items()},
                "all_rounds": {k: [round(x) for x in v] for k, v in runs.items()},
                **{k: round(v, 3) for k, v in ratios.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
