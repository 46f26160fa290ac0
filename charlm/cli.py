"""The `charlm` command. Each subcommand parses flags into a config, runs, and with --json prints
one JSON object on stdout at the end. Errors are one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import builtins
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charlm import __version__

if TYPE_CHECKING:
    from charlm.refs import DataRef

# ---------------------------------------------------------------------------------------------
# shared helpers


class CLIError(Exception):
    """A problem with what the user asked for; printed as one line."""


def _emit_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def resolve_model(ref: str, device: str = "cpu", store: str | None = None):
    """(model, vocab, checkpoint dict, label) from models:/NAME@ALIAS, models:/NAME/VERSION,
    runs:/..., a checkpoint path/URL or a run folder (local or in a store), resolved once by
    charlm.refs."""
    from charlm import checkpoint, refs

    got = refs.resolve_model(ref, store)
    if not isinstance(got, refs.CheckpointRef):
        from charlm.tracking import resolve_model_ref  # mlflow is imported only for these

        return resolve_model_ref(got, device, store=store)
    model, vocab, ck = checkpoint.load_model(refs.load_checkpoint(got), name=got.label, device=device)
    return model, vocab, ck, got.label


# ---------------------------------------------------------------------------------------------
# train


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (help, defaults and char-rnn's spellings from the config),
    and --device, which picks where a local run trains rather than what it trains."""
    from charlm.cli_flags import add_config_flags
    from charlm.config import TrainConfig

    groups = add_config_flags(
        p,
        TrainConfig,
        group_titles={"run length": "run length (the first limit reached stops; default --max-epochs 10)"},
    )
    groups["evaluation and numerics"].add_argument(
        "--device", default="auto", help="auto | cpu | cuda[:N] (default %(default)s)"
    )


def train_config_from_args(a: argparse.Namespace):
    """The TrainConfig of the parsed flags: every flag named like a config field sets it."""
    import dataclasses

    from charlm.config import TrainConfig

    given = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(a, f.name)}
    if all(given.get(k) is None for k in ("max_steps", "max_epochs", "time_budget")):
        given["max_epochs"] = 10  # the documented default run length
    return TrainConfig.from_dict(given)


def resolve_corpus(given: str, store: str | None):
    """The corpus argument as a typed reference (charlm.refs), resolved once here; a choice the
    user should know of (the newest of several datasets of one name) is said on stderr."""
    from charlm.refs import resolve_data

    ref = resolve_data(given, store)
    note = getattr(ref, "note", None)
    if note:
        print(f"charlm: {note}", file=sys.stderr)
    return ref


def refuse_existing_run(out: Path, resume: bool) -> None:
    """A local out folder that already holds a run is continued only with --resume."""
    from charlm.runs import LAST_FILE

    if (out / LAST_FILE).exists() and not resume:
        raise CLIError(
            f"{out}: already holds a training run (last.pt); pass --resume to continue it or choose another --out"
        )


def run_local_training(
    cfg,
    corpus: str | DataRef,
    out: Path,
    *,
    resume: bool,
    quiet: bool,
    store: str | None = None,
    device: str = "auto",
    extra_callbacks: list | None = None,
) -> dict:
    """Plain single-process training into a local out dir: checkpoints, metrics, loss.png."""
    from charlm import checkpoint, runs
    from charlm.callbacks import CheckpointFiles, ConfigFile, MetricsFile, ProgressBar
    from charlm.refs import resolve_data
    from charlm.train import TrainingDiverged, pick_device, train
    from charlm.trainingdata import load_training_data

    refuse_existing_run(out, resume)  # before any work: the corpus may be large
    corpus = resolve_data(corpus, store)  # typed already when cmd_train resolved it
    vocab, splits, fp, label = load_training_data(corpus, cfg.val_frac, cfg.test_frac, store)
    last = out / runs.LAST_FILE
    start = checkpoint.load(last) if resume and last.is_file() else None
    callbacks = [
        ConfigFile(out, corpus.given),
        MetricsFile(out),
        CheckpointFiles(out),
        *(extra_callbacks or []),
    ]
    if not quiet:
        callbacks.append(ProgressBar())
    try:
        result = train(
            cfg,
            vocab,
            splits,
            callbacks=callbacks,
            resume=start,
            device=pick_device() if device == "auto" else device,
            corpus_fingerprint=fp,
            corpus_name=label,
        )
    except TrainingDiverged as e:
        kept = f"; last good checkpoint: {last}" if last.is_file() else "; no checkpoint was written"
        raise CLIError(f"{out}: {e}{kept}") from e
    summary = {
        "out_dir": str(out),
        "corpus": label,
        "corpus_fingerprint": fp,
        "vocab_size": len(vocab),
        "best_checkpoint": str(out / runs.BEST_FILE),
        "last_checkpoint": str(last),
        **result,
    }
    runs.write_summary(out, summary, indent=2)
    return summary


