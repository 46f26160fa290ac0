"""charlm.scoring: what `charlm models compare` ranks versions by, without MLflow."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from charlm.config import ModelConfig
from charlm.model import CharLM
from charlm.scoring import map_ids, score_text
from charlm.train import LN2, evaluate
from charlm.vocab import Vocab

TEXT = "the cat sat on the mat; the dog sat on the log.\n" * 8


def _model(vocab: Vocab, seed: int = 0) -> CharLM:
    torch.manual_seed(seed)
    return CharLM(ModelConfig(len(vocab), "lstm", 1, 16, 8, 0.0)).eval()


def test_same_vocab_ids_pass_through():
    v = Vocab.from_text(TEXT)
    ids = v.encode(TEXT)
    mapped, dropped = map_ids(v, v, ids)
    assert mapped is ids and dropped == {}


def test_characters_the_model_lacks_are_dropped_and_counted():
    text_vocab = Vocab.from_text(TEXT)
    model_vocab = Vocab.from_text(TEXT.replace(";", "").replace(".", "") + "xyz")
    mapped, dropped = map_ids(text_vocab, model_vocab, text_vocab.encode(TEXT))
    assert dropped == {";": 8, ".": 8}
    assert model_vocab.decode(mapped) == TEXT.replace(";", "").replace(".", "")
    assert mapped.dtype == model_vocab.dtype


def test_score_is_the_fp32_stream_evaluation_of_the_encodable_text():
    text_vocab = Vocab.from_text(TEXT)
    model_vocab = Vocab.from_text(TEXT.replace(";", ""))
    model = _model(model_vocab)
    ids = text_vocab.encode(TEXT)
    sc = score_text(model, model_vocab, text_vocab, ids, batch_size=2, seq_len=16)
    loss, n = evaluate(model, model_vocab.encode(TEXT.replace(";", "")), 2, 16, precision="fp32")
    assert (sc.loss, sc.chars_scored) == (loss, n)
    assert sc.bpc == loss / LN2
    assert (sc.chars, sc.chars_skipped, sc.same_vocab) == (len(TEXT), 8, False)
    assert sc.coverage == (len(TEXT) - 8) / len(TEXT)
    assert sc.dropped == {";": 8}


def test_same_vocab_scores_every_character():
    v = Vocab.from_text(TEXT)
    sc = score_text(_model(v), v, v, v.encode(TEXT), batch_size=4, seq_len=8)
    assert sc.same_vocab and sc.chars_skipped == 0 and sc.coverage == 1.0 and sc.dropped == {}
    assert sc.loss is not None and np.isfinite(sc.loss) and sc.chars_scored > 0


def test_a_model_that_encodes_almost_none_of_the_text_is_not_scored():
    text_vocab = Vocab.from_text("abc\n")
    model_vocab = Vocab.from_text("xyz\n")  # of "abc\n" it encodes only the newline
    sc = score_text(_model(model_vocab), model_vocab, text_vocab, text_vocab.encode("abc\n"), 2, 16)
    assert (sc.loss, sc.bpc, sc.chars_scored) == (None, None, 0)
    assert (sc.chars, sc.chars_skipped, sc.dropped) == (4, 3, {"a": 1, "b": 1, "c": 1})


def test_scoring_imports_no_frameworks():
    code = (
        "import sys, charlm.scoring, charlm.errors;"
        "bad=[m for m in ('ray','mlflow','prefect','fsspec','s3fs') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
