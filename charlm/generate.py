"""Batch generation, the framework-free part: prompts in, one record per prompt x sample out.

Determinism: record r (prompt i, sample j, r = i * num_samples + j) is generated as sampler
stream id r with the job's seed. The sampler's randomness is a pure function of (seed, stream
id, step), so a record's text is the same whatever the batch it lands in and whatever the number
of workers the job is split across.

A prompt with characters outside the model's vocabulary gives records with an `error` naming
them (and no sample), not a failed job.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from charlm.config import SAMPLE_PRECISIONS, SamplingParams
from charlm.sample import Sampler
from charlm.vocab import UnknownCharactersError


class PromptsError(ValueError):
    pass


@dataclass(frozen=True)
class GenerateConfig(SamplingParams):
    """A generation job: SamplingParams (length, temperature, top_k, top_p, seed, stop and their
    defaults) plus how many samples per prompt and how the job runs. Its dict is the flow's
    parameter and each record's `config`."""

    num_samples: int = 1
    batch_size: int = 256  # streams per forward step
    precision: str = "auto"  # charlm.sample.Sampler's: auto | fp32 | bf16 | int8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_samples < 1 or self.batch_size < 1:
            raise ValueError("num_samples and batch_size must be positive")
        if self.precision not in SAMPLE_PRECISIONS:
            raise ValueError(f"precision must be one of {SAMPLE_PRECISIONS}, got {self.precision!r}")


@dataclass(frozen=True)
class Prompt:
    index: int  # position in the prompts file
    text: str
    id: str | None = None  # optional caller id (JSONL "id")


def parse_prompts(data: bytes, name: str) -> list[Prompt]:
    """Prompts from a text file (one per line; '\\n' escapes a newline inside a prompt) or from JSONL
    (objects with "prompt" and optionally "id", or bare JSON strings). JSONL is recognised by
    the name ending in .jsonl/.ndjson."""
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise PromptsError(f"{name}: invalid UTF-8 at byte offset {e.start}") from None
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out: list[Prompt] = []
    if name.endswith((".jsonl", ".ndjson")):
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptsError(f"{name}: line {n} is not JSON: {e.msg}") from None
            if isinstance(obj, str):
                out.append(Prompt(len(out), obj))
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                pid = obj.get("id")
                out.append(Prompt(len(out), obj["prompt"], None if pid is None else str(pid)))
            else:
                raise PromptsError(f'{name}: line {n} needs a string or an object with a "prompt" string')
    else:
        out = [Prompt(i, line.replace("\\n", "\n")) for i, line in enumerate(lines)]
    if not out:
        raise PromptsError(f"{name}: no prompts")
    return out


@dataclass(frozen=True)
class Record:
    record: int  # global record index = sampler stream id
    prompt: Prompt
    sample: int


def plan(prompts: Sequence[Prompt], num_samples: int) -> list[Record]:
    return [Record(p.index * num_samples + j, p, j) for p in prompts for j in range(num_samples)]


def shard(records: Sequence[Record], workers: int) -> list[list[Record]]:
    """Contiguous, near-equal shards (the output keeps record order when shards are joined)."""
    workers = max(1, min(workers, len(records)))
    size, extra = divmod(len(records), workers)
    out, start = [], 0
    for w in range(workers):
        end = start + size + (1 if w < extra else 0)
        out.append(list(records[start:end]))
        start = end
    return out


def _batches(records: Sequence[Record], n: int) -> Iterator[Sequence[Record]]:
    for i in range(0, len(records), n):
        yield records[i : i + n]


def generate_records(
    sampler: Sampler,
    records: Sequence[Record],
    cfg: GenerateConfig,
    model_label: str,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict]:
    """Generate every record, cfg.batch_size streams at a time. Returns JSON-able dicts in order."""
    out: dict[int, dict] = {}
    params = cfg.sampling_params()
    ok: list[Record] = []
    unknown: dict[int, dict[str, int]] = {}  # per prompt, not per sample
    for r in records:
        base = {
            "record": r.record,
            "prompt_index": r.prompt.index,
            "sample_index": r.sample,
            "prompt": r.prompt.text,
        }
        if r.prompt.id is not None:
            base["id"] = r.prompt.id
        # precision: what cfg.precision ("auto") resolved to on this worker
        base |= {
            "model": model_label,
            "params": params,
            "seed": cfg.seed,
            "stream": r.record,
            "precision": sampler.precision,
        }
        if r.prompt.index not in unknown:
            unknown[r.prompt.index] = sampler.vocab.unknown(r.prompt.text)
        bad = unknown[r.prompt.index]
        if bad:
            msg = str(UnknownCharactersError(bad, f"prompt {r.prompt.index + 1}"))
            out[r.record] = {**base, "sample": None, "error": msg}
        else:
            out[r.record] = base
            ok.append(r)
    for batch in _batches(ok, cfg.batch_size):
        texts = sampler.generate(
            [r.prompt.text for r in batch],
            cfg.length,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            seed=cfg.seed,
            stop=cfg.stop,
            stream_ids=[r.record for r in batch],
        )
        for r, t in zip(batch, texts, strict=True):
            out[r.record]["sample"] = t
            out[r.record]["error"] = None
        if on_batch is not None:
            on_batch(len(batch))
    return [out[r.record] for r in records]


def to_jsonl(records: Sequence[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
