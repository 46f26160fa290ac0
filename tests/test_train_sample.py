"""The training loop and the sampler, at tiny sizes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from tiny import TEXT, tiny_cfg

import charlm.sample
from charlm import capability, checkpoint
from charlm.callbacks import CheckpointFiles, MetricsFile
from charlm.config import DEFAULT_WEIGHT_DECAY, ModelConfig, TrainConfig
from charlm.data import split_ids
from charlm.model import CharLM
from charlm.sample import Sampler, sample
from charlm.train import Callback, TrainingDiverged, evaluate, train
from charlm.vocab import UnknownCharactersError, Vocab


def _data(text=TEXT, val=0.1):
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text)
    return vocab, split_ids(ids, val, 0.0)


_cfg = tiny_cfg


class Recorder(Callback):
    def __init__(self, stop_at=None):
        self.losses, self.evals, self.stop_at = {}, [], stop_at

    def on_log(self, run, m):
        self.losses[m["step"]] = m["train_loss"]

    def on_eval(self, run, m):
        self.evals.append(m)

    def should_stop(self, run):
        return self.stop_at is not None and run.step >= self.stop_at


def test_overfits_a_30_char_string():
    text = "abcdefghij0123456789ABCDEFGHIJ"  # 30 distinct characters
    vocab = Vocab.from_text(text)
    ids = np.tile(vocab.encode(text), 40)
    # val = the whole string sequence again, so the few cold-start characters of a stream
    # (zero state, never seen mid-training) weigh little in its mean
    splits = {"train": ids, "val": ids, "test": ids[:0]}
    cfg = _cfg(hidden_size=64, dropout=0.0, lr=1e-2, max_steps=300, eval_every=100, seq_len=15, batch_size=2)
    rec = Recorder()
    res = train(cfg, vocab, splits, callbacks=[rec], device="cpu")
    assert rec.losses[300] < 0.05 < 3.0 < rec.losses[1]
    assert res["best_val_loss"] < 0.1


def test_seeded_runs_are_reproducible_and_loss_decreases():
    vocab, splits = _data()
    a, b = Recorder(), Recorder()
    ra = train(_cfg(), vocab, splits, callbacks=[a], device="cpu")
    rb = train(_cfg(), vocab, splits, callbacks=[b], device="cpu")
    assert a.losses == b.losses and ra["best_val_loss"] == rb["best_val_loss"]
    assert a.losses[30] < a.losses[1] - 0.5
    c = Recorder()
    train(_cfg(seed=4), vocab, splits, callbacks=[c], device="cpu")
    assert c.losses != a.losses
    assert abs(a.losses[1] - math.log(len(vocab))) < 0.3  # starts at ~ ln V


def test_weight_decay_defaults_per_optimizer_and_reaches_the_optimizer():
    from charlm.cli import build_parser, train_config_from_args
    from charlm.train import make_optimizer

    model = CharLM(ModelConfig(vocab_size=5, hidden_size=8, embed_size=4))
    for opt, wd in [("adamw", DEFAULT_WEIGHT_DECAY["adamw"]), ("adam", 0.0), ("rmsprop", 0.0)]:
        cfg = _cfg(optimizer=opt)
        assert cfg.weight_decay == wd  # resolved, so logged params and run names hold the figure
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
        assert [g["weight_decay"] for g in make_optimizer(cfg, model).param_groups] == [wd]
    assert DEFAULT_WEIGHT_DECAY["adamw"] > 0
    assert _cfg(optimizer="rmsprop", weight_decay=0.01).weight_decay == 0.01
    with pytest.raises(ValueError, match="weight_decay"):
        _cfg(weight_decay=-0.1)
    for argv, wd in [
        ([], DEFAULT_WEIGHT_DECAY["adamw"]),
        (["--optimizer", "rmsprop"], 0.0),
        (["--weight-decay", "0"], 0.0),
    ]:
        args = build_parser().parse_args(["train", "corpus.txt", "--out", "o", *argv])
        assert train_config_from_args(args).weight_decay == wd


def test_resume_equals_uninterrupted(tmp_path):
    """Interrupt at step 20 (mid-run, mid-epoch), resume from last.pt: same losses after."""
    vocab, splits = _data()
    cfg = _cfg(max_steps=40, eval_every=10, dropout=0.3)
    full = Recorder()
    train(cfg, vocab, splits, callbacks=[full], device="cpu")
    first = Recorder(stop_at=20)
    train(cfg, vocab, splits, callbacks=[first, CheckpointFiles(tmp_path)], device="cpu")
    ck = checkpoint.load(tmp_path / "last.pt")
    assert ck["step"] == 20 and ck["carry"] is not None
    rest = Recorder()
    train(cfg, vocab, splits, callbacks=[rest], resume=ck, device="cpu")
    assert min(rest.losses) == 21
    assert {s: rest.losses[s] for s in range(21, 41)} == {s: full.losses[s] for s in range(21, 41)}
    # the val losses are the weight average's, so they match only if the average resumed exactly
    assert [(e["step"], e["val_loss"]) for e in rest.evals] == [
        (e["step"], e["val_loss"]) for e in full.evals if e["step"] > 20
    ]


def test_weight_average_is_evaluated_saved_and_kept_apart_from_the_trained_weights(tmp_path):
    vocab, splits = _data()

    class Snapshots(Recorder):
        def on_start(self, run):
            self.weights = [[p.detach().clone() for p in run.model.parameters()]]

        def on_log(self, run, m):
            super().on_log(run, m)
            self.weights.append([p.detach().clone() for p in run.model.parameters()])

    rec = Snapshots()
    cfg = _cfg(max_steps=12, eval_every=12, ema=0.9)
    train(cfg, vocab, splits, callbacks=[rec, CheckpointFiles(tmp_path)], device="cpu")
    avg = rec.weights[0]
    for n, w in enumerate(rec.weights[1:], start=1):  # decay ramps: 2/11, 3/12, ... then 0.9
        d = min(0.9, (1 + n) / (10 + n))
        avg = [d * a + (1 - d) * p for a, p in zip(avg, w, strict=True)]
    ck = checkpoint.load(tmp_path / "last.pt")
    names = [k for k, _ in CharLM(cfg.model_config(len(vocab))).named_parameters()]
    for k, a, p in zip(names, avg, rec.weights[-1], strict=True):
        assert torch.allclose(ck["state_dict"][k], a, atol=1e-6), k
        assert torch.equal(ck["train_state_dict"][k], p), k
        assert not torch.allclose(a, p, atol=1e-4), k  # the average really differs
    model, _, _ = checkpoint.load_model(ck)
    assert evaluate(model, splits["val"], 4, 16)[0] == pytest.approx(rec.evals[-1]["val_loss"], abs=1e-6)

    plain = tmp_path / "plain"
    train(_cfg(max_steps=3, ema=0.0), vocab, splits, callbacks=[CheckpointFiles(plain)], device="cpu")
    assert checkpoint.load(plain / "last.pt")["train_state_dict"] is None


def test_epoch_boundaries_reset_state_and_advance_epochs():
    vocab, splits = _data(val=0.3)
    cfg = _cfg(max_epochs=3, max_steps=None, eval_every=1000)

    class StateSpy(Callback):
        """Sees the state every training batch starts from, by wrapping the trained model's forward."""

        def on_start(self, run):
            self.calls = []  # (epoch, batch in epoch, state in, state out) per training forward
            forward = run.model.forward

            def spy(x, state=None):
                logits, out = forward(x, state)
                if run.model.training:  # evaluation runs its own stream of states
                    kept = tuple(t.detach().clone() for t in out)
                    self.calls.append((run.epoch, run.batch_in_epoch, state, kept))
                return logits, out

            run.model.forward = spy

    spy = StateSpy()
    res = train(cfg, vocab, splits, callbacks=[spy], device="cpu")
    assert res["stopped_by"] == "max_epochs" and res["epochs"] >= 3
    assert sorted({e for e, *_ in spy.calls}) == [0, 1, 2] and spy.calls[0][2] is None
    for (e0, b0, _, out0), (e1, b1, state1, _) in itertools.pairwise(spy.calls):
        if e1 == e0:  # within an epoch each batch continues the previous batch's streams
            assert b1 == b0 + 1 and state1 is not None
            assert all(torch.equal(a, b) for a, b in zip(state1, out0, strict=True)), (e1, b1)
        else:  # a new epoch's streams start at another offset: the carried state must not leak in
            assert (e1, b1) == (e0 + 1, 0)
            assert state1 is None or not any(t.any() for t in state1), e1


