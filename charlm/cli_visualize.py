"""`charlm visualize MODEL --text FILE | --sample N --out report.html`: the page of what a model
predicts over a text and what its cells track (charlm.visualize computes, visualize_html draws)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from charlm.visualize import MAX_CHARS

DEFAULT_CHARS = 10_000


def _read_text(path: str, max_chars: int) -> tuple[str, bool]:
    """(up to max_chars characters of the UTF-8 file, whether it held more)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such file" if not p.exists() else f"{path}: not a file")
    try:
        with p.open(encoding="utf-8", newline="") as f:
            text = f.read(max_chars)
            more = bool(f.read(1))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    return text.replace("\r\n", "\n"), more


def _sample_text(model, vocab, a: argparse.Namespace) -> str:
    from charlm.sample import Sampler

    prime = a.prime or ""
    vocab.encode(prime, where="--prime text")
    sampler = Sampler(model, vocab, precision="fp32", max_batch=1)
    return prime + sampler.generate([prime], a.sample, temperature=a.temperature, seed=a.seed)[0]


def cmd_visualize(a: argparse.Namespace) -> dict:
    from charlm.cli import CLIError, resolve_model

    if not 2 <= a.max_chars <= MAX_CHARS:
        raise CLIError(f"--max-chars {a.max_chars}: must be between 2 and {MAX_CHARS}")
    if a.sample is not None and not 1 <= a.sample <= a.max_chars:
        raise CLIError(f"--sample {a.sample}: must be between 1 and --max-chars ({a.max_chars})")
    out = Path(a.out)
    if out.is_dir() or not out.parent.is_dir():
        raise CLIError(f"--out {a.out}: " + ("is a folder" if out.is_dir() else "its folder does not exist"))
    truncated = False
    if a.text is not None:  # before the model is fetched: a missing file fails at once
        text, truncated = _read_text(a.text, a.max_chars)
        if truncated:
            print(f"charlm: {a.text}: visualizing its first {a.max_chars} characters", file=sys.stderr)
    t0 = time.perf_counter()
    model, vocab, ck, label = resolve_model(a.model, store=a.store)
    if a.sample is not None:
        text = _sample_text(model, vocab, a)[: a.max_chars]
    source = a.text if a.text is not None else f"{a.sample} sampled characters (seed {a.seed})"
    if len(text) < 2:
        raise CLIError(f"{source}: needs at least 2 characters, has {len(text)}")
    return visualize_to(model, vocab, ck, label, text, source, out, truncated=truncated, started=t0)


def visualize_to(model, vocab, ck: dict, label: str, text: str, source: str, out: Path, **extra) -> dict:
    """Analyse text with the model, write the page to out, and return the summary."""
    from charlm import __version__, visualize, visualize_html

    t0 = time.perf_counter()
    ids = vocab.encode(text, where=source)
    an = visualize.analyze(model, ids, text)
    cfg = model.config
    meta = {
        "model": label,
        "step": ck.get("step"),
        "dataset": ck.get("corpus_fingerprint"),
        "architecture": f"{cfg.num_layers}x{cfg.hidden_size} {cfg.cell}",
        "text": source,
        "characters": len(text),
        "bpc on this text": an.summary()["bpc"],
        "charlm": __version__,
    }
    page = visualize_html.render(an, meta, vocab.chars)
    visualize_html.write(out, page)
    started = extra.pop("started", t0)
    return {
        "out": str(out),
        "bytes": len(page.encode("utf-8")),
        **{k: v for k, v in meta.items() if k not in ("characters", "bpc on this text")},
        **an.summary(),
        **extra,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _print(summary: dict) -> None:
    print(f"wrote {summary['out']} ({summary['chars']} characters, bpc {summary['bpc']})")
    for f in summary["features"].values():
        if f["constant"]:
            print(f"  {f['title']:<32} constant in this text")
            continue
        cells = ", ".join(f"L{c['layer']} {c['kind']}{c['cell']} {c['r']:+.3f}" for c in f["best"][:3])
        print(f"  {f['title']:<32} {cells}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser(
        "visualize",
        help="a page of what a model predicts over a text and which cells track which features",
        description="Write one self-contained HTML page: the text coloured by the model's confidence "
        "(hover: its top 5 guesses), every layer's h and tanh(c) per cell, and the cells that "
        "correlate best with features of the text (quotes, brackets, position in line, "
        "indentation, strings, comments). MODEL is models:/NAME@ALIAS, models:/NAME/VERSION, a "
        "checkpoint file or URL, or a run folder.",
    )
    v.add_argument("model", metavar="MODEL")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", metavar="FILE", help="a UTF-8 text file (its first --max-chars characters)")
    src.add_argument("--sample", type=int, metavar="N", help="generate N characters first and visualize them")
    v.add_argument("--out", required=True, help="the HTML file to write (written whole, or not at all)")
    v.add_argument(
        "--max-chars",
        type=int,
        default=DEFAULT_CHARS,
        help=f"characters visualized at most (default %(default)s, limit {MAX_CHARS})",
    )
    g = v.add_argument_group("--sample")
    g.add_argument("--prime", default=None, help="text the sample starts from (default: none)")
    g.add_argument("--temperature", type=float, default=0.8, help="(default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    v.add_argument("--store", default=None, help="store root for run-folder and dataset references")
    v.add_argument("--json", action="store_true", help="print one JSON object on stdout at the end")
    v.set_defaults(func=_run)


def _run(a: argparse.Namespace) -> dict:
    summary = cmd_visualize(a)
    if not a.json:
        _print(summary)
    return summary
