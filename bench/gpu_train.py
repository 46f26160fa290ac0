"""GPU training throughput: charlm's training loop vs a plain PyTorch loop on the same GPU.

Both sides are timed the same way: wall clock over whole optimizer steps, from the end of step
--warmup to the end of step --warmup + --steps, with the GPU synchronised at both ends and
nowhere else. Everything a step does is inside the window: the batch's copy to the GPU, forward,
backward, clipping, the optimizer, logging (a host sync every log interval, on both sides) and
the stop check.

The plain loop is what a user writes: nn.Embedding -> nn.LSTM (cuDNN) -> dropout -> nn.Linear,
with the same sizes, batch, seq-len, dropout (between layers and before the head, as charlm's
model), optimizer (torch's fused AdamW/Adam kernel, as charlm asks for), lr, weight decay, grad
clip and log interval as charlm's config, and bf16 autocast when charlm's --precision auto
resolves to bf16 on this GPU; the recurrent state is carried across batches. charlm runs its
real `train()` (what `charlm train` and every Ray worker call) at --precision auto with a callback
that reads the clock at step boundaries. Its weight average and weight drop are off, since the
plain loop has neither. The defaults are `charlm train`'s, except a batch of 128 streams.
The runs alternate for --rounds rounds so that clock drift hits both alike. The plain loop, the
clock and the flags are bench/trainbench.py's, shared with bench/train_throughput.py.

    python bench/gpu_train.py [--batch-size 128 --seq-len 50 --steps 50 --rounds 3]
Prints one JSON object: where it ran (`machine`, with the GPU), chars/s per variant (median of
rounds) and the ratio. Needs a CUDA device; exits with a one-line error otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import trainbench

from charlm import capability


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    trainbench.add_train_args(p, 128, steps_default=50, warmup_default=10)
    args = trainbench.parse_train_args(p)
    if not torch.cuda.is_available():
        print("gpu_train: no CUDA device here; this benchmark needs a GPU", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda:0")
    W, S = args.warmup, args.steps
    cfg = trainbench.config_from_args(args, W, S, precision="auto")
    data = trainbench.random_data(cfg, W, S)
    prec = capability.resolve("auto", device, "train")  # what `auto` gives charlm, and the plain loop
    runs: dict[str, list[float]] = {f"plain_{prec}": [], f"charlm_{prec}": []}
    fused: dict[str, bool] = {}
    for _ in range(args.rounds):
        cps, fused["plain"] = trainbench.plain_loop(cfg, data, device, prec == "bf16", W, S)
        runs[f"plain_{prec}"].append(cps)
        cps, clock = trainbench.charlm_loop(cfg, data, device, "auto", W, S)
        if clock.precision != prec:
            raise SystemExit(
                f"gpu_train: charlm --precision auto ran {clock.precision}, but charlm.capability "
                f"resolved {prec}: the plain loop would not match"
            )
        fused["charlm"] = clock.fused
        runs[f"charlm_{prec}"].append(cps)
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(
        json.dumps(
            {
                **trainbench.report_head("gpu_train", cfg, args),
                "precision": prec,
                **trainbench.report_runs(fused, runs, med),
                "ratio_charlm_vs_plain": round(med[f"charlm_{prec}"] / med[f"plain_{prec}"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
