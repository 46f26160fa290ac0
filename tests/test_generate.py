"""Batch generation core: prompt parsing, record planning, determinism across shards."""

from __future__ import annotations

import json

import pytest
import torch

from charlm import capability
from charlm.config import ModelConfig
from charlm.generate import (
    GenerateConfig,
    PromptsError,
    generate_records,
    parse_prompts,
    plan,
    shard,
    to_jsonl,
)
from charlm.model import CharLM
from charlm.sample import Sampler
from charlm.vocab import Vocab

# every test here samples at bf16 and int8: scripts/test runs them once more capped at AVX2
pytestmark = pytest.mark.hardware


@pytest.fixture(scope="module", params=["bf16", "int8"])
def sampler(request):
    caps = capability.probe("cpu")
    if request.param not in caps.sample:
        pytest.skip(f"{request.param}: {caps.missing[request.param]}")
    vocab = Vocab.from_text("abcdefghijklmnopqrstuvwxyz .,\n")
    torch.manual_seed(0)
    model = CharLM(ModelConfig(len(vocab), "lstm", 2, 32, 8, 0.0))
    return Sampler(model, vocab, precision=request.param)


def test_generate_config_names_a_bad_precision():
    assert GenerateConfig(precision="int8").to_dict()["precision"] == "int8"
    with pytest.raises(ValueError, match=r"precision must be one of .*got 'fp16'"):
        GenerateConfig(precision="fp16")


def test_parse_text_and_jsonl_prompts():
    ps = parse_prompts(b"\xef\xbb\xbfhello\r\nline\\nbreak\n\nlast\n", "p.txt")
    assert [p.text for p in ps] == ["hello", "line\nbreak", "", "last"]
    js = parse_prompts(b'{"prompt": "a", "id": 7}\n"b"\n\n{"prompt": "c"}\n', "p.jsonl")
    assert [(p.index, p.text, p.id) for p in js] == [(0, "a", "7"), (1, "b", None), (2, "c", None)]
    with pytest.raises(PromptsError, match=r"p\.jsonl: line 2 is not JSON"):
        parse_prompts(b'"a"\n{oops\n', "p.jsonl")
    with pytest.raises(PromptsError, match=r"q\.jsonl: line 1 needs"):
        parse_prompts(b'{"text": "a"}\n', "q.jsonl")
    with pytest.raises(PromptsError, match=r"e\.txt: no prompts"):
        parse_prompts(b"", "e.txt")
    with pytest.raises(PromptsError, match=r"bad\.txt: invalid UTF-8 at byte offset 2"):
        parse_prompts(b"ab\xff", "bad.txt")


def test_records_identical_across_shards_and_batch_sizes(sampler):
    prompts = parse_prompts(b"the \nabc\na cat\n\nzz\n", "p.txt")
    records = plan(prompts, 3)
    assert [r.record for r in records] == list(range(15))
    cfg = GenerateConfig(num_samples=3, length=40, seed=9, batch_size=256)
    whole = generate_records(sampler, records, cfg, "m")
    for workers, bs in ((2, 4), (3, 1), (15, 256)):
        parts = [
            generate_records(sampler, part, cfg.replace(batch_size=bs), "m")
            for part in shard(records, workers)
        ]
        assert [r for p in parts for r in p] == whole
    assert len({r["sample"] for r in whole}) == 15  # every record its own stream
    assert all(len(r["sample"]) == 40 and r["error"] is None for r in whole)
    assert whole[4] | {"sample": None} == {
        "record": 4,
        "prompt_index": 1,
        "sample_index": 1,
        "prompt": "abc",
        "model": "m",
        "params": cfg.sampling_params(),
        "seed": 9,
        "stream": 4,
        "precision": sampler.precision,
        "sample": None,
        "error": None,
    }


def test_unknown_characters_are_reported_per_record(sampler):
    prompts = parse_prompts(b"ok\nBAD!\nfine\n", "p.txt")
    out = generate_records(sampler, plan(prompts, 2), GenerateConfig(num_samples=2, length=10), "m")
    bad = [r for r in out if r["error"]]
    assert [r["prompt_index"] for r in bad] == [1, 1]
    assert "U+0042" in bad[0]["error"] and "U+0021" in bad[0]["error"] and bad[0]["sample"] is None
    assert all(len(r["sample"]) == 10 for r in out if not r["error"])
    lines = to_jsonl(out).decode().splitlines()
    assert len(lines) == 6 and json.loads(lines[2])["prompt"] == "BAD!"


def test_job_publishes_parts_then_manifest_and_refuses_to_overwrite(tmp_path, sampler):
    from charlm import checkpoint, storage
    from charlm.genjob import JobError, read_job, read_records, run_job, summary_markdown

    ck = checkpoint.to_bytes(checkpoint.build(sampler.model, sampler.model.config, sampler.vocab))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the \nabc\nBAD\n")
    out = str(tmp_path / "job")
    cfg = GenerateConfig(num_samples=2, length=20, seed=3)
    seen = []
    m = run_job(ck, "tiny", str(prompts), out, cfg, workers=2, progress=lambda d, n: seen.append((d, n)))
    assert m["records"] == 6 and m["errors"] == 2 and [p["records"] for p in m["parts"]] == [3, 3]
    assert seen[-1] == (4, 6)  # progress counts generated streams (the 2 error records need none)
    recs = read_records(out)
    assert [r["record"] for r in recs] == list(range(6)) and read_job(out)["model"] == "tiny"
    auto = Sampler(sampler.model, sampler.vocab).precision  # what "auto" resolves to here
    assert m["precisions"] == [auto] and {r["precision"] for r in recs} == {auto}
    one = str(tmp_path / "job1")
    run_job(ck, "tiny", str(prompts), one, cfg, workers=1)
    assert read_records(one) == recs  # same records whatever the number of workers
    assert "| 0 | the  |" in summary_markdown(m, recs)
    with pytest.raises(JobError, match="already holds a finished generation job"):
        run_job(ck, "tiny", str(prompts), out, cfg)
    storage.delete(storage.join(out, "manifest.json"))
    assert read_job(out) is None  # parts without a manifest are not a job
