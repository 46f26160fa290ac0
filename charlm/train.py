"""The one training loop. The CLI, the Ray worker, benchmarks and tests all call `train`; they
differ only in the callbacks they pass (progress bar, metrics file, checkpoints, Ray reports,
MLflow logging, a test's recorder) and in the `Dist` hooks (identity locally, all-reduce in DDP).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from charlm import capability
from charlm import checkpoint as ckpt_mod
from charlm.config import ModelConfig, TrainConfig
from charlm.data import StreamBatcher, check_sizes
from charlm.model import CharLM, State, detach_state
from charlm.vocab import Vocab

LN2 = math.log(2.0)


class TrainingDiverged(RuntimeError):
    """Loss or gradients became NaN/inf or exploded; the last good checkpoint is untouched."""


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'auto' -> bf16 where the device trains it natively (CUDA with bf16, CPUs with AVX512-BF16
    or AMX), else fp32; an explicit precision the device cannot train natively is refused in one
    line (capability.PrecisionUnavailable) before any work starts."""
    return capability.resolve(precision, device, "train")


def autocast_ctx(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Dist:
    """Collective hooks for data-parallel training; identity for a single process."""

    rank: int = 0
    world_size: int = 1
    mean: Callable[[float], float] = lambda x: x  # mean of a float over ranks
    any: Callable[[bool], bool] = lambda b: b  # True on every rank if True on one
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m  # e.g. DDP


class Callback:
    """Hooks into `train`. Every method is optional; `run` is the live `Run`."""

    def on_start(self, run: Run) -> None: ...
    def on_log(self, run: Run, metrics: dict[str, Any]) -> None: ...
    def on_eval(self, run: Run, metrics: dict[str, Any]) -> None: ...
    def on_end(self, run: Run, result: dict[str, Any]) -> None: ...
    def on_message(self, run: Run, message: str) -> None: ...
    def should_stop(self, run: Run) -> bool:
        return False


@dataclass
class Run:
    """The live state of a training run, as callbacks see it."""

    config: TrainConfig
    model_config: ModelConfig
    vocab: Vocab
    model: CharLM  # unwrapped (no DDP), on `device`: the weights the optimizer steps
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str
    batch_size: int
    batches_per_epoch: int
    dist: Dist
    corpus_fingerprint: str | None = None
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    train_seconds: float = 0.0
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    is_best: bool = False  # the last evaluation improved on best_val_loss
    carry: State | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    ema_model: CharLM | None = None  # the moving average of `model` (config.ema > 0), in eval mode

    @property
    def eval_model(self) -> CharLM:
        """The weights that are evaluated, checkpointed as `state_dict` and sampled."""
        return self.ema_model if self.ema_model is not None else self.model

    @property
    def chars_per_step(self) -> int:
        """Global characters per optimizer step (all ranks)."""
        return self.batch_size * self.config.seq_len * self.dist.world_size

    @property
    def epoch_float(self) -> float:
        return self.epoch + self.batch_in_epoch / max(1, self.batches_per_epoch)

    @property
    def progress(self) -> float:
        """Fraction of the run done, by whichever limit is nearest; drives the lr schedule."""
        c = self.config
        fr = []
        if c.max_steps is not None:
            fr.append(self.step / c.max_steps)
        if c.max_epochs is not None:
            fr.append(self.epoch_float / c.max_epochs)
        if c.time_budget is not None:
            fr.append(self.train_seconds / (c.time_budget * 60.0))
        return min(1.0, max(fr))

    def checkpoint(self) -> dict[str, Any]:
        """A checkpoint of this exact point: resuming from it continues the run bit for bit."""
        return ckpt_mod.build(
            self.eval_model,
            self.model_config,
            self.vocab,
            optimizer=self.optimizer,
            train_model=self.model if self.ema_model is not None else None,
            train_config=self.config.to_dict(),
            step=self.step,
            epoch=self.epoch,
            batch_in_epoch=self.batch_in_epoch,
            train_seconds=self.train_seconds,
            carry=self.carry,
            best_val_loss=self.best_val_loss,
            val_loss=self.last_val_loss,
            corpus_fingerprint=self.corpus_fingerprint,
            metrics=self.history[-1] if self.history else None,
        )


def lr_at(cfg: TrainConfig, step: int, epoch: int, progress: float) -> float:
    if cfg.schedule == "step":  # char-rnn: x decay per epoch once decay_after epochs are done
        return cfg.lr * cfg.lr_decay ** max(0, epoch - cfg.lr_decay_after + 1)
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.schedule == "constant":
        return cfg.lr * warm
    floor = cfg.lr * cfg.min_lr_frac
    return warm * (floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(run: Run) -> None:
    """Move the average towards the weights just stepped. The decay ramps up from 0.2 so the
    average forgets the random initialisation fast, then spans about the last tenth of the run
    until it reaches config.ema (1 / (1 - ema) steps)."""
    if run.ema_model is None:
        return
    decay = min(run.config.ema, (1 + run.step) / (10 + run.step))
    torch._foreach_lerp_(list(run.ema_model.parameters()), list(run.model.parameters()), 1.0 - decay)


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if cfg.optimizer == "rmsprop":  # char-rnn's default optimiser (alpha = decay_rate 0.95)
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=0.95, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    try:  # fused kernels exist for CPU and CUDA in torch >= 2.4
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(
    model: CharLM,
    ids: np.ndarray,
    batch_size: int,
    seq_len: int,
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[float, int]:
    """Mean cross-entropy (nats/char) over a whole split in char-rnn's stream layout, carrying
    state across batches like training does. Shrinks the batch for splits too short for it.
    Returns (loss, number of characters scored)."""
    device = torch.device(device)
    streams = batch_size * world_size
    if len(ids) < streams * seq_len + 1:
        seq_len = max(1, min(seq_len, (len(ids) - 1) // streams))
        if len(ids) < streams * seq_len + 1:
            batch_size = max(1, (len(ids) - 1) // (seq_len * world_size))
    was_training = model.training
    model.eval()
    batcher = StreamBatcher(ids, batch_size, seq_len, rank, world_size)
    total, count, state = 0.0, 0, None
    try:
        for i, (x, y) in enumerate(batcher.epoch(0)):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            with autocast_ctx(device, precision):
                logits, state = model(x, state)
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += y.numel()
    finally:
        model.train(was_training)
    return total / max(1, count), count


# The one training loop, long on purpose (~160 lines): its step reads top to bottom, and splitting
# it would scatter the state (model, optimizer, stream states, EMA, stop rule) its callbacks see.
def train(
    cfg: TrainConfig,
    vocab: Vocab,
    splits: dict[str, np.ndarray],
    *,
    callbacks: Sequence[Callback] = (),
    resume: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    dist: Dist | None = None,
    corpus_fingerprint: str | None = None,
    corpus_name: str = "corpus",
) -> dict[str, Any]:
    """Train a CharLM on splits['train'], evaluating on splits['val'] every cfg.eval_every steps.

    resume: a checkpoint dict (from Run.checkpoint / checkpoint.load) to continue exactly.
    Returns a JSON-able summary: steps, epochs, best/final val loss and bpc, chars/s, ...
    """
    dist = dist or Dist()
    device = torch.device(device) if device is not None else pick_device()
    precision = resolve_precision(cfg.precision, device)
    batch_size, note = check_sizes(
        splits,
        cfg.batch_size,
        cfg.seq_len,
        world_size=dist.world_size,
        auto_shrink=cfg.auto_shrink,
        name=corpus_name,
    )
    model_cfg = cfg.model_config(len(vocab))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = CharLM(model_cfg).to(device)
    optimizer = make_optimizer(cfg, model)
    ema_model = None
    if cfg.ema > 0:
        ema_model = copy.deepcopy(model).eval().requires_grad_(False)

    batcher = StreamBatcher(
        splits["train"], batch_size, cfg.seq_len, dist.rank, dist.world_size, seed=cfg.seed
    )
    run = Run(
        config=cfg,
        model_config=model_cfg,
        vocab=vocab,
        model=model,
        optimizer=optimizer,
        device=device,
        precision=precision,
        batch_size=batch_size,
        batches_per_epoch=batcher.batches_per_epoch(0),
        dist=dist,
        corpus_fingerprint=corpus_fingerprint,
        ema_model=ema_model,
    )
    if resume is not None:
        _restore(run, resume)
    net = dist.wrap(model)
    for cb in callbacks:
        if note:
            cb.on_message(run, note)
        cb.on_start(run)

    explode_at = 3.0 * math.log(len(vocab)) + 1.0  # 3x a uniform guess: the run has blown up
    check_every_step = device.type == "cpu"  # .item() syncs a GPU; there we check at log steps
    window_loss = torch.zeros((), device=device)
    window_steps, window_time = 0, 0.0
    last_eval_step = run.step if resume is not None else -1
    stopped_by = None
    model.train()
    while stopped_by is None:
        run.batches_per_epoch = batcher.batches_per_epoch(run.epoch)
        if run.batch_in_epoch >= run.batches_per_epoch:
            run.epoch, run.batch_in_epoch, run.carry = run.epoch + 1, 0, None
            continue
        for x, y in batcher.epoch(run.epoch, run.batch_in_epoch):
            t0 = time.perf_counter()
            # Dropout's random stream is a pure function of (seed, step, rank): a resumed or
            # restarted run, on any number of ranks, draws exactly the masks it would have drawn.
            torch.manual_seed((cfg.seed * 1_000_003 + run.step * 7919 + dist.rank) % (1 << 63))
            lr = lr_at(cfg, run.step, run.epoch, run.progress)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast_ctx(device, precision):
                logits, state = net(x, run.carry)  # (B, T, V)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
            if check_every_step:
                _check_finite(run, loss.item(), gnorm.item(), explode_at)
            optimizer.step()
            run.carry = detach_state(state)
            run.step += 1
            update_ema(run)
            run.batch_in_epoch += 1
            dt = time.perf_counter() - t0
            run.train_seconds += dt
            window_loss += loss.detach()
            window_steps += 1
            window_time += dt

            if run.step % cfg.log_every == 0:
                mean_loss = dist.mean(window_loss.item() / window_steps)
                if not check_every_step:
                    _check_finite(run, mean_loss, gnorm.item(), explode_at)
                metrics = {
                    "step": run.step,
                    "epoch": round(run.epoch_float, 4),
                    "lr": lr,
                    "train_loss": mean_loss,
                    "train_bpc": mean_loss / LN2,
                    "grad_norm": float(gnorm),
                    "chars_per_s": run.chars_per_step * window_steps / window_time,
                    "worker_chars_per_s": batch_size * cfg.seq_len * window_steps / window_time,
                    "train_seconds": run.train_seconds,
                }
                run.history.append(metrics)
                for cb in callbacks:
                    cb.on_log(run, metrics)
                window_loss.zero_()
                window_steps, window_time = 0, 0.0

            stopped_by = _stop_reason(run, callbacks)
            if run.step % cfg.eval_every == 0 or stopped_by is not None:
                _evaluate_and_report(run, splits["val"], callbacks)
                last_eval_step = run.step
            if stopped_by is not None:
                break
        else:
            run.epoch, run.batch_in_epoch, run.carry = run.epoch + 1, 0, None

    if last_eval_step != run.step:
        _evaluate_and_report(run, splits["val"], callbacks)
    result = {
        "steps": run.step,
        "epochs": round(run.epoch_float, 4),
        "stopped_by": stopped_by,
        "best_val_loss": run.best_val_loss,
        "best_val_bpc": run.best_val_loss / LN2 if run.best_val_loss is not None else None,
        "val_loss": run.last_val_loss,
        "val_bpc": run.last_val_loss / LN2 if run.last_val_loss is not None else None,
        "train_loss": next((h["train_loss"] for h in reversed(run.history) if "train_loss" in h), None),
        "chars_per_s": run.chars_per_step * run.step / run.train_seconds if run.train_seconds else 0.0,
        "train_seconds": run.train_seconds,
        "precision": precision,
        "batch_size": batch_size,
        "device": str(device),
        "world_size": dist.world_size,
    }
    if resume is not None and run.train_seconds:
        # chars/s of this session only: steps done before resuming had their own clock
        done = int(resume["step"])
        spent = run.train_seconds - float(resume.get("train_seconds", 0.0))
        if spent > 0:
            result["chars_per_s"] = run.chars_per_step * (run.step - done) / spent
    for cb in callbacks:
        cb.on_end(run, result)
    return result


def limit_reached(c: TrainConfig, step: int, epoch: float, train_seconds: float) -> str | None:
    """The run's own limit reached at this point ("max_steps", "max_epochs", "time_budget"), else
    None: the one stop rule, also read by a Ray worker checking a checkpoint it resumes from."""
    if c.max_steps is not None and step >= c.max_steps:
        return "max_steps"
    if c.max_epochs is not None and epoch >= c.max_epochs:
        return "max_epochs"
    if c.time_budget is not None and train_seconds >= c.time_budget * 60.0:
        return "time_budget"
    return None


def _stop_reason(run: Run, callbacks: Sequence[Callback]) -> str | None:
    limit = limit_reached(run.config, run.step, run.epoch_float, run.train_seconds)
    if limit in ("max_steps", "max_epochs"):
        return limit
    local = limit == "time_budget"
    requested = any(cb.should_stop(run) for cb in callbacks)
    # Ranks must agree, or the ones still stepping wait forever in DDP's all-reduce.
    if run.dist.world_size > 1:
        local, requested = run.dist.any(local), run.dist.any(requested)
    if local:
        return "time_budget"
    if requested:
        return "callback"
    return None


def _check_finite(run: Run, loss: float, gnorm: float, explode_at: float) -> None:
    if not math.isfinite(loss) or not math.isfinite(gnorm):
        raise TrainingDiverged(
            f"training diverged at step {run.step + 1}: loss {loss}, gradient norm {gnorm}; "
            f"try a lower --lr or --grad-clip (the last good checkpoint is kept)"
        )
    if loss > explode_at:
        raise TrainingDiverged(
            f"training exploded at step {run.step + 1}: loss {loss:.3f} nats/char, worse than 3x a "
            f"uniform guess over {len(run.vocab)} characters; try a lower --lr (the last good checkpoint is kept)"
        )


def _evaluate_and_report(run: Run, val_ids: np.ndarray, callbacks: Sequence[Callback]) -> None:
    c = run.config
    t0 = time.perf_counter()
    local, _ = evaluate(
        run.eval_model,
        val_ids,
        run.batch_size,
        c.seq_len,
        device=run.device,
        precision=run.precision,
        max_batches=c.eval_max_batches,
        rank=run.dist.rank,
        world_size=run.dist.world_size,
    )
    val_loss = run.dist.mean(local)
    if not math.isfinite(val_loss):
        raise TrainingDiverged(
            f"validation loss is {val_loss} at step {run.step} (the last good checkpoint is kept)"
        )
    run.last_val_loss = val_loss
    run.is_best = run.best_val_loss is None or val_loss < run.best_val_loss
    if run.is_best:
        run.best_val_loss = val_loss
    metrics = {
        "step": run.step,
        "epoch": round(run.epoch_float, 4),
        "val_loss": val_loss,
        "val_bpc": val_loss / LN2,
        "best_val_loss": run.best_val_loss,
        "eval_seconds": time.perf_counter() - t0,
        "train_seconds": run.train_seconds,
    }
    run.history.append(metrics)
    for cb in callbacks:
        cb.on_eval(run, metrics)


def _restore(run: Run, ck: dict[str, Any]) -> None:
    saved = ModelConfig.from_dict(ck["model_config"])
    if saved != run.model_config:
        raise ValueError(
            f"cannot resume: checkpoint model {saved} differs from the requested {run.model_config}"
        )
    if Vocab.from_dict(ck["vocab"]).chars != run.vocab.chars:
        raise ValueError("cannot resume: the corpus vocabulary differs from the checkpoint's")
    fp = ck.get("corpus_fingerprint")
    if fp and run.corpus_fingerprint and fp != run.corpus_fingerprint:
        raise ValueError("cannot resume: the corpus differs from the one the checkpoint was trained on")
    # A checkpoint that kept an average holds the optimizer's own weights apart.
    run.model.load_state_dict(ck.get("train_state_dict") or ck["state_dict"])
    if run.ema_model is not None:
        run.ema_model.load_state_dict(ck["state_dict"])
    if ck.get("optimizer") is not None:
        run.optimizer.load_state_dict(ck["optimizer"])
    run.step, run.epoch, run.batch_in_epoch = int(ck["step"]), int(ck["epoch"]), int(ck["batch_in_epoch"])
    run.train_seconds = float(ck.get("train_seconds", 0.0))
    run.best_val_loss = ck.get("best_val_loss")
    run.last_val_loss = ck.get("val_loss")
    carry = ck.get("carry")
    if carry is not None and carry[0].shape[1] == run.batch_size:
        run.carry = tuple(t.to(run.device) for t in carry)
    rng = ck.get("rng") or {}
    if run.dist.rank == 0 and "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if run.device.type == "cuda" and rng.get("cuda"):
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(rng["cuda"])
