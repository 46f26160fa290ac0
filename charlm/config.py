"""Frozen, JSON-able configs, one per stage.

The same dict is the CLI's flags, a Prefect flow's parameters, MLflow's params and Ray's
train_loop_config, so every field is a plain str/int/float/bool/None.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T", bound="_Config")

CELLS = ("lstm", "gru", "rnn")
OPTIMIZERS = ("adam", "adamw", "rmsprop")
SCHEDULES = ("cosine", "step", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
# Weight decay when none is given. AdamW's is decoupled and was tuned (docs/benchmarks.md); Adam
# and RMSprop add it to the gradient (L2), where the adaptive step scales it up to about lr per
# step on every weight whose gradient is small, so they get none, as in char-rnn.
DEFAULT_WEIGHT_DECAY = {"adamw": 0.25, "adam": 0.0, "rmsprop": 0.0}
# sampling also runs int8: weights and hidden states in int8, products exact in int32 (CPU)
SAMPLE_PRECISIONS = (*PRECISIONS, "int8")


def _opt(
    default: Any,
    help: str,
    group: str,
    *flags: str,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
) -> Any:
    """A config field with what its command-line flag shows: help, group, extra spellings."""
    meta = {"help": help, "group": group, "flags": flags, "choices": choices, "metavar": metavar}
    return dataclasses.field(default=default, metadata=meta)


class _Config:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
        return cls(**d)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class ModelConfig(_Config):
    vocab_size: int
    cell: str = "lstm"
    num_layers: int = 2
    hidden_size: int = 512
    embed_size: int = 64
    dropout: float = 0.5
    weight_drop: float = 0.0  # DropConnect on the recurrent weights (AWD-LSTM), one mask per batch

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.vocab_size < 1 or self.num_layers < 1 or self.hidden_size < 1 or self.embed_size < 1:
            raise ValueError(f"model sizes must be positive: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.weight_drop < 1.0:
            raise ValueError(f"weight_drop must be in [0, 1), got {self.weight_drop}")


@dataclass(frozen=True)
class TrainConfig(_Config):
    """Everything that decides a training run except the data itself.

    Defaults are the ones tuned on tinyshakespeare for a 10-minute budget on a 2-core CPU
    (bench/quality.py; every run is in docs/benchmarks.md). With ~7 epochs in reach, char-rnn's
    dropout 0.5 underfits; char-rnn's seq-len 50 beat 100 (twice the updates for the same
    characters at the same chars/s) and 32 (fewer chars/s); evaluating a moving average of the
    weights (ema) scored 0.002-0.010 (median 0.004) below the trained weights at the same step;
    with it, dropout 0.2 did better than 0.25, and AdamW at lr 4e-3 was measured best, by
    margins within run-to-run noise. 2x384 and 2x448 get 11 and 9 epochs in the same time but
    ended behind (2x384 overfit from epoch 9), and 3x400 far behind; 2x576 (5.8 epochs) ended
    level over three seeds and 2x640 (4.7) behind. Skip connections from both layers to the head
    and a dropout rising over the run did not beat this either. Then AdamW's weight decay 0.25
    in place of 0.1 lowered the mean by 0.007 (7 runs against 15, all 7 under 1.40), the first
    change clear of that noise; 0.4 ended level with 0.25 but learns slower early.
    """

    # Each field's `help` (and `flags`: char-rnn's spellings, `choices`) is what `charlm train`
    # shows for its flag, --field-name, generated from these fields (charlm.cli_flags).
    # model
    cell: str = _opt("lstm", "recurrent cell", "model", "--model", choices=CELLS)
    num_layers: int = _opt(2, "layers", "model")
    hidden_size: int = _opt(512, "units per layer", "model", "--rnn-size")
    embed_size: int = _opt(64, "character embedding size", "model")
    dropout: float = _opt(0.2, "dropout between layers and before the head", "model")
    weight_drop: float = _opt(
        0.0, "DropConnect on the recurrent weights, one mask per batch (AWD-LSTM)", "model"
    )
    # data
    seq_len: int = _opt(50, "truncated-BPTT length T", "data", "--seq-length")
    batch_size: int = _opt(64, "parallel streams B per worker", "data")
    val_frac: float = _opt(0.05, "validation fraction for a raw corpus", "data")
    test_frac: float = _opt(0.05, "test fraction for a raw corpus, may be 0", "data")
    auto_shrink: bool = _opt(False, "shrink the batch size when the corpus is too small for it", "data")
    # optimisation
    optimizer: str = _opt("adamw", "", "optimisation", choices=OPTIMIZERS)
    lr: float = _opt(4e-3, "peak learning rate", "optimisation", "--learning-rate")
    weight_decay: float | None = _opt(  # None: DEFAULT_WEIGHT_DECAY of the optimizer
        None,
        "decoupled with adamw, L2 with adam and rmsprop (default "
        + ", ".join(f"{wd:g} with {opt}" for opt, wd in DEFAULT_WEIGHT_DECAY.items())
        + ")",
        "optimisation",
    )
    schedule: str = _opt(
        "cosine",
        "lr schedule: warmup+cosine, char-rnn's step decay, or constant",
        "optimisation",
        choices=SCHEDULES,
    )
    warmup_steps: int = _opt(100, "", "optimisation")
    min_lr_frac: float = _opt(0.05, "cosine floor as a fraction of --lr", "optimisation")
    lr_decay: float = _opt(0.97, "step schedule: factor per epoch", "optimisation", "--learning-rate-decay")
    lr_decay_after: int = _opt(  # char-rnn's learning_rate_decay_after
        10, "step schedule: first decayed epoch", "optimisation", "--learning-rate-decay-after"
    )
    grad_clip: float = _opt(5.0, "global gradient-norm clip", "optimisation")
    # Evaluate, save and sample an exponential moving average of the weights (Polyak averaging);
    # its decay ramps as min(ema, (1 + step) / (10 + step)), so it averages over about the last
    # tenth of a short run and 1 / (1 - ema) steps of a long one. 0 turns it off.
    ema: float = _opt(
        0.998,
        "evaluate, save and sample a moving average of the weights with this decay; 0: off",
        "optimisation",
    )
    # length of the run: the first limit reached stops it (at least one must be set)
    max_steps: int | None = _opt(None, "optimizer steps", "run length")
    max_epochs: float | None = _opt(None, "passes over the training split", "run length")
    time_budget: float | None = _opt(  # evaluation time excluded
        None, "minutes of training (evaluation excluded)", "run length", metavar="MINUTES"
    )
    # evaluation and numerics
    eval_every: int = _opt(
        200, "steps between evaluations on the whole val split", "evaluation and numerics", "--eval-val-every"
    )
    eval_max_batches: int | None = _opt(
        None, "val batches per evaluation (default: the whole val split)", "evaluation and numerics"
    )
    precision: str = _opt(
        "auto",
        "auto = bf16 where the hardware runs it natively, else fp32; `charlm info` lists what runs here",
        "evaluation and numerics",
        choices=PRECISIONS,
    )
    seed: int = _opt(1337, "", "evaluation and numerics")
    log_every: int = _opt(10, "steps between progress records", "evaluation and numerics")

    def __post_init__(self) -> None:
        self.model_config(1)  # validates the model fields
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.weight_decay is None:  # resolved here, so the dict logged and sent holds the figure
            object.__setattr__(self, "weight_decay", DEFAULT_WEIGHT_DECAY[self.optimizer])
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.seq_len < 1 or self.batch_size < 1:
            raise ValueError("seq_len and batch_size must be positive")
        if not (0 < self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ValueError("need 0 < val_frac, 0 <= test_frac and val_frac + test_frac < 1")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if self.max_steps is None and self.max_epochs is None and self.time_budget is None:
            raise ValueError("set at least one of max_steps, max_epochs, time_budget")
        if self.eval_every < 1 or self.log_every < 1:
            raise ValueError("eval_every and log_every must be positive")

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The ModelConfig these fields describe. TrainConfig stays flat on purpose (one level of
        JSON for Prefect's parameters, MLflow's params and Ray's config; run names are a hash of
        that dict, so nesting would rename every existing run): it carries ModelConfig's fields
        by name, which this reads, so neither restates the other's list."""
        fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size"}
        return ModelConfig(vocab_size=vocab_size, **{k: getattr(self, k) for k in fields})


@dataclass(frozen=True)
class SamplingParams(_Config):
    """How samples are drawn: the one home of the sampling defaults.

    `charlm sample`, `charlm generate` (GenerateConfig extends this), the registered model's
    params (charlm.tracking.PARAM_DEFAULTS) and the training run's logged samples all take their
    defaults from here. `charlm.sample.Sampler.generate` keeps its own keyword defaults.
    """

    length: int = 500  # characters generated per sample (the prompt not counted)
    temperature: float = 0.8  # 0 = argmax
    top_k: int = 0  # keep the k most likely characters; 0 = all
    top_p: float = 1.0  # nucleus sampling mass; 1 = all
    seed: int = 0  # a sample is a pure function of (seed, stream id)
    stop: str | None = None  # end a sample where this string appears (it is not kept)

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(SamplingParams))

    def sampling_params(self) -> dict[str, Any]:
        """Just the sampling fields (also of a subclass such as GenerateConfig)."""
        return {k: getattr(self, k) for k in self.names()}
