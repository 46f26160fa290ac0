"""GPU training throughput: charlm's training loop vs a plain PyTorch loop on the same GPU.

Both sides are timed the same way: wall clock over whole optimizer steps, from the end of step
--warmup to the end of step --warmup + --steps, with the GPU synchronised at both ends and
nowhere else. Everything a step does is inside the window: the batch's copy to the GPU, forward,
backward, clipping, the optimizer, logging (a host sync every log interval, on both sides) and
the stop check.

The plain loop is what a user writes: nn.Embedding -> nn.LSTM (cuDNN) -> dropout -> nn.Linear,
with the same sizes, batch, seq-len, dropout (between layers and before the head, as charlm's
model), optimizer (torch's fused AdamW/Adam kernel, as charlm asks for), lr, weight decay, grad
clip and log interval as charlm's config, and bf16 autocast when charlm's --precision auto
resolves to bf16 on this GPU; the recurrent state is carried across batches. charlm runs its
real `train()` (what `charlm train` and every Ray worker call) at --precision auto with a callback
that reads the clock at step boundaries. Its weight average and weight drop are off, since the
plain loop has neither. The defaults are `charlm train`'s, except a batch of 128 streams.
The runs alternate for --rounds rounds so that clock drift hits both alike.

    python bench/gpu_train.py [--batch-size 128 --seq-len 50 --steps 50 --rounds 3]
Prints one JSON object: where it ran (`machine`, with the GPU), chars/s per variant (median of
rounds) and the ratio. Needs a CUDA device; exits with a one-line error otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
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

V = 65
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(
    cfg: TrainConfig, data: np.ndarray, device: torch.device, bf16: bool, warmup: int, steps: int
) -> tuple[float, bool]:
    """chars/s of the plain loop over steps warmup+1 .. warmup+steps, and whether Adam ran fused."""
    torch.manual_seed(cfg.seed)
    model = PlainLM(cfg.embed_size, cfg.hidden_size, cfg.num_layers, cfg.dropout).to(device)
    opt, fused = plain_optimizer(cfg, model.parameters())
    B, T = cfg.batch_size, cfg.seq_len
    L = (len(data) - 1) // B
    xs = torch.from_numpy(data[: B * L].reshape(B, L).astype(np.int64))
    ys = torch.from_numpy(data[1 : B * L + 1].reshape(B, L).astype(np.int64))
    state, t0 = None, 0.0
    for i in range(warmup + steps):
        x = xs[:, i * T : (i + 1) * T].to(device, non_blocking=True)
        y = ys[:, i * T : (i + 1) * T].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, state = model(x, state)
        loss = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1))
        state = tuple(s.detach() for s in state)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if (i + 1) % cfg.log_every == 0:
            loss.item()  # the user's log line, on the steps charlm logs: a host sync on both sides
        if i + 1 == warmup:
            sync(device)
            t0 = time.perf_counter()
    sync(device)
    return B * T * steps / (time.perf_counter() - t0), fused


class StepClock(Callback):
    """Wall clock at charlm's step boundaries, from the end of step `warmup` to the end of step
    `warmup + steps` (the device synchronised at both), where it stops the run.

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
    cfg: TrainConfig, data: np.ndarray, device: torch.device, warmup: int, steps: int
) -> tuple[float, StepClock]:
    vocab = Vocab(tuple(chr(32 + i) for i in range(V)))
    B, T = cfg.batch_size, cfg.seq_len
    splits = {"train": data, "val": data[: B * T + 1], "test": data[:0]}
    clock = StepClock(warmup, steps, lambda: sync(device))
    train(cfg, vocab, splits, callbacks=[clock], device=device)
    return B * T * steps / clock.seconds, clock


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=DEFAULTS.hidden_size)
    p.add_argument("--num-layers", type=int, default=DEFAULTS.num_layers)
    p.add_argument("--embed-size", type=int, default=DEFAULTS.embed_size)
    p.add_argument("--dropout", type=float, default=DEFAULTS.dropout)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len)
    p.add_argument("--optimizer", choices=("adamw", "adam"), default=DEFAULTS.optimizer)
    p.add_argument("--lr", type=float, default=DEFAULTS.lr)
    p.add_argument("--weight-decay", type=float, default=None, help="default: charlm's for the optimizer")
    p.add_argument("--grad-clip", type=float, default=DEFAULTS.grad_clip)
    p.add_argument("--log-every", type=int, default=DEFAULTS.log_every)
    p.add_argument("--steps", type=int, default=50, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (at least 1)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be at least 1")
    if not torch.cuda.is_available():
        print("gpu_train: no CUDA device here; this benchmark needs a GPU", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda:0")
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
        precision="auto",
    )
    rng = np.random.default_rng(0)
    need = cfg.batch_size * cfg.seq_len * (W + S + 2) + 1
    data = rng.integers(0, V, size=need).astype(np.uint8)
    prec = capability.resolve("auto", device, "train")  # what `auto` gives charlm, and the plain loop
    runs: dict[str, list[float]] = {f"plain_{prec}": [], f"charlm_{prec}": []}
    fused: dict[str, bool] = {}
    for _ in range(args.rounds):
        cps, fused["plain"] = plain_loop(cfg, data, device, prec == "bf16", W, S)
        runs[f"plain_{prec}"].append(cps)
        cps, clock = charlm_loop(cfg, data, device, W, S)
        if clock.precision != prec:
            raise SystemExit(
                f"gpu_train: charlm --precision auto ran {clock.precision}, but charlm.capability "
                f"resolved {prec}: the plain loop would not match"
            )
        fused["charlm"] = clock.fused
        runs[f"charlm_{prec}"].append(cps)
    med = {k: statistics.median(v) for k, v in runs.items()}
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
                "bench": "gpu_train",
                "machine": capability.machine_info(),
                "timing": f"wall clock over whole optimizer steps {W + 1}..{W + S}, both sides alike",
                "config": {**config, "warmup": W, "steps": S, "rounds": args.rounds},
                "precision": prec,
                "fused_optimizer": fused,
                "chars_per_s": {k: round(v) for k, v in med.items()},
                "all_rounds": {k: [round(x) for x in v] for k, v in runs.items()},
                "ratio_charlm_vs_plain": round(med[f"charlm_{prec}"] / med[f"plain_{prec}"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
