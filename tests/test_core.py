"""Core: vocab, data layout, model, checkpoint. Tiny sizes, strong assertions."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from charlm import checkpoint
from charlm.config import ModelConfig, SamplingParams, TrainConfig
from charlm.data import CorpusTooSmallError, StreamBatcher, check_sizes, split_ids
from charlm.model import CharLM
from charlm.vocab import UnknownCharactersError, Vocab, dtype_for

# -- vocab -----------------------------------------------------------------------------------


def test_vocab_order_roundtrip_and_counts():
    text = "hello, wörld 🙂\n"
    v = Vocab.from_text(text)
    assert list(v.chars) == sorted(set(text), key=ord)
    assert dict(zip(v.chars, v.counts, strict=True))["l"] == 3
    again = Vocab.from_json(v.to_json())
    assert again == v
    ids = v.encode(text)
    assert ids.dtype == np.uint8
    assert v.decode(ids) == text
    # the order does not depend on the order characters arrive in
    assert Vocab.from_text(text[::-1]).chars == v.chars


def test_vocab_unknown_characters_are_listed_with_code_points():
    v = Vocab.from_text("abc")
    with pytest.raises(UnknownCharactersError) as e:
        v.encode("abxcé🙂x", where="prompt 3")
    msg = str(e.value)
    assert "prompt 3" in msg
    assert "U+0078" in msg and "x2" in msg  # 'x' twice
    assert "U+00E9" in msg and "U+1F642" in msg
    assert isinstance(e.value, ValueError) and not isinstance(e.value, KeyError)


def test_dtype_widens_with_vocab_size():
    assert dtype_for(256) == np.uint8
    assert dtype_for(257) == np.uint16
    assert dtype_for(70_000) == np.uint32
    big = Vocab(tuple(chr(0x4E00 + i) for i in range(300)))
    assert big.encode(big.chars[299] + big.chars[0]).tolist() == [299, 0]
    assert big.dtype == np.uint16


# -- data ------------------------------------------------------------------------------------


def test_split_is_contiguous_and_test_may_be_empty():
    ids = np.arange(1000)
    s = split_ids(ids, 0.05, 0.05)
    assert [len(s[k]) for k in ("train", "val", "test")] == [900, 50, 50]
    assert np.array_equal(np.concatenate([s["train"], s["val"], s["test"]]), ids)
    s0 = split_ids(ids, 0.1, 0.0)
    assert len(s0["test"]) == 0 and len(s0["val"]) == 100


def test_stream_batches_continue_each_stream_and_targets_shift_by_one():
    ids = np.arange(2 * 4 * 3 * 5 + 7)
    b = StreamBatcher(ids, batch_size=4, seq_len=5)
    batches = list(b.epoch(0))
    assert len(batches) == b.batches_per_epoch(0) == (len(ids) - 1) // 4 // 5
    for x, y in batches:
        assert x.shape == (4, 5) and x.dtype == torch.int64
        assert torch.equal(y, x + 1)
    # stream s of batch i+1 starts right after stream s of batch i ended (state can be carried)
    for (x0, _), (x1, _) in itertools.pairwise(batches):
        assert torch.equal(x1[:, 0], x0[:, -1] + 1)


def test_ranks_take_disjoint_streams_of_the_global_batch():
    ids = np.arange(3000)
    full = StreamBatcher(ids, 6, 10)  # one process with the global batch of 6 streams
    parts = [StreamBatcher(ids, 3, 10, rank=r, world_size=2) for r in range(2)]
    for (xf, _), (x0, _), (x1, _) in zip(full.epoch(0), parts[0].epoch(0), parts[1].epoch(0), strict=True):
        assert torch.equal(torch.cat([x0, x1]), xf)
        assert not set(x0.flatten().tolist()) & set(x1.flatten().tolist())


def test_epoch_offsets_are_seeded_and_resume_mid_epoch():
    ids = np.arange(5000)
    a = StreamBatcher(ids, 4, 10, seed=1)
    b = StreamBatcher(ids, 4, 10, seed=1)
    e1 = [x for x, _ in a.epoch(1)]
    assert all(torch.equal(p, q) for p, q in zip(e1, [x for x, _ in b.epoch(1)], strict=True))
    assert torch.equal(next(iter(a.epoch(1, start=3)))[0], e1[3])


def test_corpus_too_small_says_what_it_has_and_needs():
    splits = split_ids(np.zeros(20_000, dtype=np.uint8), 0.05, 0.05)
    with pytest.raises(CorpusTooSmallError) as e:
        check_sizes(splits, 64, 100, name="tiny.txt")
    msg = str(e.value)
    assert "tiny.txt" in msg and "20,000 characters" in msg and "1,000 val" in msg and "6,401" in msg
    bs, note = check_sizes(splits, 64, 100, auto_shrink=True, name="tiny.txt")
    assert bs == 9 and "shrunk to 9" in note  # (1000 - 1) // 100


# -- model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_loss_at_init_is_about_ln_vocab(cell):
    torch.manual_seed(0)
    V = 60
    model = CharLM(ModelConfig(V, cell, 2, 64, 16, 0.0)).eval()
    x = torch.randint(0, V, (8, 50))
    logits, _ = model(x)
    loss = F.cross_entropy(logits.reshape(-1, V), torch.randint(0, V, (8 * 50,)))
    assert abs(loss.item() - math.log(V)) < 0.1


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_carried_state_equals_one_long_forward(cell):
    torch.manual_seed(0)
    model = CharLM(ModelConfig(30, cell, 2, 32, 8, 0.3)).eval()
    x = torch.randint(0, 30, (3, 40))
    full, full_state = model(x)
    state, parts = None, []
    for chunk in x.split(7, dim=1):
        out, state = model(chunk, state)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    for a, b in zip(state, full_state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_layerwise_training_path_matches_fused_module(cell):
    """The CPU training path runs layers one by one (for cheap dropout); without dropout it
    must compute exactly what the fused multi-layer module computes."""
    torch.manual_seed(0)
    model = CharLM(ModelConfig(20, cell, 3, 16, 8, 0.0))
    x = torch.randint(0, 20, (2, 9))
    model.train()
    a, sa = model(x)
    model.eval()
    b, sb = model(x)
    torch.testing.assert_close(a, b)
    for p, q in zip(sa, sb, strict=True):
        torch.testing.assert_close(p, q)


def test_dropout_masks_drop_about_p_and_keep_the_mean():
    from charlm.model import fast_dropout

    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = fast_dropout(x, 0.5, True)
    assert abs((y == 0).float().mean().item() - 0.5) < 0.01
    assert abs(y.mean().item() - 1.0) < 0.02
    assert torch.equal(fast_dropout(x, 0.5, False), x)
    # the mask's bytes come four to a random word: each byte position must be unbiased
    y = fast_dropout(torch.ones(400_003), 0.2, True)  # p quantised to 51/256
    for r in range(4):
        assert abs((y[r::4] == 0).float().mean().item() - 51 / 256) < 0.006, r


@pytest.mark.parametrize("layers", [1, 2])
def test_weight_drop_masks_recurrent_connections_for_the_whole_batch(layers):
    """DropConnect: in training about p of each layer's hidden-to-hidden connections are cut for
    a whole forward (so their gradient is exactly 0), the stored weights never change, and eval
    is the plain model."""
    torch.manual_seed(0)
    p, H = 0.5, 32
    model = CharLM(ModelConfig(20, "lstm", layers, H, 8, 0.0, weight_drop=p))
    plain = CharLM(ModelConfig(20, "lstm", layers, H, 8, 0.0))
    plain.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 20, (4, 12))

    model.train()
    logits, _ = model(x)
    logits.sum().backward()
    for layer in range(layers):
        g_hh = getattr(model.rnn, f"weight_hh_l{layer}").grad
        g_ih = getattr(model.rnn, f"weight_ih_l{layer}").grad
        assert g_hh.shape == (4 * H, H)
        assert abs((g_hh == 0).float().mean().item() - p) < 0.05  # cut connections get no gradient
        assert (g_ih == 0).float().mean().item() < 0.05  # input weights are never dropped
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again, _ = model(x)
    assert not torch.allclose(logits, again)  # a new mask for each forward

    model.eval()
    plain.eval()
    torch.testing.assert_close(model(x)[0], plain(x)[0], rtol=0, atol=0)


# -- checkpoint ------------------------------------------------------------------------------


def _tiny_checkpoint(**kw):
    torch.manual_seed(0)
    vocab = Vocab.from_text("abcdefgh \n")
    cfg = TrainConfig(hidden_size=16, embed_size=8, num_layers=2, max_steps=1)
    model = CharLM(cfg.model_config(len(vocab)))
    opt = torch.optim.Adam(model.parameters())
    return (
        model,
        vocab,
        checkpoint.build(model, model.config, vocab, optimizer=opt, train_config=cfg.to_dict(), **kw),
    )


def test_save_load_gives_identical_logits(tmp_path):
    model, vocab, ck = _tiny_checkpoint(step=7, best_val_loss=1.5)
    path = checkpoint.save(ck, tmp_path / "m.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind
    loaded, v2, ck2 = checkpoint.load_model(path)
    assert v2 == vocab and ck2["step"] == 7 and ck2["best_val_loss"] == 1.5
    x = torch.randint(0, len(vocab), (2, 12))
    model.eval()
    assert torch.equal(loaded(x)[0], model(x)[0])
    # plain torch.load with weights_only works too: the file holds tensors and primitives only
    raw = torch.load(path, weights_only=True)
    assert raw["schema_version"] == checkpoint.SCHEMA_VERSION
    json.dumps(raw["model_config"]), json.dumps(raw["vocab"]), json.dumps(raw["train_config"])


def test_wrapper_prefixes_are_stripped():
    model, _, _ = _tiny_checkpoint()
    sd = {"module._orig_mod." + k: v for k, v in model.state_dict().items()}
    assert set(checkpoint.clean_state_dict(sd)) == set(model.state_dict())


def test_truncated_checkpoint_error_names_the_file(tmp_path):
    _, _, ck = _tiny_checkpoint()
    good = checkpoint.save(ck, tmp_path / "good.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r"bad\.pt: not a readable charlm checkpoint"):
        checkpoint.load(bad)
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")


def test_tampered_checkpoints_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    trace = tmp_path / "pwned"  # the payload creates this file if it is ever run

    class Boom:
        def __reduce__(self):
            return (open, (str(trace), "w"))

    class Shell:  # the usual attack: a command through os.system
        def __reduce__(self):
            return (os.system, (f"touch {trace}",))

    torch.save({"schema": checkpoint.SCHEMA, "x": Boom()}, evil)
    with pytest.raises(checkpoint.CheckpointError, match=r"evil\.pt: refused, .*objects other than tensors"):
        checkpoint.load(evil)
    torch.save({"schema": checkpoint.SCHEMA, "x": Shell()}, evil)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"evil\.pt: refused, not a charlm checkpoint: .*objects other than tensors .*would call posix\.system",
    ):
        checkpoint.load(evil)
    assert not trace.exists()  # refused before either payload ran, not after
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(checkpoint.CheckpointError, match=r"other\.pt: not a charlm checkpoint"):
        checkpoint.load(other)
    _, _, ck = _tiny_checkpoint()
    ck["state_dict"]["head.weight"] = torch.zeros(3, 3)
    shapes = tmp_path / "shapes.pt"
    checkpoint.save(ck, shapes)
    with pytest.raises(checkpoint.CheckpointError, match=r"shapes\.pt: weights do not match"):
        checkpoint.load_model(shapes)
    _, _, ck = _tiny_checkpoint()
    ck["train_state_dict"] = {k: v.clone() for k, v in ck["state_dict"].items()}
    ck["train_state_dict"]["head.bias"][0] = float("inf")
    with pytest.raises(
        checkpoint.CheckpointError, match=r"non-finite values in train_state_dict: head\.bias"
    ):
        checkpoint.validate(ck, "inf.pt")
    ck["train_state_dict"] = {k: v for k, v in ck["state_dict"].items() if k != "head.bias"}
    with pytest.raises(checkpoint.CheckpointError, match=r"train_state_dict does not match"):
        checkpoint.validate(ck, "part.pt")


# -- sampling defaults -------------------------------------------------------------------------


def test_sampling_params_validate_and_are_the_cli_and_generate_defaults():
    d = SamplingParams()
    assert SamplingParams.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    for bad in ({"length": 0}, {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    from charlm.cli import build_parser
    from charlm.generate import GenerateConfig

    g = GenerateConfig()
    assert g.sampling_params() == d.to_dict() and isinstance(g, SamplingParams)
    assert set(g.to_dict()) == {*d.to_dict(), "num_samples", "batch_size", "precision"}
    parser = build_parser()
    for argv in (["sample", "m"], ["generate", "m", "--prompts", "p"]):
        a = parser.parse_args(argv)
        assert {k: getattr(a, k) for k in d.to_dict()} == d.to_dict(), argv
    assert parser.parse_args(["pipeline", "c", "--name", "n"]).length == d.length


def test_core_imports_no_frameworks():
    code = (
        "import sys, charlm.model, charlm.train, charlm.sample, charlm.checkpoint, charlm.data, charlm.vocab;"
        "import charlm.capability; charlm.capability.report();"
        "bad=[m for m in ('ray','mlflow','prefect','fsspec','s3fs') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_train_config_carries_every_model_field() -> None:
    """TrainConfig's model fields are ModelConfig's by name: a field added to ModelConfig without
    one in TrainConfig (or a typo) fails here and in model_config(), not silently at train time."""
    import dataclasses

    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size"}
    assert model_fields <= {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(max_steps=1, hidden_size=96, num_layers=3, weight_drop=0.1, cell="gru")
    m = cfg.model_config(40)
    assert (m.vocab_size, m.hidden_size, m.num_layers, m.weight_drop, m.cell) == (40, 96, 3, 0.1, "gru")
    assert all(getattr(m, k) == getattr(cfg, k) for k in model_fields)
