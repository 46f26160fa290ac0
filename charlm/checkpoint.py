"""One checkpoint schema, versioned, loadable with torch.load(weights_only=True).

A checkpoint is a dict of tensors and JSON-able primitives only:

    schema, schema_version, charlm_version, torch_version,
    model_config (dict), vocab (Vocab.to_dict: code points + counts), state_dict (CPU tensors,
    no DDP "module." / torch.compile "_orig_mod." prefixes: the weights to evaluate and sample,
    the moving average when training keeps one), train_state_dict (the optimizer's own weights
    when they differ from state_dict, else None), optimizer (state_dict or None),
    train_config (dict), step, epoch, batch_in_epoch, train_seconds, rng (torch CPU state,
    CUDA states), carry (the recurrent state carried between training batches, or None),
    best_val_loss, val_loss, corpus_fingerprint, metrics (dict)

Everything is saved to a temporary file beside the target and renamed over it, so a reader sees
the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any

import torch

from charlm import __version__
from charlm.config import ModelConfig
from charlm.model import CharLM
from charlm.vocab import Vocab

SCHEMA = "charlm.checkpoint"
SCHEMA_VERSION = 1
REQUIRED = ("schema", "schema_version", "model_config", "vocab", "state_dict", "step")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, tampered with or of another schema."""


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies with DDP/compile wrapper prefixes removed, so any device/wrapper loads it."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v.detach().to("cpu", copy=True)
    return out


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def build(
    model: torch.nn.Module,
    model_config: ModelConfig,
    vocab: Vocab,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    train_model: torch.nn.Module | None = None,
    train_config: dict | None = None,
    step: int = 0,
    epoch: int = 0,
    batch_in_epoch: int = 0,
    train_seconds: float = 0.0,
    carry: tuple[torch.Tensor, ...] | None = None,
    best_val_loss: float | None = None,
    val_loss: float | None = None,
    corpus_fingerprint: str | None = None,
    metrics: dict | None = None,
) -> dict[str, Any]:
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "charlm_version": __version__,
        "torch_version": str(torch.__version__),
        "model_config": model_config.to_dict(),
        "vocab": vocab.to_dict(),
        "state_dict": clean_state_dict(model.state_dict()),
        "train_state_dict": clean_state_dict(train_model.state_dict()) if train_model is not None else None,
        "optimizer": _to_cpu(optimizer.state_dict()) if optimizer is not None else None,
        "train_config": dict(train_config or {}),
        "step": int(step),
        "epoch": int(epoch),
        "batch_in_epoch": int(batch_in_epoch),
        "train_seconds": float(train_seconds),
        "rng": rng,
        "carry": [t.detach().to("cpu", copy=True) for t in carry] if carry is not None else None,
        "best_val_loss": best_val_loss,
        "val_loss": val_loss,
        "corpus_fingerprint": corpus_fingerprint,
        "metrics": dict(metrics or {}),
    }


def to_bytes(ckpt: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def save(ckpt: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write atomically: temp file in the same folder, fsync, rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(source: str | os.PathLike | IO[bytes] | bytes, name: str | None = None) -> dict[str, Any]:
    """Load and validate a checkpoint on CPU; CheckpointError names the file on any problem."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    label = name or (str(source) if isinstance(source, str | os.PathLike) else "checkpoint")
    if isinstance(source, str | os.PathLike) and not Path(source).is_file():
        raise CheckpointError(f"{label}: no such checkpoint file")
    try:
        ckpt = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with foreign objects, not a torch file...
        reason = _reason(e)
        if reason.startswith("holds objects"):  # tampered or foreign, not damaged
            raise CheckpointError(f"{label}: refused, not a charlm checkpoint: {reason}") from e
        raise CheckpointError(
            f"{label}: not a readable charlm checkpoint (truncated or corrupt?): {reason}"
        ) from e
    validate(ckpt, label)
    return ckpt


def _reason(e: Exception) -> str:
    text = str(e)
    if "WeightsUnpickler error:" in text:  # a pickle that holds more than tensors and primitives
        return (
            "holds objects other than tensors and primitives: "
            + text.split("WeightsUnpickler error:")[1].split(".")[0].strip()
        )
    blocked = re.search(r"unsupported GLOBAL (\S+) whose module \S+ is blocked", text)
    if blocked:  # a global from a module torch never allows (os, subprocess, ...): an attack
        return f"holds objects other than tensors and primitives: it would call {blocked.group(1)}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0].split(". ")[0] if lines else type(e).__name__


def validate(ckpt: Any, label: str = "checkpoint") -> None:
    if not isinstance(ckpt, dict) or ckpt.get("schema") != SCHEMA:
        raise CheckpointError(f"{label}: not a charlm checkpoint (schema field missing or wrong)")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{label}: checkpoint is missing {', '.join(missing)}")
    if ckpt["schema_version"] > SCHEMA_VERSION:
        raise CheckpointError(
            f"{label}: checkpoint schema version {ckpt['schema_version']} is newer than this charlm "
            f"understands ({SCHEMA_VERSION}); upgrade charlm"
        )
    try:
        cfg = ModelConfig.from_dict(ckpt["model_config"])
        vocab = Vocab.from_dict(ckpt["vocab"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{label}: bad model config or vocab: {e}") from e
    if cfg.vocab_size != len(vocab):
        raise CheckpointError(f"{label}: vocab has {len(vocab)} characters, model expects {cfg.vocab_size}")
    _check_weights(ckpt["state_dict"], "state_dict", label)
    trained = ckpt.get("train_state_dict")
    if trained is not None:
        _check_weights(trained, "train_state_dict", label)
        shapes = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
        if {k: tuple(v.shape) for k, v in trained.items()} != shapes:
            raise CheckpointError(f"{label}: train_state_dict does not match state_dict's names and shapes")


def _check_weights(sd: Any, key: str, label: str) -> None:
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{label}: {key} is not a dict of tensors")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{label}: non-finite values in {key}: {', '.join(bad[:5])}")


def load_model(
    source: str | os.PathLike | IO[bytes] | bytes | dict, name: str | None = None, device: str = "cpu"
) -> tuple[CharLM, Vocab, dict[str, Any]]:
    """(model in eval mode on device, vocab, checkpoint dict) from a file or a loaded dict."""
    ckpt = source if isinstance(source, dict) else load(source, name)
    label = name or (str(source) if isinstance(source, str | os.PathLike) else "checkpoint")
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    model = CharLM(cfg)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{label}: weights do not match its model config: {str(e).splitlines()[-1].strip()}"
        ) from e
    model.to(device).eval()
    return model, Vocab.from_dict(ckpt["vocab"]), ckpt
