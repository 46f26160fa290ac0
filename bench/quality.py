"""Quality under a wall-clock budget: train with the CLI's defaults for --minutes, report the
validation loss on the last 10% of the corpus (nanoGPT's split for tinyshakespeare) and samples.

    python bench/quality.py ../shared/data/tinyshakespeare/input.txt --minutes 10 [--out DIR] [train flags]

Any `charlm train` flag may follow (e.g. --dropout 0.3); unspecified ones keep the CLI defaults.
Prints one JSON object: where it ran (`machine`), config, steps, epochs, best val loss (nats/char
and bpc), chars/s, samples.

Two val figures for the best checkpoint: `best_val_loss` is what training measured, the val split
cut into `batch_size` streams that each start from a zero state (so the first characters of each
stream are scored with no context); `val_loss_one_stream` scores the same split as one stream
with the state carried from its first character to its last, the way an RNN language model is
read (AWD-LSTM's test batch of 1), every character after the first. Both in fp32; the streamed
figure leaves out the split's tail that does not fill a last batch, as training's eval does.

With a weight average (--ema, on by default) the checkpoint's model is the average, and the
weights the optimizer trained travel beside it: `val_loss_one_stream_trained` scores those too,
so one run shows what the average gained at the same step.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from charlm import capability
from charlm.checkpoint import load_model
from charlm.cli import _add_train_flags, run_local_training, train_config_from_args
from charlm.sample import Sampler
from charlm.train import evaluate
from charlm.trainingdata import load_training_data


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
    model, vocab, ck = load_model(str(out / "best.pt"))
    _, splits, _, _ = load_training_data(a.corpus, cfg.val_frac, cfg.test_frac, None)
    val = splits["val"]

    def one_stream(weights: dict) -> tuple[float, int]:  # the whole split as one forward
        model.load_state_dict(weights)
        return evaluate(model, val, 1, len(val) - 1, precision="fp32")

    streams_loss, streams_n = evaluate(model, val, cfg.batch_size, cfg.seq_len, precision="fp32")
    trained = ck.get("train_state_dict")
    trained_loss = round(one_stream(trained)[0], 4) if trained is not None else None
    one_loss, one_n = one_stream(ck["state_dict"])  # last, so the samples below use these weights
    samples = Sampler(model, vocab, max_batch=2).generate(["ROMEO:", "\n"], 300, temperature=0.8, seed=0)
    print(
        json.dumps(
            {
                "bench": "quality",
                "machine": capability.machine_info(),
                "corpus": a.corpus,
                "minutes": a.minutes,
                "config": cfg.to_dict(),
                "steps": summary["steps"],
                "epochs": summary["epochs"],
                "best_val_loss": round(summary["best_val_loss"], 4),
                "best_val_bpc": round(summary["best_val_loss"] / math.log(2), 4),
                "val_chars": len(val),
                "val_loss_streams_fp32": {"loss": round(streams_loss, 4), "chars_scored": streams_n},
                "val_loss_one_stream": round(one_loss, 4),
                "val_bpc_one_stream": round(one_loss / math.log(2), 4),
                "val_one_stream_chars_scored": one_n,
                "val_loss_one_stream_trained": trained_loss,
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
