"""`charlm generate` and `charlm pipeline`: CLI wiring for the batch-generation and end-to-end
flows (flows/generate.py, flows/pipeline.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _generate(a: argparse.Namespace) -> dict[str, Any]:
    from charlm.generate import GenerateConfig
    from flows.generate import generate

    cfg = GenerateConfig(
        num_samples=a.num_samples,
        length=a.length,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        seed=a.seed,
        stop=a.stop,
        batch_size=a.batch_size,
    )
    res = generate(a.model, a.prompts, a.out, cfg.to_dict(), a.workers, a.store, progress=not a.json)
    if not a.json:
        print(
            f"{res['records']} records ({res['errors']} with errors) from {res['model']} in {res['out']}"
            f" at {res['chars_per_s']} chars/s",
            file=sys.stderr,
        )
    return res


def add_commands(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate",
        help="batch generation job: prompts file in, JSONL samples out (Ray actors)",
        description="Generate --num-samples samples per prompt. MODEL: models:/NAME@ALIAS, models:/NAME/VERSION, "
        "a checkpoint path/URL or a run folder. PROMPTS: a text file (one prompt per line) or .jsonl "
        '({"prompt": ..., "id": ...} per line) at any store URL. Output: <out>/part-*.jsonl and manifest.json '
        "(written last). A record's text depends only on the seed, its prompt and its index, not on --workers.",
    )
    g.add_argument("model", metavar="MODEL")
    g.add_argument("--prompts", required=True, help="URL or path of the prompts file")
    g.add_argument("--out", default=None, help="output folder URL (default <store>/samples/gen-<hash>)")
    g.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default %(default)s)")
    g.add_argument("--length", type=int, default=500, help="characters per sample (default %(default)s)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = argmax (default %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="(default: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="(default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    g.add_argument("--stop", default=None, help="end a sample at this string")
    g.add_argument(
        "--batch-size", type=int, default=256, help="streams per forward step (default %(default)s)"
    )
    g.add_argument("--workers", type=int, default=1, help="Ray actors (default %(default)s: in-process)")
    g.add_argument("--store", default=None, help="store root (default $CHARLM_STORE or ~/.charlm/store)")
    g.add_argument("--json", action="store_true", help="print one JSON object on stdout at the end")
    g.set_defaults(func=_generate)