def check_train_precision(precision: str, device: str, distributed: bool, use_gpu: bool | None) -> None:
    """Refuse, before any work, a --precision that the device the run will use cannot train
    natively. A distributed run is checked here when its workers are this machine's CPU (local
    Ray without --gpu and without a GPU here); elsewhere each worker's train() refuses it first."""
    from charlm import capability
    from charlm.train import pick_device

    if distributed:
        if os.environ.get("RAY_ADDRESS") or use_gpu or (use_gpu is None and pick_device().type != "cpu"):
            return
        device = "cpu"
    capability.resolve(precision, pick_device() if device == "auto" else device, "train")


def cmd_train(a: argparse.Namespace) -> dict:
    cfg = train_config_from_args(a)
    quiet = a.json and not sys.stderr.isatty()
    distributed = a.workers is not None or a.out is None
    check_train_precision(cfg.precision, a.device, distributed, a.gpu)
    if distributed and a.out is not None:
        raise CLIError("--out is for a local run; with --workers the run lives in <store>/runs/<run name>")
    from charlm.storage_check import check_local_folder, check_store

    if not distributed:  # checked before MLflow opens a run that would only end FAILED
        refuse_existing_run(Path(a.out), a.resume)
        check_local_folder(a.out, "--out")
    else:  # before the corpus is read: the run is written to the store
        check_store(a.store)
    corpus = resolve_corpus(a.corpus, a.store)

    if distributed:
        from charlm.distributed import train_distributed

        scaling = {"workers": a.workers or 1, "use_gpu": a.gpu}

        def run_fn(tracked=None) -> dict:
            return train_distributed(
                cfg,
                corpus,
                store=a.store,
                workers=scaling["workers"],
                use_gpu=a.gpu,
                run_name=a.run_name,
                resume=a.resume,
                max_failures=a.max_failures,
                on_run_folder=tracked.bind_folder if tracked is not None else None,
                quiet=quiet,
            )

    else:
        scaling = {"workers": 1, "use_gpu": a.device.startswith("cuda")}

        def run_fn(tracked=None) -> dict:
            return run_local_training(
                cfg,
                corpus,
                Path(a.out),
                resume=a.resume,
                quiet=quiet,
                store=a.store,
                device=a.device,
                extra_callbacks=tracked.callbacks() if tracked is not None else None,
            )

    if a.no_track:
        if a.register:
            raise CLIError("--register needs tracking; drop --no-track")
        summary = run_fn()
    else:
        from charlm import tracking

        summary = tracking.tracked_training(
            run_fn,
            corpus=corpus,
            out=a.out,
            store=a.store,
            register=a.register,
            experiment=a.experiment,
            tracking_uri=a.tracking_uri,
            run_name=a.run_name,
            params=scaling,
        )
    if not a.json:
        where = summary.get("out_dir") or summary.get("run_url")
        print(
            f"trained {summary['steps']} steps ({summary['epochs']:.2f} epochs): best val loss "
            f"{summary['best_val_loss']:.4f} nats/char ({summary['best_val_bpc']:.4f} bpc), "
            f"{summary['chars_per_s']:,.0f} chars/s; checkpoints in {where}",
            file=sys.stderr,
        )
        reg = (summary.get("mlflow") or {}).get("registered")
        if reg:
            print(f"registered {reg['model_uri']}", file=sys.stderr)
    return summary


# ---------------------------------------------------------------------------------------------
# sample


