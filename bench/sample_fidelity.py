"""Sampling fidelity: the val loss a checkpoint scores through the Sampler's step at each precision.

Generation never runs the model's fused forward: it runs charlm.sample.Sampler's per-step path,
in fp32, bf16 or int8. This scores the val split (the last --val fraction of CORPUS, nanoGPT's
split) teacher-forced through that path, as --streams streams that each carry their state through
one contiguous slice, and through the model's own fp32 forward on the same slices. A precision
that changes what the model would generate shows up as a higher loss.

    python bench/sample_fidelity.py CHECKPOINT CORPUS [--val 0.1 --streams 100]
Prints one JSON object: nats/char per path and each precision's difference from fp32.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

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
    for precision in ("fp32", "bf16", "int8"):
        sampler = Sampler(model, vocab, precision=precision, max_batch=B)
        state = sampler._zero_state(B)
        total = 0.0
        t0 = time.perf_counter()
        for t in range(T):
            step_logits = sampler._step(x[:, t], state)  # (B, V) fp32
            total += torch.nn.functional.cross_entropy(step_logits, y[:, t], reduction="sum").item()
        seconds[precision] = round(time.perf_counter() - t0, 1)
        nll[f"sampler_{precision}"] = total / (B * T)
    print(
        json.dumps(
            {
                "bench": "sample_fidelity",
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
