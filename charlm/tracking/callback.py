"""The training loop's MLflow hook (TrackingCallback) and the sample sweep it logs."""

from __future__ import annotations

import functools
import html
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from charlm import __version__
from charlm.checkpoint import clean_state_dict
from charlm.config import SamplingParams
from charlm.tracking.redact import _clip, _str, display_uri, redact
from charlm.tracking.session import _MAX_PARAM, _log_batch, _log_json, _log_text, is_unreachable
from charlm.train import Callback, Run

log = logging.getLogger("charlm.tracking")

SAMPLE_TEMPERATURES = (0.2, 0.5, 0.8, 1.0, 1.2)
_MAX_PENDING = 1_000_000  # metric values a callback buffers through a tracking outage


def callback_factory(tracking_uri: str, run_id: str, **options: Any) -> Callable[[], list[Callback]]:
    """A picklable zero-argument factory returning [TrackingCallback(...)], for Ray workers."""
    return functools.partial(_make_callbacks, tracking_uri, run_id, options)


def _make_callbacks(tracking_uri: str, run_id: str, options: dict[str, Any]) -> list[Callback]:
    return [TrackingCallback(tracking_uri, run_id, **options)]


CHANGES_TAG = "resumed_param_changes"


def log_params_once(
    client: MlflowClient, run_id: str, params: dict[str, Any], run: Any = None
) -> dict[str, Any]:
    """Log the params the run lacks. MLflow refuses to change a logged param, so one that a
    continued run has with another value keeps its first value, and its name is added to the tag
    resumed_param_changes; returns the tags to set with it (empty when nothing changed).
    run: the run as just read (one get_run less)."""
    run = run if run is not None else client.get_run(run_id)
    existing = run.data.params
    new = {k: v for k, v in params.items() if k not in existing}
    changed = {
        k for k, v in params.items() if k in existing and existing[k] != _clip(redact(_str(v)), _MAX_PARAM)
    }
    tags: dict[str, Any] = {}
    if changed:
        before = run.data.tags.get(CHANGES_TAG, "")
        tags[CHANGES_TAG] = ", ".join(sorted(changed | {k for k in before.split(", ") if k}))
    _log_batch(client, run_id, params=new)
    return tags


def logged_steps(
    client: MlflowClient, run_id: str, run: Any = None, keys: Sequence[str] | None = None
) -> dict[str, int]:
    """The last step each metric of a run (or each of keys it has) is at: a step a continued run
    must not log again."""
    run = run if run is not None else client.get_run(run_id)
    out = {}
    for key in run.data.metrics if keys is None else [k for k in keys if k in run.data.metrics]:
        history = client.get_metric_history(run_id, key)
        if history:
            out[key] = max(m.step for m in history)
    return out