def add_sample_precision_flag(p: argparse.ArgumentParser) -> None:
    """--precision for `charlm sample` and `charlm generate`."""
    from charlm.config import SAMPLE_PRECISIONS

    p.add_argument(
        "--precision",
        choices=SAMPLE_PRECISIONS,
        default="auto",
        help="auto = int8 on an x86 CPU (fastest: oneDNN with VNNI/AMX, fbgemm with 7-bit inputs on "
        "AVX2; docs/benchmarks.md), else bf16 where the hardware has it, else fp32; `charlm info` "
        "lists what runs here (default %(default)s)",
    )


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """--length, --temperature, --top-k, --top-p, --seed and --stop, defaults from SamplingParams
    (`charlm sample` and `charlm generate`); sampling_from_args reads them back."""
    from charlm.config import SamplingParams

    d = SamplingParams()
    p.add_argument(
        "--length", type=int, default=d.length, help="characters to generate per sample (default %(default)s)"
    )
    p.add_argument(
        "--temperature", type=float, default=d.temperature, help="0 = argmax (default %(default)s)"
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=d.top_k,
        help="keep the k most likely characters, 0 = all (default %(default)s)",
    )
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass (default %(default)s)")
    p.add_argument(
        "--seed", type=int, default=d.seed, help="samples are reproducible for a seed (default %(default)s)"
    )
    p.add_argument(
        "--stop",
        default=d.stop,
        help="end a sample where this string appears; it is not kept "
        + ("(default: none)" if d.stop is None else "(default %(default)r)"),
    )


def sampling_from_args(a: argparse.Namespace) -> dict[str, Any]:
    """The SamplingParams fields of parsed add_sampling_flags flags, by name."""
    from charlm.config import SamplingParams

    return {k: getattr(a, k) for k in SamplingParams.names()}


def _add_sample_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prime",
        "--primetext",
        action="append",
        default=None,
        help="text to start from; repeat for several streams (default: one character drawn from the corpus frequencies)",
    )
    p.add_argument("--num-samples", type=int, default=1, help="samples per prime (default %(default)s)")
    add_sampling_flags(p)
    add_sample_precision_flag(p)


