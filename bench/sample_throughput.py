"""Sampling throughput: charlm's batched Sampler vs a plain per-step nn.LSTM loop, same model.

The plain loop is what char-rnn/torch-rnn-style scripts do: per character, embedding ->
nn.LSTM on a (N, 1) input with the carried state -> linear -> softmax -> multinomial. Both sides
generate from the same weights at 1 and 256 streams; runs alternate for --rounds rounds.

    python bench/sample_throughput.py [--length 300 --rounds 3]
Prints one JSON object: chars/s per variant (median of rounds) and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from charlm.config import ModelConfig
from charlm.model import CharLM
from charlm.sample import Sampler
from charlm.vocab import Vocab

V = 65


@torch.inference_mode()
def plain(model: CharLM, n: int, length: int) -> float:
    g = torch.Generator().manual_seed(0)
    tok = torch.zeros(n, 1, dtype=torch.int64)
    state = None
    t0 = time.perf_counter()
    for _ in range(length):
        out, state = model.rnn(model.embed(tok).transpose(0, 1), state)  # (1, N, H)
        probs = torch.softmax(model.head(out[0]) / 0.8, dim=-1)
        tok = torch.multinomial(probs, 1, generator=g)
    return n * length / (time.perf_counter() - t0)


def charlm(sampler: Sampler, n: int, length: int) -> float:
    t0 = time.perf_counter()
    sampler.generate([""] * n, length, temperature=0.8, seed=0)
    return n * length / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--length", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    model = CharLM(ModelConfig(V, "lstm", args.num_layers, args.hidden_size, 64, 0.0)).eval()
    vocab = Vocab(tuple(chr(32 + i) for i in range(V)), tuple(range(1, V + 1)))
    results: dict[str, list[float]] = {}
    samplers = {n: Sampler(model, vocab, max_batch=n) for n in (1, 256)}
    for n in (1, 256):
        plain(model, n, 10), charlm(samplers[n], n, 10)  # warm up both
    for _ in range(args.rounds):
        for n in (1, 256):
            results.setdefault(f"plain_{n}", []).append(plain(model, n, args.length))
            results.setdefault(f"charlm_{n}", []).append(charlm(samplers[n], n, args.length))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        json.dumps(
            {
                "bench": "sample_throughput",
                "config": {
                    "hidden_size": args.hidden_size,
                    "num_layers": args.num_layers,
                    "length": args.length,
                    "rounds": args.rounds,
                },
                "charlm_precision": samplers[1].precision,
                "threads": torch.get_num_threads(),
                "chars_per_s": {k: round(v) for k, v in med.items()},
                "ratio_1_stream": round(med["charlm_1"] / med["plain_1"], 2),
                "ratio_256_streams": round(med["charlm_256"] / med["plain_256"], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
