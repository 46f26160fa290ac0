"""Sampling fidelity: the val loss a checkpoint scores through the Sampler's step at each precision.

Generation never runs the model's fused forward: it runs charlm.sample.Sampler's per-step path,
in fp32, bf16 or int8 (through each exact int8 kernel this CPU has: oneDNN with VNNI/AMX,
fbgemm with 7-bit inputs on AVX2 and up). This scores the val split (the last --val fraction of
CORPUS, nanoGPT's split) teacher-forced through that path (Sampler.score), as --streams streams
that each carry their state through one contiguous slice, and through the model's own fp32
forward on the same slices. A precision that changes what the model would generate shows up as
a higher loss. Run it capped at AVX2 (env from charlm.capability.CAPS) for the AVX2 kernels.

    python bench/sample_fidelity.py CHECKPOINT CORPUS [--val 0.1 --streams 100]
Prints one JSON object: nats/char per path and each precision's difference from fp32.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from charlm import capability
from charlm.checkpoint import load_model
from charlm.sample import Sampler


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("corpus")
    p.add_argument("--val", type=float, default=0.1)
    p.add_argument("--streams", type=int, default=100)
    args = p.parse_args()
    model, vocab, _ = load_model(args.checkpoint, name=args.checkpoint)
    text = Path(args.corpus).read_text(encoding="utf-8")
    ids = torch.from_numpy(vocab.encode(text[int(len(text) * (1 - args.val)) :]).astype("int64"))
    B = args.streams
    T = (len(ids) - 1) // B
    x = ids[: B * T].view(B, T)  # stream b reads one contiguous slice
    y = ids[1 : B * T + 1].view(B, T)
    logits, _ = model(x)  # (B, T, V): the fused forward, fp32
    nll = {"model_forward_fp32": torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()}
    seconds = {}
    caps = capability.probe("cpu")
    # every precision this CPU samples natively, and int8 through each exact kernel it has
    variants = [(p, None) for p in caps.sample if p != "int8"] + [("int8", k) for k in caps.int8_kernels]
    for precision, kernel in variants:
        name = f"{precision}_{kernel}" if kernel else precision
        sampler = Sampler(model, vocab, precision=precision, int8_kernel=kernel, max_batch=B)
        t0 = time.perf_counter()
        nll[f"sampler_{name}"] = sampler.score(x, y)
        seconds[name] = round(time.perf_counter() - t0, 1)
    print(
        json.dumps(
            {
                "bench": "sample_fidelity",
                "machine": capability.machine_info(),
                "checkpoint": args.checkpoint,
                "characters_scored": B * T,
                "streams": B,
                "nats_per_char": {k: round(v, 5) for k, v in nll.items()},
                "minus_sampler_fp32": {
                    k: round(v - nll["sampler_fp32"], 5) for k, v in nll.items() if k != "sampler_fp32"
                },
                "seconds": seconds,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
