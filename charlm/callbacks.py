"""Callbacks for local runs: progress bar, metrics file + loss-curve PNG, checkpoints."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from charlm import checkpoint as ckpt_mod
from charlm import runs
from charlm.train import Callback, Run


def _fmt_secs(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class ProgressBar(Callback):
    """One status line: step, loss, val loss, bpc, chars/s, ETA. Redrawn in place on a terminal,
    printed at each evaluation otherwise (logs, CI)."""

    def __init__(self, stream: IO[str] | None = None, width: int = 24) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.width = width
        self.last: dict[str, Any] = {}
        self.val: dict[str, Any] = {}
        self._drawn = 0.0

    def on_message(self, run: Run, message: str) -> None:
        self._line(f"note: {message}", newline=True)

    def on_log(self, run: Run, metrics: dict[str, Any]) -> None:
        self.last = metrics
        if self.tty and time.monotonic() - self._drawn > 0.2:
            self._line(self._status(run))

    def on_eval(self, run: Run, metrics: dict[str, Any]) -> None:
        self.val = metrics
        self._line(self._status(run), newline=True)

    def on_end(self, run: Run, result: dict[str, Any]) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _status(self, run: Run) -> str:
        p = run.progress
        filled = int(self.width * p)
        bar = "#" * filled + "-" * (self.width - filled)
        parts = [f"[{bar}] step {run.step}", f"epoch {run.epoch_float:.2f}"]
        if "train_loss" in self.last:
            parts.append(f"loss {self.last['train_loss']:.3f}")
        if "val_loss" in self.val:
            parts.append(f"val {self.val['val_loss']:.3f} ({self.val['val_bpc']:.3f} bpc)")
        if "chars_per_s" in self.last:
            parts.append(f"{self.last['chars_per_s']:,.0f} chars/s")
        if 0 < p < 1 and run.train_seconds > 0:
            parts.append(f"ETA {_fmt_secs(run.train_seconds * (1 - p) / p)}")
        return " | ".join(parts)

    def _line(self, text: str, newline: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if newline else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn = time.monotonic()


class ConfigFile(Callback):
    """Writes config.json (the corpus and the train config) once the run has started, that is
    after a resume was accepted: a refused --resume leaves the folder as it was."""

    def __init__(self, out_dir: str | os.PathLike, corpus: str) -> None:
        self.dir, self.corpus = Path(out_dir), corpus

    def on_start(self, run: Run) -> None:
        config = {"corpus": self.corpus, "train_config": run.config.to_dict()}
        runs.write_json(self.dir, runs.CONFIG_FILE, config, indent=2)


class MetricsFile(Callback):
    """Appends every log/eval record as a JSON line; draws loss.png at the end."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.dir = Path(out_dir)
        self.path = self.dir / runs.METRICS_FILE

    def on_start(self, run: Run) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if run.step == 0 and self.path.exists():
            self.path.unlink()  # a fresh run; a resumed one appends

    def _write(self, kind: str, metrics: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": kind, "time": time.time(), **metrics}) + "\n")

    def on_log(self, run: Run, metrics: dict[str, Any]) -> None:
        self._write("train", metrics)

    def on_eval(self, run: Run, metrics: dict[str, Any]) -> None:
        self._write("eval", metrics)

    def on_end(self, run: Run, result: dict[str, Any]) -> None:
        plot_losses(self.path, self.dir / runs.LOSS_PNG)


def plot_losses(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Train and val loss (nats/char, and bpc on the right axis) against step."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train_loss"]) for r in rows if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "eval"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), label="val", lw=2, marker="o", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    sec = ax.secondary_yaxis("right", functions=(lambda x: x / math.log(2), lambda b: b * math.log(2)))
    sec.set_ylabel("bits/char")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(png_path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return Path(png_path)


class CheckpointFiles(Callback):
    """Keeps last.pt (every evaluation) and best.pt (lowest val loss) in a folder, atomically."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.dir = Path(out_dir)
        self.last_path = self.dir / runs.LAST_FILE
        self.best_path = self.dir / runs.BEST_FILE

    def on_eval(self, run: Run, metrics: dict[str, Any]) -> None:
        ck = run.checkpoint()
        ckpt_mod.save(ck, self.last_path)
        if run.is_best:
            ckpt_mod.save(ck, self.best_path)
