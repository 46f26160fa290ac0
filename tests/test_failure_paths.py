"""The ways a training run is stopped or refused: a diverging or exploding loss, a non-finite
validation loss, a resume onto another model, vocabulary or corpus, a checkpoint write that dies
halfway, and the time budget. Tiny sizes; the clock is injected, never waited on."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from tiny import TEXT, tiny_cfg

import charlm.train
from charlm import checkpoint
from charlm.callbacks import CheckpointFiles
from charlm.config import TrainConfig
from charlm.data import fingerprint, split_ids
from charlm.model import CharLM
from charlm.train import Callback, TrainingDiverged, train
from charlm.vocab import Vocab


def _data(text: str = TEXT) -> tuple[Vocab, dict, str]:
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text)
    return vocab, split_ids(ids, 0.1, 0.0), fingerprint(ids)


def _cfg(**kw) -> TrainConfig:
    return tiny_cfg(**{"dropout": 0.0, "max_steps": 12, "eval_every": 5, **kw})


class Evals(Callback):
    def __init__(self) -> None:
        self.started = False
        self.steps: list[int] = []

    def on_start(self, run) -> None:
        self.started = True

    def on_eval(self, run, metrics) -> None:
        self.steps.append(metrics["step"])


# -- a run that blows up stops at once; the last good checkpoint stays -----------------------------


def test_an_exploding_but_finite_loss_aborts_and_keeps_the_last_good_checkpoint(tmp_path):
    vocab, splits, _ = _data()

    class Blowup(Callback):
        def on_eval(self, run, metrics):
            if run.step == 5:  # after last.pt is written: step 6 runs on weights gone wild
                with torch.no_grad():
                    run.model.head.weight.mul_(1000.0)

    # finite, so only the 3x-a-uniform-guess threshold can catch it
    with pytest.raises(
        TrainingDiverged,
        match=rf"training exploded at step 6: loss \d+\.\d+ nats/char, worse than 3x a uniform guess "
        rf"over {len(vocab)} characters",
    ):
        train(_cfg(), vocab, splits, callbacks=[CheckpointFiles(tmp_path), Blowup()], device="cpu")
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 5


def test_a_non_finite_gradient_aborts_even_when_the_loss_is_finite(tmp_path):
    vocab, splits, _ = _data()

    class InfGradient(Callback):
        def on_eval(self, run, metrics):
            if run.step == 5:
                run.model.head.bias.register_hook(lambda g: g * float("inf"))

    # without the gradient check, clipping turns inf into nan weights and only step 7 fails
    with pytest.raises(TrainingDiverged, match=r"diverged at step 6: loss \d+\.\d+, gradient norm (inf|nan)"):
        train(_cfg(), vocab, splits, callbacks=[CheckpointFiles(tmp_path), InfGradient()], device="cpu")
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 5


def test_a_non_finite_validation_loss_aborts_before_it_is_reported_or_saved(tmp_path):
    """The averaged weights are what is evaluated and saved; if they go bad while the trained
    weights stay finite, only the validation check can notice."""
    vocab, splits, _ = _data()

    class PoisonAverage(Callback):
        def on_log(self, run, metrics):
            if run.step == 10:  # after step 10's update, before step 10's evaluation
                with torch.no_grad():
                    run.ema_model.head.bias.fill_(float("nan"))

    evals = Evals()
    cfg = _cfg(ema=0.9)
    with pytest.raises(
        TrainingDiverged, match=r"validation loss is nan at step 10 \(the last good checkpoint"
    ):
        train(cfg, vocab, splits, callbacks=[evals, CheckpointFiles(tmp_path), PoisonAverage()], device="cpu")
    assert evals.steps == [5]  # step 10's nan was never reported to the callbacks
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 5
    assert checkpoint.load(tmp_path / "best.pt")["step"] == 5


# -- resuming continues the same run or nothing ----------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """(config, checkpoint dict) of a 5-step run on TEXT."""
    vocab, splits, fp = _data()
    out = tmp_path_factory.mktemp("run")
    cfg = _cfg(max_steps=5)
    train(cfg, vocab, splits, callbacks=[CheckpointFiles(out)], device="cpu", corpus_fingerprint=fp)
    return cfg, checkpoint.load(out / "last.pt")


def test_resume_continues_on_the_same_model_vocab_and_corpus(saved_run):
    cfg, ck = saved_run
    vocab, splits, fp = _data()
    res = train(cfg.replace(max_steps=7), vocab, splits, resume=ck, device="cpu", corpus_fingerprint=fp)
    assert res["steps"] == 7  # the control for the refusals below: the same run is continued


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            "model",
            r"cannot resume: checkpoint model .*hidden_size=32.* differs from the requested .*hidden_size=48",
        ),
        # as many characters, one of them another: the model still fits, the vocab check must speak
        ("vocab", r"cannot resume: the corpus vocabulary differs from the checkpoint's"),
        # the same characters in another order: same vocab, same model, another corpus
        ("corpus", r"cannot resume: the corpus differs from the one the checkpoint was trained on"),
    ],
    ids=["model", "vocab", "corpus"],
)
def test_resume_is_refused_on_another_model_vocab_or_corpus(saved_run, change, message):
    cfg, ck = saved_run
    text = {"vocab": TEXT.replace("z", "Z"), "corpus": TEXT[::-1]}.get(change, TEXT)
    vocab, splits, fp = _data(text)
    if change == "vocab":
        assert len(vocab) == len(Vocab.from_dict(ck["vocab"]))
    if change == "corpus":
        assert vocab.chars == Vocab.from_dict(ck["vocab"]).chars and fp != ck["corpus_fingerprint"]
    if change == "model":
        cfg = cfg.replace(hidden_size=48)
    calls = Evals()
    with pytest.raises(ValueError, match=message):
        train(
            cfg.replace(max_steps=7),
            vocab,
            splits,
            resume=ck,
            callbacks=[calls],
            device="cpu",
            corpus_fingerprint=fp,
        )
    assert not calls.started  # refused before the run began, not part-way through it


def test_cli_resume_with_another_model_is_one_error_line_and_keeps_the_checkpoint(tmp_path, capsys):
    from charlm.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "run"
    args = ["train", str(corpus), "--out", str(out), "--embed-size", "8", "--batch-size", "4"]
    args += ["--seq-len", "16", "--max-steps", "3", "--eval-every", "3", "--no-track", "--json"]
    assert main([*args, "--hidden-size", "32"]) == 0
    before = {f: (out / f).read_bytes() for f in ("last.pt", "config.json", "metrics.jsonl")}
    capsys.readouterr()
    assert main([*args, "--hidden-size", "48", "--max-steps", "6", "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("charlm: error: cannot resume: checkpoint model"), err
    assert {f: (out / f).read_bytes() for f in before} == before  # the refused resume changed nothing


# -- checkpoint.save: the old file or the new one, never half of one -------------------------------


def _tiny_checkpoint(step: int) -> dict:
    torch.manual_seed(step)
    vocab = Vocab.from_text("abcdefgh \n")
    model = CharLM(_cfg().model_config(len(vocab)))
    return checkpoint.build(model, model.config, vocab, step=step)


@pytest.mark.parametrize(
    "error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "interrupted"]
)
def test_a_save_that_dies_halfway_keeps_the_old_checkpoint_and_leaves_no_temp_file(
    tmp_path, monkeypatch, error
):
    path = checkpoint.save(_tiny_checkpoint(1), tmp_path / "last.pt")
    before = path.read_bytes()
    real_save = torch.save

    def dies_halfway(obj, f):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        raise error

    monkeypatch.setattr(checkpoint.torch, "save", dies_halfway)
    with pytest.raises(type(error)):
        checkpoint.save(_tiny_checkpoint(2), path)
    with pytest.raises(type(error)):
        checkpoint.save(_tiny_checkpoint(2), tmp_path / "best.pt")  # no old file to keep
    monkeypatch.undo()
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["last.pt"]  # no .tmp, no best.pt
    assert path.read_bytes() == before
    assert checkpoint.load(path)["step"] == 1


# -- the time budget counts training time, not wall time -------------------------------------------


class FakeClock:
    """Stands in for the `time` module in charlm.train: every perf_counter call advances `tick`
    seconds, so each training step measures exactly `tick` seconds (two calls per step)."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_the_time_budget_stops_training_after_that_much_training_time(monkeypatch):
    vocab, splits, _ = _data()
    monkeypatch.setattr(charlm.train, "time", FakeClock(0.5))
    evals = Evals()
    # 0.05 minutes = 3 s = 6 steps of 0.5 s; max_steps is only a backstop
    res = train(
        _cfg(time_budget=0.05, max_steps=50, eval_every=100), vocab, splits, callbacks=[evals], device="cpu"
    )
    assert res["stopped_by"] == "time_budget"
    assert res["steps"] == 6 and res["train_seconds"] == 3.0
    assert evals.steps == [6]  # the run is evaluated where it stopped
