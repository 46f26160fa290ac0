"""Training throughput on CPU: charlm's training loop vs a plain PyTorch loop, same config, same run.

Both sides are timed the same way: wall clock over whole optimizer steps, from the end of step
--warmup to the end of step --warmup + --steps. Everything a step does is inside the window:
forward, backward, clipping, the optimizer, logging and the stop check.

The plain loop is what a user writes: nn.Embedding -> nn.LSTM -> dropout -> nn.Linear, with the
same sizes, batch, seq-len, dropout (between layers and before the head, as charlm's model),
optimizer (torch's fused AdamW/Adam kernel where it exists, as charlm asks for), lr, weight decay,
grad clip and log interval as charlm's config; the recurrent state is carried across batches. It
runs in fp32, and under bf16 autocast when charlm's --precision auto resolves to bf16 on this CPU.

charlm runs its real `train()` (what `charlm train` and the Ray workers call) with a callback
that reads the clock at step boundaries, at --precision fp32 and auto. Its weight average and
weight drop are off, since the plain loop has neither. The defaults are `charlm train`'s.

Runs alternate (plain fp32, charlm fp32, plain bf16, charlm auto) for --rounds rounds, so that
drift on a shared machine hits both sides alike. The plain loop, the clock and the flags are
bench/trainbench.py's, shared with bench/gpu_train.py.

    python bench/train_throughput.py [--hidden-size 512 --num-layers 2 --batch-size 64 --seq-len 50]
Prints one JSON object: where it ran (`machine`), chars/s per variant (median of rounds) and the
ratios. Ratios compare variants of one run; chars/s from another CPU are not comparable.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import trainbench

from charlm import capability


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    trainbench.add_train_args(p, trainbench.DEFAULTS.batch_size, steps_default=10, warmup_default=2)
    args = trainbench.parse_train_args(p)
    W, S = args.warmup, args.steps
    cfg = trainbench.config_from_args(args, W, S)
    data = trainbench.random_data(cfg, W, S)
    cpu = torch.device("cpu")
    auto = capability.resolve("auto", "cpu", "train")
    # (plain loop's precision, charlm's --precision): the plain loop gets what `auto` gives charlm
    pairs = [("fp32", "fp32")] + ([("bf16", "auto")] if auto == "bf16" else [])
    runs: dict[str, list[float]] = {}
    fused: dict[str, bool] = {}
    for _ in range(args.rounds):
        for plain_prec, charlm_prec in pairs:
            cps, fused["plain"] = trainbench.plain_loop(cfg, data, cpu, plain_prec == "bf16", W, S)
            runs.setdefault(f"plain_{plain_prec}", []).append(cps)
            cps, clock = trainbench.charlm_loop(cfg, data, cpu, charlm_prec, W, S)
            if clock.precision != plain_prec:
                raise SystemExit(
                    f"train_throughput: charlm --precision {charlm_prec} ran {clock.precision}, "
                    f"but charlm.capability resolved {plain_prec}: the plain loop would not match"
                )
            fused["charlm"] = clock.fused
            runs.setdefault(f"charlm_{charlm_prec}", []).append(cps)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratios = {"ratio_charlm_fp32_vs_plain_fp32": med["charlm_fp32"] / med["plain_fp32"]}
    if auto == "bf16":
        ratios["ratio_charlm_auto_vs_plain_bf16"] = med["charlm_auto"] / med["plain_bf16"]
        ratios["ratio_charlm_auto_vs_plain_fp32"] = med["charlm_auto"] / med["plain_fp32"]
        ratios["ratio_plain_bf16_vs_plain_fp32"] = med["plain_bf16"] / med["plain_fp32"]
    print(
        json.dumps(
            {
                **trainbench.report_head("train_throughput", cfg, args),
                "auto_precision": auto,
                **trainbench.report_runs(fused, runs, med),
                **{k: round(v, 3) for k, v in ratios.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