def test_nan_aborts_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    vocab, splits = _data()

    class Poison(Callback):
        def on_eval(self, run, m):
            if run.step == 10:
                with torch.no_grad():
                    run.model.head.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"step 11.*loss nan"):
        train(_cfg(), vocab, splits, callbacks=[CheckpointFiles(tmp_path), Poison()], device="cpu")
    ck = checkpoint.load(tmp_path / "last.pt")  # validate() rejects non-finite weights
    assert ck["step"] == 10


@pytest.mark.hardware
def test_bf16_trains_and_writes_metrics_and_plot(tmp_path):
    if "bf16" not in capability.probe("cpu").train:
        pytest.skip(f"bf16: {capability.probe('cpu').missing['bf16']}")
    vocab, splits = _data()
    res = train(_cfg(precision="bf16"), vocab, splits, callbacks=[MetricsFile(tmp_path)], device="cpu")
    assert res["precision"] == "bf16" and math.isfinite(res["best_val_loss"])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 30 + 3 and (tmp_path / "loss.png").stat().st_size > 1000


def test_evaluate_shrinks_for_short_splits():
    vocab, splits = _data()
    model = CharLM(_cfg().model_config(len(vocab)))
    loss, n = evaluate(model, splits["val"][:50], 64, 100)
    assert n > 0 and math.isfinite(loss)


