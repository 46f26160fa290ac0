"""Sampling throughput: charlm's batched Sampler vs a plain per-step nn.LSTM loop, same model.

The plain loop is what char-rnn/torch-rnn-style scripts do: per character, embedding ->
nn.LSTM on a (N, 1) input with the carried state -> linear -> softmax -> multinomial. It runs at
each precision a user gets in a line or two: fp32; bf16 autocast (where this CPU runs bf16
natively); int8 through torch.ao.quantization.quantize_dynamic on its nn.LSTM and nn.Linear.
charlm runs at its default (auto) and at every precision and int8 kernel this CPU has natively
(charlm.capability.probe). All generate from the same weights at 1 and 256 streams, timed the
same way (wall clock over the whole generation), in alternating rounds.

    python bench/sample_throughput.py [--length 300 --rounds 7] [--cap avx2]
--cap avx2 re-runs the bench with ATen, oneDNN, MKL and fbgemm capped at AVX2 (an AVX2-only CPU).
Prints one JSON object: the machine, chars/s per variant (median and best of the rounds), the
ratios of charlm's default to the plain fp32 loop, to each plain variant and to the fastest
plain variant at the same number of streams, and the ceiling: chars/s at 256 streams if a step
were only its recurrent GEMMs, for charlm's default kernel and for fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings

import torch

from charlm import capability
from charlm.config import ModelConfig
from charlm.model import CharLM
from charlm.sample import Sampler
from charlm.vocab import Vocab

V = 65
STREAMS = (1, 256)


@torch.inference_mode()
def plain(model: CharLM, n: int, length: int, bf16: bool = False) -> float:
    g = torch.Generator().manual_seed(0)
    tok = torch.zeros(n, 1, dtype=torch.int64)
    state = None
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t0 = time.perf_counter()
    with amp:
        for _ in range(length):
            out, state = model.rnn(model.embed(tok).transpose(0, 1), state)  # (1, N, H)
            probs = torch.softmax(model.head(out[0]).float() / 0.8, dim=-1)  # (N, V)
            tok = torch.multinomial(probs, 1, generator=g)
    return n * length / (time.perf_counter() - t0)


def charlm(sampler: Sampler, n: int, length: int) -> float:
    t0 = time.perf_counter()
    sampler.generate([""] * n, length, temperature=0.8, seed=0)
    return n * length / (time.perf_counter() - t0)


@torch.inference_mode()
def gemm_chars_per_s(sampler: Sampler, n: int, reps: int = 20) -> float:
    """chars/s if a step were nothing but its recurrent GEMMs (layer 0's h @ W_hh and each upper
    layer's [x, h] @ W): the ceiling any sampler with this kernel has at n streams."""
    h = sampler._zero_state(n)[0]  # (n, H) in the kernel's input dtype
    xh = torch.cat([h, h], 1)  # (n, 2H)
    gemms = [lambda: sampler.hh0(h)] + [lambda lin=lin: lin(xh) for lin, _ in sampler.upper]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for g in gemms:
            g()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def plain_variants(model: CharLM, caps: capability.Capabilities) -> dict:
    """name -> f(n, length) -> chars/s, for each precision a user gets in a line or two."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.LSTM, torch.nn.Linear}, dtype=torch.qint8)
    out = {
        "plain_fp32": lambda n, L: plain(model, n, L),
        "plain_int8_dynamic": lambda n, L: plain(q, n, L),
    }
    if "bf16" in caps.sample:  # elsewhere oneDNN refuses a bf16 LSTM
        out["plain_bf16"] = lambda n, L: plain(model, n, L, bf16=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--length", type=int, default=300)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--cap", choices=sorted(capability.CAPS), default=None, help="cap every CPU library's ISA")
    args = p.parse_args()
    if args.cap and any(os.environ.get(k) != v for k, v in capability.CAPS[args.cap].items()):
        # the libraries read their caps when they start: run again in a fresh process
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **capability.CAPS[args.cap]})
    torch.manual_seed(0)
    model = CharLM(ModelConfig(V, "lstm", args.num_layers, args.hidden_size, 64, 0.0)).eval()
    vocab = Vocab(tuple(chr(32 + i) for i in range(V)), tuple(range(1, V + 1)))
    caps = capability.probe("cpu")
    variants = plain_variants(model, caps)
    charlm_kinds = {"charlm": ("auto", None)}
    for prec in caps.sample:
        for kernel in caps.int8_kernels if prec == "int8" else [None]:
            charlm_kinds[f"charlm_{prec}" + (f"_{kernel}" if kernel else "")] = (prec, kernel)
    for name, (prec, kernel) in charlm_kinds.items():
        samplers = {
            n: Sampler(model, vocab, precision=prec, int8_kernel=kernel, max_batch=n) for n in STREAMS
        }
        variants[name] = lambda n, L, s=samplers: charlm(s[n], n, L)
    for f in variants.values():  # warm up every variant
        for n in STREAMS:
            f(n, 10)
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for n in STREAMS:
            for name, f in variants.items():
                results.setdefault(f"{name}_{n}", []).append(f(n, args.length))
    # The GEMM-only ceiling of charlm's default kernel and of plain fp32 GEMMs (torch's linear,
    # what nn.LSTM runs): how far the chars/s above can go on this CPU.
    default, n = Sampler(model, vocab, max_batch=STREAMS[-1]), STREAMS[-1]
    fp32 = Sampler(model, vocab, precision="fp32", max_batch=n)
    fp32.hh0.packed = None  # torch's linear, not oneDNN's prepacked one
    for lin, _ in fp32.upper:
        lin.packed = None
    ceiling = {
        f"charlm_gemms_only_{n}": round(gemm_chars_per_s(default, n)),
        f"fp32_gemms_only_{n}": round(gemm_chars_per_s(fp32, n)),
    }
    med = {k: statistics.median(v) for k, v in results.items()}
    # Other tenants of a shared machine only ever slow a round down, so the best round of each
    # variant is its least disturbed figure; the medians are printed too.
    best = {k: max(v) for k, v in results.items()}
    plains = [k for k in variants if k.startswith("plain")]

    def ratios(fig: dict[str, float]) -> dict[str, dict[str, float]]:
        out = {}
        for n in STREAMS:
            fastest = max(plains, key=lambda k: fig[f"{k}_{n}"])
            ours = fig[f"charlm_{n}"]
            out[str(n)] = {
                **{f"charlm_vs_{k}": round(ours / fig[f"{k}_{n}"], 2) for k in plains},
                "charlm_vs_fastest_plain": round(ours / fig[f"{fastest}_{n}"], 2),
                "fastest_plain": fastest,
            }
        return out

    print(
        json.dumps(
            {
                "bench": "sample_throughput",
                "machine": capability.machine_info(),
                "config": {
                    "hidden_size": args.hidden_size,
                    "num_layers": args.num_layers,
                    "length": args.length,
                    "rounds": args.rounds,
                    "cap": args.cap,
                },
                "charlm_precision": Sampler(model, vocab, max_batch=1).precision,
                "charlm_int8_kernel": caps.int8_kernel,
                "chars_per_s_median": {k: round(v) for k, v in med.items()},
                "chars_per_s_best": {k: round(v) for k, v in best.items()},
                "gemm_ceiling_chars_per_s": ceiling,
                "ceiling_vs_plain_fp32": round(ceiling[f"charlm_gemms_only_{n}"] / med[f"plain_fp32_{n}"], 2),
                "ratio_median": ratios(med),
                "ratio_best": ratios(best),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
