"""bf16 vs fp32 at equal steps: the same run (seed, data, config) under --precision fp32 and
--precision bf16, validation loss compared at every evaluation. Target: |diff| <= 0.01 nats/char.

    python bench/precision.py ../shared/data/tinyshakespeare/input.txt [--steps 400 --eval-every 100]
Prints one JSON object: where it ran (`machine`), val loss per precision per evaluation, the
differences, chars/s of each.
"""

from __future__ import annotations

import argparse
import json

from charlm import capability
from charlm.config import TrainConfig
from charlm.train import Callback, train
from charlm.trainingdata import load_training_data


class Evals(Callback):
    def __init__(self) -> None:
        self.val: dict[int, float] = {}

    def on_eval(self, run, m) -> None:
        self.val[m["step"]] = m["val_loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=100)
    a = p.parse_args()
    vocab, splits, fp, label = load_training_data(a.corpus, 0.1, 0.0)
    out = {}
    base = TrainConfig(max_steps=a.steps, eval_every=a.eval_every, val_frac=0.1, test_frac=0.0)
    for precision in ("fp32", "bf16"):
        cfg = base.replace(precision=precision)
        ev = Evals()
        res = train(
            cfg, vocab, splits, callbacks=[ev], device="cpu", corpus_fingerprint=fp, corpus_name=label
        )
        out[precision] = {"val_loss": ev.val, "chars_per_s": round(res["chars_per_s"])}
    diffs = {
        s: round(out["bf16"]["val_loss"][s] - out["fp32"]["val_loss"][s], 5) for s in out["fp32"]["val_loss"]
    }
    print(
        json.dumps(
            {
                "bench": "precision",
                "machine": capability.machine_info(),
                "corpus": a.corpus,
                "steps": a.steps,
                "config": base.to_dict(),
                "fp32": out["fp32"],
                "bf16": out["bf16"],
                "bf16_minus_fp32": diffs,
                "max_abs_diff": max(abs(d) for d in diffs.values()),
                "within_0_01": all(abs(d) <= 0.01 for d in diffs.values()),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