# -- sampling ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    vocab, _ = _data()
    torch.manual_seed(0)
    model = CharLM(_cfg().model_config(len(vocab))).eval()
    return model, vocab


def test_seeded_sampling_is_reproducible(trained):
    model, vocab = trained
    s = Sampler(model, vocab, precision="fp32")
    a = s.generate(["the ", "qu", ""], 40, seed=11)
    assert a == s.generate(["the ", "qu", ""], 40, seed=11)
    assert a != s.generate(["the ", "qu", ""], 40, seed=12)
    assert [len(t) for t in a] == [40, 40, 40]


def test_temperature_zero_is_argmax(trained):
    model, vocab = trained
    out = Sampler(model, vocab, precision="fp32").generate(["the q"], 25, temperature=0)[0]
    ids = vocab.encode("the q").tolist()
    for _ in range(25):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    assert out == vocab.decode(ids[5:])
    assert sample(model, vocab, ["the q"], 25, top_k=1, precision="fp32")[0] == out


# Every way the Sampler can run, as (precision, int8 kernel, FUSED_INT8). A variant whose
# hardware this machine lacks is skipped with the reason; scripts/test runs these tests once more
# with every CPU library capped at AVX2, so the AVX2 variants are checked on any machine.
SAMPLER_VARIANTS = {
    "fp32": ("fp32", None, True),
    "bf16": ("bf16", None, True),
    "int8-onednn": ("int8", "onednn-vnni", True),
    "int8-int-mm": ("int8", "onednn-vnni", False),  # the VNNI family's unfused path (_int_mm)
    "int8-fbgemm": ("int8", "fbgemm-avx2", True),
}


def sampler_variant(name, monkeypatch):
    """Sampler kwargs for a variant, or a skip naming what this machine lacks for it."""
    precision, kernel, fused = SAMPLER_VARIANTS[name]
    caps = capability.probe("cpu")
    if precision not in caps.sample:
        pytest.skip(f"{name}: {caps.missing[precision]}")
    if kernel is not None and kernel not in caps.int8_kernels:
        pytest.skip(
            f"{name}: the {kernel} int8 kernel is not exact on this CPU (kernels here: {caps.int8_kernels})"
        )
    monkeypatch.setattr(charlm.sample, "FUSED_INT8", fused)
    return {"precision": precision, "int8_kernel": kernel}


