"""A finished sweep's trials: read from Tune's ResultGrid into plain records (config, val curve,
best val loss, how each ended, its best checkpoint), ranked, and drawn as the comparison: every
trial's val curve in one PNG and a table sorted by best val loss."""

from __future__ import annotations

import math
import os
from typing import Any

from charlm import runs, storage

LN2 = math.log(2.0)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _url(path: str, root: str) -> str:
    """A path in Tune's storage filesystem as a URL of the store (local paths stay paths)."""
    if storage.local_path(root) is not None:
        return path
    return f"{storage.protocol(root)}://{path.lstrip('/')}"


def _curve(result: Any) -> list[tuple[int, float]]:
    df = result.metrics_dataframe
    if df is None or "val_loss" not in df or "step" not in df:
        return []
    rows = df[["step", "val_loss"]].dropna()
    return [(int(s), float(v)) for s, v in zip(rows["step"], rows["val_loss"], strict=True)]


def _best_checkpoint(result: Any, root: str) -> str | None:
    kept = [(ck, m) for ck, m in (result.best_checkpoints or []) if m.get("val_loss") is not None]
    if not kept:
        return None
    ck = min(kept, key=lambda cm: (cm[1]["val_loss"], cm[1].get("step", 0)))[0]
    return _url(f"{ck.path.rstrip('/')}/{runs.CKPT_FILE}", root)


def ended(metrics: dict[str, Any], error: BaseException | None, curve: list[tuple[int, float]]) -> str:
    """How a trial ended, as the child run's tag says it."""
    if error is not None:
        return f"failed: {_first_line(error)}"
    if metrics.get("completed"):
        return "completed"
    if curve:
        return f"stopped by the scheduler at step {curve[-1][0]}"
    return "stopped by the scheduler before its first evaluation"


def collect(results: Any, root: str) -> list[dict[str, Any]]:
    """Every trial of a ResultGrid as a record, ranked by best val loss (1 = the winner; trials
    without an evaluation come last, unranked)."""
    out = []
    for r in results:
        metrics = dict(r.metrics or {})
        curve = _curve(r)
        best = min((v for _, v in curve), default=None)
        out.append(
            {
                "trial_id": metrics.get("trial_id") or os.path.basename(str(r.path).rstrip("/")),
                "config": dict((r.config or {}).get("train", {})),
                "best_val_loss": best,
                "best_val_bpc": best / LN2 if best is not None else None,
                "steps": curve[-1][0] if curve else 0,
                "evaluations": len(curve),
                "ended": ended(metrics, r.error, curve),
                "completed": bool(metrics.get("completed")) and r.error is None,
                "curve": curve,
                "best_checkpoint": _best_checkpoint(r, root),
                "mlflow_run_id": metrics.get("mlflow_run_id"),
                "path": _url(str(r.path), root),
            }
        )
    out.sort(key=lambda t: (t["best_val_loss"] is None, t["best_val_loss"] or 0.0, t["trial_id"]))
    for i, t in enumerate(out):
        t["rank"] = i + 1 if t["best_val_loss"] is not None else None
    return out


def _params(config: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(config.items())
    )


def table_markdown(trials: list[dict[str, Any]]) -> str:
    """The trials sorted by best val loss, as a Markdown table."""
    lines = [
        "| rank | trial | params | best val loss | best val bpc | steps | ended |",
        "|---:|---|---|---:|---:|---:|---|",
    ]
    for t in trials:
        loss = f"{t['best_val_loss']:.4f}" if t["best_val_loss"] is not None else "-"
        bpc = f"{t['best_val_bpc']:.4f}" if t["best_val_bpc"] is not None else "-"
        lines.append(
            f"| {t['rank'] or '-'} | {t['trial_id']} | {_params(t['config'])} | {loss} | {bpc} | "
            f"{t['steps']} | {t['ended']} |"
        )
    return "\n".join(lines) + "\n"


def comparison_png(trials: list[dict[str, Any]], path: str, title: str) -> str | None:
    """Every trial's val loss against step in one figure (the winner drawn thickest); None when no
    trial evaluated."""
    drawn = [t for t in trials if t["curve"]]
    if not drawn:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for t in drawn:
        steps, losses = zip(*t["curve"], strict=True)
        label = f"#{t['rank']} {t['trial_id']}: {_params(t['config'])}"
        ax.plot(steps, losses, marker="o", ms=3, lw=2.5 if t["rank"] == 1 else 1.2, label=label[:70])
        if not t["completed"]:
            ax.plot(steps[-1:], losses[-1:], marker="x", ms=9, color="black")
    ax.set_xlabel("step")
    ax.set_ylabel("val loss (nats/char)")
    ax.set_title(f"{title} (x: stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
