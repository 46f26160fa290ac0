"""Quality under a wall-clock budget: train with the CLI's defaults for --minutes, report the
validation loss on the last 10% of the corpus (nanoGPT's split for tinyshakespeare) and samples.

    python bench/quality.py ../shared/data/tinyshakespeare/input.txt --minutes 10 [--out DIR] [train flags]

Any `charlm train` flag may follow (e.g. --dropout 0.3); unspecified ones keep the CLI defaults.
Prints one JSON object: config, steps, epochs, best val loss (nats/char and bpc), chars/s, samples.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from charlm.cli import _add_train_flags, run_local_training, train_config_from_args
from charlm.sample import Sampler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--out", default=None)
    _add_train_flags(p)
    a = p.parse_args()
    a.time_budget, a.val_frac, a.test_frac = a.minutes, 0.1, 0.0  # last 10% is the val split
    cfg = train_config_from_args(a)
    cfg = cfg.replace(max_epochs=None) if a.max_epochs is None else cfg
    out = Path(a.out or tempfile.mkdtemp(prefix="charlm-quality-"))
    summary = run_local_training(cfg, a.corpus, out, resume=False, quiet=False, device=a.device)
    from charlm.checkpoint import load_model

    model, vocab, _ = load_model(str(out / "best.pt"))
    samples = Sampler(model, vocab, max_batch=2).generate(["ROMEO:", "\n"], 300, temperature=0.8, seed=0)
    print(
        json.dumps(
            {
                "bench": "quality",
                "corpus": a.corpus,
                "minutes": a.minutes,
                "config": cfg.to_dict(),
                "steps": summary["steps"],
                "epochs": summary["epochs"],
                "best_val_loss": round(summary["best_val_loss"], 4),
                "best_val_bpc": round(summary["best_val_loss"] / math.log(2), 4),
                "final_train_loss": summary["train_loss"],
                "chars_per_s": round(summary["chars_per_s"]),
                "precision": summary["precision"],
                "out_dir": str(out),
                "samples": samples,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
