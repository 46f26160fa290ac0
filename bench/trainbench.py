"""What the training benchmarks share: the plain PyTorch loop they race charlm against, the clock
they time charlm's own loop with, and the flags and config of a charlm-vs-plain run.

Not a benchmark itself. bench/train_throughput.py (CPU), bench/gpu_train.py (GPU) and
bench/ray_scaling.py import it as a sibling module (`python bench/X.py` puts bench/ on sys.path).

The plain loop is what a user writes: nn.Embedding -> nn.LSTM -> dropout -> nn.Linear, with the
same sizes, batch, seq-len, dropout (between layers and before the head, as charlm's model),
optimizer (torch's fused AdamW/Adam kernel where it exists, as charlm asks for), lr, weight decay,
grad clip and log interval as charlm's config, under bf16 autocast when asked; the recurrent state
is carried across batches.
"""

from __future__ import annotations

import argparse
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

# the config fields a charlm-vs-plain run reports under "config"
CONFIG_FIELDS = (
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
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(
    cfg: TrainConfig, data: np.ndarray, device: torch.device, bf16: bool, warmup: int, steps: int
) -> tuple[float, bool]:
    """chars/s of the plain loop on `device` (bf16 autocast when `bf16`, else fp32) over steps
    warmup+1 .. warmup+steps, the device synchronised at both ends, and whether Adam ran fused."""
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
            loss.item()  # the user's log line, on the steps charlm logs (a host sync on a GPU)
        if i + 1 == warmup:
            sync(device)
            t0 = time.perf_counter()
    sync(device)
    return B * T * steps / (time.perf_counter() - t0), fused


class StepClock(Callback):
    """Wall clock at charlm's step boundaries, from the end of step `warmup` to the end of step
    `warmup + steps` (`sync` called just before each reading: the device's, on a GPU), where it
    stops the run. It also notes the precision the run resolved and whether its Adam ran fused.

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
    cfg: TrainConfig, data: np.ndarray, device: torch.device, precision: str, warmup: int, steps: int
) -> tuple[float, StepClock]:
    """chars/s of charlm's real train() on `device` at `precision`, timed by a StepClock."""
    vocab = Vocab(tuple(chr(32 + i) for i in range(V)))
    B, T = cfg.batch_size, cfg.seq_len
    splits = {"train": data, "val": data[: B * T + 1], "test": data[:0]}
    clock = StepClock(warmup, steps, lambda: sync(device))
    train(cfg.replace(precision=precision), vocab, splits, callbacks=[clock], device=device)
    return B * T * steps / clock.seconds, clock


def add_train_args(
    p: argparse.ArgumentParser, batch_default: int, *, steps_default: int, warmup_default: int
) -> None:
    """The flags of a charlm-vs-plain run: `charlm train`'s defaults except the batch, then the
    timing (--steps, --warmup, --rounds)."""
    p.add_argument("--hidden-size", type=int, default=DEFAULTS.hidden_size)
    p.add_argument("--num-layers", type=int, default=DEFAULTS.num_layers)
    p.add_argument("--embed-size", type=int, default=DEFAULTS.embed_size)
    p.add_argument("--dropout", type=float, default=DEFAULTS.dropout)
    p.add_argument("--batch-size", type=int, default=batch_default)
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len)
    p.add_argument("--optimizer", choices=("adamw", "adam"), default=DEFAULTS.optimizer)
    p.add_argument("--lr", type=float, default=DEFAULTS.lr)
    p.add_argument("--weight-decay", type=float, default=None, help="default: charlm's for the optimizer")
    p.add_argument("--grad-clip", type=float, default=DEFAULTS.grad_clip)
    p.add_argument("--log-every", type=int, default=DEFAULTS.log_every)
    p.add_argument("--steps", type=int, default=steps_default, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=warmup_default, help="untimed steps first (at least 1)")
    p.add_argument("--rounds", type=int, default=3)


def parse_train_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    """p's arguments, with --warmup, --steps and --rounds checked."""
    args = p.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be at least 1")
    return args


def config_from_args(
    args: argparse.Namespace, warmup: int, steps: int, precision: str = DEFAULTS.precision
) -> TrainConfig:
    """The TrainConfig both sides run: the flags of add_train_args, with charlm's weight average
    and weight drop off (the plain loop has neither), no evaluation in the loop, and max_steps
    beyond the last timed step (StepClock stops the run there)."""
    return TrainConfig(
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
        max_steps=warmup + steps + 1,  # never reached: StepClock stops the run at step warmup + steps
        eval_every=10**9,
        eval_max_batches=1,
        log_every=args.log_every,
        precision=precision,
    )


def random_data(cfg: TrainConfig, warmup: int, steps: int) -> np.ndarray:
    """Random token ids (seed 0), enough for warmup + steps batches and then some."""
    rng = np.random.default_rng(0)
    need = cfg.batch_size * cfg.seq_len * (warmup + steps + 2) + 1
    return rng.integers(0, V, size=need).astype(np.uint8)


def report_head(bench: str, cfg: TrainConfig, args: argparse.Namespace) -> dict:
    """The JSON keys every charlm-vs-plain report opens with: bench, machine, timing, config."""
    W, S = args.warmup, args.steps
    return {
        "bench": bench,
        "machine": capability.machine_info(),
        "timing": f"wall clock over whole optimizer steps {W + 1}..{W + S}, both sides alike",
        "config": {
            **{k: getattr(cfg, k) for k in CONFIG_FIELDS},
            "warmup": W,
            "steps": S,
            "rounds": args.rounds,
        },
    }


def report_runs(fused: dict[str, bool], runs: dict[str, list[float]], med: dict[str, float]) -> dict:
    """fused_optimizer, chars_per_s (the medians) and all_rounds, as the reports print them."""
    return {
        "fused_optimizer": fused,
        "chars_per_s": {k: round(v) for k, v in med.items()},
        "all_rounds": {k: [round(x) for x in v] for k, v in runs.items()},
    }