def generate_samples(model, vocab, a: argparse.Namespace, stream: bool) -> tuple[list[dict], str]:
    """(the samples, the precision they were made at: what `auto` resolved to)."""
    from charlm.sample import Sampler

    primes = a.prime or [""]
    prompts = [p for p in primes for _ in range(a.num_samples)]
    for p in primes:  # before anything is printed
        vocab.encode(p, where=f"--prime {p!r}" if len(primes) > 1 else "--prime text")
    sampler = Sampler(model, vocab, precision=a.precision, max_batch=len(prompts))
    on_text = None
    if stream and len(prompts) == 1:
        sys.stdout.write(prompts[0])

        def on_text(i: int, text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

    params = sampling_from_args(a)
    texts = sampler.generate(prompts, params.pop("length"), **params, on_text=on_text)
    if stream and len(prompts) == 1:
        sys.stdout.write("\n")
    elif stream:
        for i, (p, t) in enumerate(zip(prompts, texts, strict=True)):
            print(f"--- sample {i + 1} ---\n{p}{t}")
    return [{"prime": p, "text": t} for p, t in zip(prompts, texts, strict=True)], sampler.precision


def cmd_sample(a: argparse.Namespace) -> dict:
    from charlm import capability

    capability.resolve(a.precision, "cpu", "sample")  # before the model is fetched
    model, vocab, ck, label = resolve_model(a.model, store=a.store)
    samples, precision = generate_samples(model, vocab, a, stream=not a.json)
    return {
        "model": label,
        "step": ck.get("step"),
        "params": {**sampling_from_args(a), "num_samples": a.num_samples},
        "precision": precision,
        "samples": samples,
    }


# ---------------------------------------------------------------------------------------------
# wiring


def build_parser() -> argparse.ArgumentParser:
    # Long (~110 lines) because it is a list: each subcommand's flags, declared once, in order.
    parser = argparse.ArgumentParser(
        prog="charlm",
        description="Character-level language models: ingest corpora, train (locally or on Ray), track in MLflow, generate.",
    )
    parser.add_argument("--version", action="version", version=f"charlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a model on a corpus or dataset",
        description="Train a character-level model. CORPUS is a text file, a folder of text files, 'builtin:python-stdlib', or a dataset id/URL from `charlm ingest`.",
    )
    t.add_argument("corpus", metavar="CORPUS")
    t.add_argument(
        "--out",
        "--checkpoint-dir",
        default=None,
        help="local run: folder for checkpoints (last.pt, best.pt), metrics.jsonl and loss.png; "
        "without it the run goes to Ray and <store>/runs/<run name>",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run (in --out, or the Ray run named by --run-name / the parameters) exactly",
    )
    t.add_argument(
        "--store",
        default=None,
        help="store root for datasets and runs (default $CHARLM_STORE or ~/.charlm/store)",
    )
    ray = t.add_argument_group("distributed (Ray Train; RAY_ADDRESS joins a cluster)")
    ray.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DDP workers; the global batch is --batch-size x workers streams",
    )
    ray.add_argument(
        "--gpu",
        dest="gpu",
        action="store_true",
        default=None,
        help="one GPU per worker (default: when the cluster has them)",
    )
    ray.add_argument("--no-gpu", dest="gpu", action="store_false", help="CPU workers (gloo)")
    ray.add_argument(
        "--run-name",
        default=None,
        help="run folder name (default: derived from the parameters, so re-running resumes)",
    )
    ray.add_argument(
        "--max-failures",
        type=int,
        default=2,
        help="worker-group restarts from the last checkpoint (default %(default)s)",
    )
    tr = t.add_argument_group("tracking (MLflow; MLFLOW_TRACKING_URI for a server)")
    tr.add_argument(
        "--register",
        default=None,
        metavar="NAME",
        help="register the best checkpoint as a new version of model NAME",
    )
    tr.add_argument("--experiment", default=None, help="MLflow experiment (default charlm)")
    tr.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite beside the store)",
    )
    tr.add_argument("--no-track", action="store_true", help="do not record the run in MLflow")
    _add_train_flags(t)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser(
        "sample",
        help="generate text from a trained model",
        description="Generate text. MODEL is models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint file or URL, or a run folder (its best checkpoint).",
    )
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--store", default=None, help="store root for run-folder and dataset references")
    _add_sample_flags(s)
    s.set_defaults(func=cmd_sample)

    for module in (
        "charlm.cli_info",
        "charlm.cli_datasets",
        "charlm.cli_models",
        "charlm.cli_jobs",
        "charlm.cli_server",
        "charlm.cli_visualize",
        "charlm.cli_sweep",
    ):
        try:
            mod = __import__(module, fromlist=["add_commands"])
        except ModuleNotFoundError as e:  # that part's extras are not installed
            if e.name == module or (e.name or "").split(".")[0] in {
                "fsspec",
                "s3fs",
                "prefect",
                "mlflow",
                "ray",
            }:
                continue
            raise
        mod.add_commands(sub)

    for action in sub.choices.values():
        if not any("--json" in a.option_strings for a in action._actions):
            action.add_argument(
                "--json", action="store_true", help="print one JSON object on stdout at the end"
            )
    return parser


def quiet_framework_logs() -> None:
    """stderr carries charlm's progress and its one-line errors, so MLflow's INFO lines (creating
    its sqlite tables on first use, alembic's migrations) are held back unless
    MLFLOW_LOGGING_LEVEL asks for them. Set before mlflow is imported, and on its loggers in
    case it already was."""
    level = os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING").upper()
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(level)


# OSError and its builtin subclasses: their message is "[Errno N] text: 'path'", said again in
# charlm's words. charlm's own OSError subclasses (storage errors) already speak them.
_PLAIN_OS_ERRORS = {c for c in vars(builtins).values() if isinstance(c, type) and issubclass(c, OSError)}


def main(argv: list[str] | None = None) -> int:
    from charlm import telemetry

    telemetry.disable()
    quiet_framework_logs()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("charlm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line; CHARLM_DEBUG=1 for the traceback
        if os.environ.get("CHARLM_DEBUG"):
            raise
        from charlm.errors import first_line, os_error_line

        msg = (os_error_line(e) if type(e) in _PLAIN_OS_ERRORS else None) or first_line(e)
        print(f"charlm: error: {msg}", file=sys.stderr)
        return 1
    if getattr(args, "json", False) and result is not None:
        _emit_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