@pytest.mark.hardware
@pytest.mark.parametrize("variant", list(SAMPLER_VARIANTS))
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_sampler_steps_match_the_model_at_every_precision(cell, variant, monkeypatch):
    kw = sampler_variant(variant, monkeypatch)
    vocab = Vocab.from_text(TEXT)
    torch.manual_seed(0)
    model = CharLM(ModelConfig(len(vocab), cell, 2, 32, 8, 0.0)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # gates far from 0 as well as near it: the whole range of each nonlinearity
    x = torch.from_numpy(vocab.encode(TEXT[:160]).astype("int64")).view(4, 40)  # (B, T)
    with torch.no_grad():
        ref = torch.log_softmax(model(x)[0], -1)  # (B, T, V), one fused forward in fp32
        s = Sampler(model, vocab, max_batch=4, **kw)
        state = s._zero_state(4)
        got = torch.stack([torch.log_softmax(s._step(x[:, t], state), -1) for t in range(40)], 1)
    # Largest log-prob error over the 3 cells (log-probs span ~5-9 nats), measured on this test:
    # fp32 ~2e-6, bf16 0.008-0.044, int8-onednn and int-mm 0.023-0.089, int8-fbgemm (7-bit inputs)
    # 0.036-0.099, the same capped at AVX2. Each bound is ~1.5x the largest, so an error twice
    # as large fails.
    tol = {"fp32": 1e-4, "bf16": 0.07, "int8-onednn": 0.14, "int8-int-mm": 0.14, "int8-fbgemm": 0.15}[variant]
    assert (got - ref).abs().max() < tol, variant


def test_sampler_rejects_an_unknown_precision(trained):
    model, vocab = trained
    with pytest.raises(ValueError, match=r"precision must be one of .*'int4'"):
        Sampler(model, vocab, precision="int4")


def test_auto_takes_the_fastest_native_precision_and_an_unavailable_one_is_refused(trained, monkeypatch):
    model, vocab = trained
    caps = capability.probe("cpu")
    assert Sampler(model, vocab).precision == caps.auto_sample
    if caps.int8_kernels:  # an x86 CPU with AVX2 or better always has one
        assert caps.auto_sample == "int8" and Sampler(model, vocab).int8_kernel == caps.int8_kernels[0]
    # a CPU with neither exact int8 kernel nor bf16 (the probe's answer replaced)
    bare = capability.Capabilities(
        "cpu", ("fp32",), ("fp32",), (), {"bf16": "no bf16 here", "int8": "no int8 here"}
    )
    monkeypatch.setattr(capability, "probe", lambda device="cpu": bare)
    assert Sampler(model, vocab).precision == "fp32"
    for precision, why in (("int8", "no int8 here"), ("bf16", "no bf16 here")):
        with pytest.raises(capability.PrecisionUnavailable) as e:
            Sampler(model, vocab, precision=precision)
        assert str(e.value) == (
            f"precision {precision} cannot sample on cpu: {why}; precisions that run here: fp32 (or auto)"
        )


@pytest.mark.hardware
@pytest.mark.parametrize("variant", list(SAMPLER_VARIANTS))
def test_a_stream_does_not_depend_on_its_batch(trained, variant, monkeypatch):
    kw = sampler_variant(variant, monkeypatch)
    model, vocab = trained
    s = Sampler(model, vocab, **kw)
    prompts = ["a", "the lazy d", "x", "the lazy do", *["over the "] * 40]
    batch = s.generate(prompts, 60, seed=5, stream_ids=range(7, 7 + len(prompts)))
    alone = Sampler(model, vocab, max_batch=1, **kw).generate(["the lazy d"], 60, seed=5, stream_ids=[8])
    assert batch[1] == alone[0]
    pair = s.generate(["the lazy do", "the lazy d"], 60, seed=5, stream_ids=[10, 8])
    assert pair[1] == alone[0] and pair[0] == batch[3]


@pytest.mark.hardware
@pytest.mark.parametrize("variant", ["int8-onednn", "int8-int-mm", "int8-fbgemm"])
def test_int8_streams_do_not_depend_on_their_batch_at_full_width(variant, monkeypatch):
    """At 2x512, where fp32 GEMM libraries pick their kernels by batch size (and so round a row
    differently), the int8 kernels' exact sums keep a stream's numbers, not just its text at
    small widths, independent of its batch."""
    kw = sampler_variant(variant, monkeypatch)
    vocab = Vocab(tuple(chr(48 + i) for i in range(65)), tuple(range(1, 66)))
    torch.manual_seed(0)
    model = CharLM(ModelConfig(65, "lstm", 2, 512, 64, 0.0)).eval()
    x = torch.from_numpy(vocab.encode("BCDEFGHIJKLMNOPQRSTU").astype("int64"))[None]  # (1, T)
    many, one = Sampler(model, vocab, max_batch=44, **kw), Sampler(model, vocab, max_batch=1, **kw)
    with torch.no_grad():
        states = many._zero_state(44), one._zero_state(1)
        for t in range(x.shape[1]):
            batch = many._step(torch.cat([x[:, t], torch.arange(43) % 65]), states[0])  # (44, V)
            alone = one._step(x[:, t], states[1])  # (1, V)
            assert torch.equal(batch[:1], alone), t


def test_top_p_and_top_k_restrict_the_support(trained):
    model, vocab = trained
    s = Sampler(model, vocab, precision="fp32")
    greedy = s.generate(["the "], 20, temperature=0)[0]
    assert s.generate(["the "], 20, top_p=1e-6, seed=1)[0] == greedy  # only the top token survives
    assert s.generate(["the "], 20, top_k=1, seed=2)[0] == greedy


def test_stop_string_ends_a_stream_and_streaming_matches(trained):
    model, vocab = trained
    s = Sampler(model, vocab, precision="fp32")
    full = s.generate(["t"], 200, seed=3)[0]
    stop = full[50:52]
    got: list[str] = []
    cut = s.generate(["t"], 200, seed=3, stop=stop, on_text=lambda i, t: got.append(t))[0]
    assert cut == full[: full.index(stop)] and "".join(got) == cut


def test_unknown_prime_characters_are_named(trained):
    model, vocab = trained
    with pytest.raises(UnknownCharactersError, match=r"prime text 2 .*'Z' \(U\+005A\)"):
        Sampler(model, vocab).generate(["the", "Zebra"], 5)