class TrackingCallback(Callback):
    """Logs a training run into an existing MLflow run (rank 0 only).

    Params at start (the full TrainConfig, effective batch size, precision, world size, device,
    vocab size, parameter count, charlm/torch versions); metrics of every log and eval record,
    buffered and written once per evaluation; at the end vocab.json, metrics.json, loss.png and
    samples.md / samples.html: the best weights sampled at each temperature of `temperatures`
    (length and seed by default SamplingParams').

    Built from plain values (tracking URI, run id, options), so it pickles and works in another
    process (a Ray worker). The run's status is left to whoever opened it (start_run).

    A continued run (a rerun after a driver was killed, resumed from its last checkpoint) goes on
    from where the run's metrics stopped: a step a metric already has is not logged again (the
    steps between the checkpoint and the kill are trained twice, bit for bit), and params keep
    their first values (see log_params_once).
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        sample_prompts: Sequence[str] = ("",),
        samples_per_prompt: int = 2,
        sample_length: int = SamplingParams.length,
        sample_seed: int = SamplingParams.seed,
        temperatures: Sequence[float] = SAMPLE_TEMPERATURES,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.sample_prompts = list(sample_prompts)
        self.samples_per_prompt = int(samples_per_prompt)
        self.sample_length = int(sample_length)
        self.sample_seed = int(sample_seed)
        self.temperatures = [float(t) for t in temperatures]
        self._client: MlflowClient | None = None
        self._pending: list[Metric] = []
        self._records: list[dict[str, Any]] = []
        self._notes: list[str] = []
        self._best_state: dict[str, Any] | None = None
        self._best_step: int | None = None
        self._logged: dict[str, int] = {}  # metric -> last step the run already has

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None  # clients hold sessions/connections: rebuilt in the new process
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # -- hooks
    def on_start(self, run: Run) -> None:
        if run.dist.rank != 0:
            return
        params = {k: v for k, v in run.config.to_dict().items()}
        params.update(
            {
                "effective_batch_size": run.batch_size,
                "effective_precision": run.precision,
                "world_size": run.dist.world_size,
                "global_batch_size": run.batch_size * run.dist.world_size,
                "device": str(run.device),
                "vocab_size": len(run.vocab),
                "model_parameters": sum(p.numel() for p in run.model.parameters()),
                "charlm_version": __version__,
                "torch_version": _torch_version(),
            }
        )
        if run.corpus_fingerprint:
            params["corpus_fingerprint"] = run.corpus_fingerprint
        mlflow_run = self.client.get_run(self.run_id)
        self._logged = logged_steps(self.client, self.run_id, mlflow_run)
        tags = log_params_once(self.client, self.run_id, params, mlflow_run)
        if run.step > 0:
            tags["resumed_at_step"] = run.step
        _log_batch(self.client, self.run_id, tags=tags)
        _log_text(self.client, self.run_id, run.vocab.to_json(), "vocab.json")

    def on_message(self, run: Run, message: str) -> None:
        if run.dist.rank == 0:
            self._notes.append(message)
            _log_batch(self.client, self.run_id, tags={"charlm.notes": "\n".join(self._notes)})

    def on_log(self, run: Run, metrics: dict[str, Any]) -> None:
        if run.dist.rank == 0:
            self._record("train", metrics)

    def should_stop(self, run: Run) -> bool:
        """Never stops a run. Before an evaluation step's evaluation (and the checkpoint written
        with it) the train metrics so far go to MLflow: a driver killed once that checkpoint
        exists leaves no gap in them (one killed before it replays steps the run has: skipped)."""
        if run.dist.rank == 0 and run.step % run.config.eval_every == 0:
            self.flush(final=False)
        return False

    def on_eval(self, run: Run, metrics: dict[str, Any]) -> None:
        if run.dist.rank != 0:
            return
        self._record("eval", metrics)
        if run.is_best:
            self._best_state = clean_state_dict(run.eval_model.state_dict())
            self._best_step = run.step
        self.flush(final=False)

    def on_end(self, run: Run, result: dict[str, Any]) -> None:
        if run.dist.rank != 0:
            return
        self.flush()
        client = self.client
        _log_json(client, self.run_id, {"records": self._records, "result": result}, "metrics.json")
        with tempfile.TemporaryDirectory(prefix="charlm-mlflow-") as tmp:
            png = self._loss_png(Path(tmp))
            if png is not None:
                client.log_artifact(self.run_id, str(png))
        sweep = self._sample_sweep(run)
        if sweep:
            _log_text(client, self.run_id, sweep_markdown(sweep), "samples.md")
            _log_text(client, self.run_id, sweep_html(sweep), "samples.html")

    # -- helpers
    def _record(self, kind: str, metrics: dict[str, Any]) -> None:
        step = int(metrics.get("step", 0))
        now = int(time.time() * 1000)
        self._records.append({"kind": kind, **metrics})
        for k, v in metrics.items():
            if k == "step" or not isinstance(v, int | float) or isinstance(v, bool):
                continue
            if step <= self._logged.get(k, -1):  # logged already (an eval repeats epoch; an earlier attempt)
                continue
            if math.isfinite(float(v)):
                self._pending.append(Metric(k, float(v), now, step))
                self._logged[k] = step

    def flush(self, final: bool = True) -> None:
        """Write buffered metrics (one log_batch call per 1000). A non-final flush that finds the
        server unreachable keeps them for the next one, so an outage does not stop training."""
        if not self._pending:
            return
        try:
            _log_batch(self.client, self.run_id, metrics=self._pending)
        except (MlflowException, OSError) as e:
            if final or not is_unreachable(e) or len(self._pending) > _MAX_PENDING:
                raise
            log.warning(
                "MLflow at %s unreachable; %d metric values kept for the next evaluation",
                display_uri(self.tracking_uri),
                len(self._pending),
            )
            return
        self._pending = []

    def _loss_png(self, folder: Path) -> Path | None:
        from charlm.callbacks import plot_losses

        if not self._records:
            return None
        jl = folder / "metrics.jsonl"
        jl.write_text("".join(json.dumps(r) + "\n" for r in self._records))
        return plot_losses(jl, folder / "loss.png")

    def _sample_sweep(self, run: Run) -> list[dict[str, Any]]:
        from charlm.model import CharLM
        from charlm.sample import Sampler

        if not self.temperatures or self.samples_per_prompt < 1 or self.sample_length < 1:
            return []
        model = CharLM(run.model_config)
        state = self._best_state or clean_state_dict(run.eval_model.state_dict())
        model.load_state_dict(state)
        model.eval()
        prompts = [p for p in self.sample_prompts if not run.vocab.unknown(p)] or [""]
        streams = [p for p in prompts for _ in range(self.samples_per_prompt)]
        sampler = Sampler(model, run.vocab, max_batch=len(streams))
        rows = []
        for t in self.temperatures:
            texts = sampler.generate(streams, self.sample_length, temperature=t, seed=self.sample_seed)
            for i, (p, text) in enumerate(zip(streams, texts, strict=True)):
                rows.append({"temperature": t, "stream": i, "prompt": p, "text": text})
        return [{"step": self._best_step if self._best_state else run.step, "seed": self.sample_seed}, *rows]


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def sweep_markdown(sweep: list[dict[str, Any]]) -> str:
    head, rows = sweep[0], sweep[1:]

    def cell(s: str) -> str:
        return html.escape(s).replace("|", "\\|").replace("\n", "<br>") or " "

    lines = [
        f"# Samples at step {head['step']} (seed {head['seed']})",
        "",
        "| temperature | # | prompt | sample |",
        "|---:|---:|---|---|",
    ]
    lines += [
        f"| {r['temperature']:g} | {r['stream']} | {cell(r['prompt'])} | {cell(r['text'])} |" for r in rows
    ]
    return "\n".join(lines) + "\n"


def sweep_html(sweep: list[dict[str, Any]]) -> str:
    head, rows = sweep[0], sweep[1:]
    body = "\n".join(
        f"<tr><td>{r['temperature']:g}</td><td>{r['stream']}</td><td><pre>{html.escape(r['prompt'])}</pre></td>"
        f"<td><pre>{html.escape(r['text'])}</pre></td></tr>"
        for r in rows
    )
    return (
        "<!doctype html><meta charset='utf-8'><title>charlm samples</title>"
        "<style>td{vertical-align:top;border-bottom:1px solid #ccc}pre{white-space:pre-wrap;margin:0}</style>"
        f"<h3>Samples at step {head['step']} (seed {head['seed']})</h3>"
        "<table><tr><th>temperature</th><th>#</th><th>prompt</th><th>sample</th></tr>\n"
        f"{body}\n</table>\n"
    )
