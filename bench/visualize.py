"""`charlm visualize` speed: N characters (default 10,000) visualized with a 2x512 LSTM: the exact
trace (every layer's h and tanh(c), p and top 5 per position), the features, the ranking and the
HTML page, in seconds (issue 20's target: under 10 s for 10,000 characters on 2 CPU cores).

The reference, measured in the same run on the same text: the model's own fused forward over it
as one stream (nn.LSTM, all layers at once, on the thread count trace's recurrence uses), which
yields neither the lower layers' states nor any c_t. The ratio is what the visualization costs
over that minimum. The text is Python source (this Python's own argparse.py, the default corpus's
kind); the weights are random (speed does not depend on them), or a checkpoint's with --checkpoint.

    python bench/visualize.py [--chars 10000] [--checkpoint PATH]
Prints one JSON object: the seconds of each stage (wall and this process's CPU time: on a shared,
loaded machine the CPU seconds are what an idle one would take as wall time, the recurrence being
single-threaded), the total, the reference, the ratios, the page's size, the machine and its load
average.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from charlm import capability, visualize, visualize_html
from charlm.checkpoint import load_model
from charlm.config import ModelConfig
from charlm.model import CharLM
from charlm.vocab import Vocab


def _text(chars: int) -> str:
    src = Path(argparse.__file__).read_text(encoding="utf-8")
    return (src * (chars // len(src) + 1))[:chars]


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chars", type=int, default=10_000)
    p.add_argument("--checkpoint", default=None, help="a charlm checkpoint (default: a random 2x512)")
    args = p.parse_args()
    text = _text(args.chars)
    if args.checkpoint:
        model, vocab, _ = load_model(args.checkpoint, name=args.checkpoint)
        text = "".join(c for c in text if c in vocab)
    else:
        torch.manual_seed(0)
        vocab = Vocab.from_text(text)
        model = CharLM(ModelConfig(vocab_size=len(vocab), num_layers=2, hidden_size=512)).eval()
    ids = vocab.encode(text)

    # the reference: the model's own forward, one stream, one thread (as trace's recurrence)
    x = torch.as_tensor(ids.astype("int64"))[None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    model(x)
    reference, reference_cpu = time.perf_counter() - t0, time.process_time() - c0
    torch.set_num_threads(threads)

    stages: dict[str, float] = {}
    cpu: dict[str, float] = {}
    t0, c0 = time.perf_counter(), time.process_time()

    def lap(name: str, t: float, c: float) -> tuple[float, float]:
        stages[name], cpu[name] = time.perf_counter() - t, time.process_time() - c
        return time.perf_counter(), time.process_time()

    tr = visualize.trace(model, ids, text)
    t, c = lap("trace", t0, c0)
    feats = visualize.features(text)
    t, c = lap("features", t, c)
    corr = visualize.correlations(feats, tr.acts)
    best = visualize.rank_cells(corr, tr.labels)
    sample = visualize.random_cells(corr, tr.labels)
    t, c = lap("ranking", t, c)
    an = visualize.Analysis(tr, feats, corr, tr.labels, best, sample)
    page = visualize_html.render(an, {"model": "bench"}, vocab.chars)
    with tempfile.TemporaryDirectory() as tmp:
        visualize_html.write(Path(tmp) / "page.html", page)
    lap("html", t, c)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    cfg = model.config
    print(
        json.dumps(
            {
                "bench": "visualize",
                "machine": capability.machine_info(),
                "load_average": os.getloadavg(),
                "model": f"{cfg.num_layers}x{cfg.hidden_size} {cfg.cell}",
                "chars": len(text),
                "seconds": {k: round(v, 3) for k, v in stages.items()},
                "total_s": round(total, 3),
                "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
                "total_cpu_s": round(total_cpu, 3),
                "reference_model_forward_1_thread_s": round(reference, 3),
                "reference_cpu_s": round(reference_cpu, 3),
                "ratio_to_reference": round(total / reference, 2),
                "cpu_ratio_to_reference": round(total_cpu / reference_cpu, 2),
                "target_s": 10.0,
                "page_bytes": len(page.encode("utf-8")),
                "cells_in_page": len(visualize_html.pick_cells(an)),
                "cells": len(tr.labels),
            }
        )
    )


if __name__ == "__main__":
    main()
