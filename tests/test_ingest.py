"""Ingestion without a network: text policies against a whole-text reference, counting, dataset
ids, publishing, crash safety, flat memory, and reading datasets back (local and memory://)."""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tracemalloc
import unicodedata
from collections import Counter

import numpy as np
import pytest

from charlm import cli_datasets, datasets, ingest, storage
from charlm.data import split_ids
from charlm.ingest import (
    BinaryObjectError,
    CharCounter,
    EmptyCorpusError,
    IngestError,
    InvalidUTF8Error,
    Policies,
    SourceChangedError,
    TextStream,
)
from charlm.vocab import Vocab


def reference(raw: bytes, p: Policies) -> str:
    """The policies applied to a whole object at once (what streaming must reproduce)."""
    text = raw.decode("utf-8", "strict" if p.invalid == "strict" else "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    if p.newlines == "lf":
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if p.normalize:
        text = unicodedata.normalize(p.normalize, text)
    return text


def stream(raw: bytes, p: Policies, chunk: int, url: str = "mem://obj") -> tuple[str, TextStream, str]:
    """Feed raw in chunks; returns (text, stream, the concatenated non-ASCII strings)."""
    ts = TextStream(url, p)
    out, rest = [], []
    for i in range(0, len(raw), chunk):
        b, r, _ = ts.feed(raw[i : i + chunk])
        out.append(b)
        rest.append(r)
    b, r, _ = ts.finish()
    out.append(b)
    rest.append(r)
    return b"".join(out).decode("utf-8"), ts, "".join(rest)


TRICKY = (
    "\ufeffhéllo wörld\r\nline2\rline3\r\n\r"
    "emoji 😀🎉 e\u0301 a\u0308\u0323 o\u0323\u0302 한국어 \u1100\u1161\u11a8 ﬁ ½ ² Å "
    "\ufeff mid-BOM stays, CJK 中文, Oriya \u0b47\u0b3e, kana \u304b\u3099\r"
).encode()

ALL_POLICIES = [
    Policies(newlines=nl, normalize=form)
    for nl in ("lf", "keep")
    for form in (None, "NFC", "NFD", "NFKC", "NFKD")
]


@pytest.mark.parametrize("p", ALL_POLICIES, ids=lambda p: f"{p.newlines}-{p.normalize}")
def test_streaming_equals_whole_text(p: Policies) -> None:
    want = reference(TRICKY, p)
    for chunk in [*range(1, 18), 64, 1 << 20]:
        got, ts, rest = stream(TRICKY, p, chunk)
        assert got == want, f"chunk size {chunk}"
        assert rest == "".join(c for c in want if ord(c) >= 128)
    assert ts.bom == 1
    if p.newlines == "lf":
        assert (ts.crlf, ts.cr) == (2, 3)  # line2\r, \r\n\r -> one lone CR, trailing \r
    else:
        assert "\r" in got


def test_streaming_random_texts_and_chunks() -> None:
    rng = random.Random(7)
    alphabet = [
        "a",
        "Z",
        " ",
        "\n",
        "\r",
        "\r\n",
        "é",
        "e\u0301",
        "\u0323",
        "\u0308",
        "😀",
        "中",
        "\u1161",
        "\ufeff",
        "ﬁ",
    ]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        raw = text.encode()
        p = rng.choice(ALL_POLICIES)
        got, _, _ = stream(raw, p, rng.randint(1, 9))
        assert got == reference(raw, p), (text, p)


def test_counting_matches_counter() -> None:
    p = Policies()
    text = reference(TRICKY, p) * 50 + "x" * 100_001  # > 64 KiB: the byte-pair path
    raw = text.encode()
    c = CharCounter()
    n = 0
    ts = TextStream("u", p)
    for i in range(0, len(raw), 7777):
        n += c.add(*ts.feed(raw[i : i + 7777]))
    n += c.add(*ts.finish())
    assert n == len(text)
    assert {chr(k): v for k, v in c.to_dict().items()} == dict(Counter(text))


@pytest.mark.parametrize(
    ("raw", "offset"),
    [
        (b"abc\xffdef", 3),
        (b"a\xe2\x28\xa1", 1),  # bad continuation
        (b"ok \xc0\xaf", 3),  # overlong
        (b"ab\xe2\x82", 2),  # truncated at the end of the object
        (b"\xed\xa0\x80x", 0),  # surrogate
        ("😀😀".encode() + b"\xf0\x9f\x98" + b"z", 8),  # truncated 4-byte sequence before ASCII
    ],
)
def test_invalid_utf8_strict_names_object_and_offset(raw: bytes, offset: int) -> None:
    for chunk in (1, 2, 3, 5, 100):
        with pytest.raises(
            InvalidUTF8Error, match=rf"^mem://obj: invalid UTF-8 at byte offset {offset} "
        ) as e:
            stream(raw, Policies(), chunk)
        assert e.value.offset == offset


def test_invalid_utf8_replace_counts() -> None:
    raw = b"ok\xff\xfe-\xe2\x82-end\xf0\x9f\x98" + "\ufffd legit".encode()
    want = raw.decode("utf-8", "replace")
    for chunk in (1, 2, 3, 4, 64):
        got, ts, _ = stream(raw, Policies(invalid="replace"), chunk)
        assert got == want
        assert ts.replaced == want.count("\ufffd") - 1  # the legitimate U+FFFD is not counted
        assert ts.first_replaced == 2


def test_binary_objects_rejected() -> None:
    with pytest.raises(
        BinaryObjectError, match=r"^mem://obj: binary-looking object \(NUL byte at offset 5\)"
    ):
        stream(b"hello\x00world", Policies(invalid="replace"), 3)
    with pytest.raises(BinaryObjectError, match=r"NUL byte at offset 70000"):
        stream(b"a" * 70000 + b"\x00", Policies(), 4096)
    with pytest.raises(BinaryObjectError, match="control bytes"):
        stream(bytes(range(1, 9)) * 100, Policies(invalid="replace"), 64)
    with pytest.raises(BinaryObjectError, match="UTF-16"):
        stream("hello".encode("utf-16"), Policies(), 64)
    text, _, _ = stream(b"bell\x07 and \x1b[1mbold\x1b[0m\x0c", Policies(), 5)  # a few controls are text
    assert text == "bell\x07 and \x1b[1mbold\x1b[0m\x0c"


def test_boundary_rule_is_sound() -> None:
    # the fast path assumes nothing below U+0300 ever composes with what precedes it
    assert min(ingest.text._composes_backward()) >= "\u0300"
    for c in "aZ \n中한\u0b47":
        assert ingest.text._boundary_before(c, "NFC")
    for c in "\u0301\u0b3e\u3099\u1161":
        assert not ingest.text._boundary_before(c, "NFC")


# -- ingest end to end (local folders) ---------------------------------------------------------------
def write_files(root, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        p = os.path.join(root, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    return str(root)


CORPUS = {
    "b.txt": "\ufeffSecond object.\r\nWith CRLF.\r\n".encode(),
    "a.txt": "First object: naïve café — 😀\n".encode() * 20,
    "c/d.txt": b"Third, lone CR\rend",
    "empty.txt": b"",
    "bom-only.txt": b"\xef\xbb\xbf",
}


def expected_text(files: dict[str, bytes], p: Policies | None = None) -> str:
    return "".join(reference(files[k], p or Policies()) for k in sorted(files))


def test_ingest_local_dataset(tmp_path, tmp_store) -> None:
    src = write_files(tmp_path / "corpus", CORPUS)
    r = ingest.ingest([src], tmp_store, name="tiny")
    text = expected_text(CORPUS)
    assert not r["reused"] and r["chars"] == len(text) and r["objects"] == 5
    assert r["counts"]["objects_skipped_empty"] == 2 and len(r["warnings"]) == 2
    assert (
        r["counts"]["bom_stripped"] == 2 and r["counts"]["crlf_to_lf"] == 2 and r["counts"]["cr_to_lf"] == 1
    )

    ds = datasets.open_dataset(r["id"], tmp_store)
    assert ds is not None and ds.id == r["id"] == ds.fingerprint and ds.name == "tiny"
    assert dict(zip(ds.vocab.chars, ds.vocab.counts, strict=True)) == dict(Counter(text))
    want = split_ids(ds.vocab.encode(text))  # the core's split arithmetic
    for k in ("train", "val", "test"):
        assert ds.splits[k].dtype == ds.vocab.dtype
        np.testing.assert_array_equal(ds.splits[k], want[k])
    assert isinstance(ds.splits["train"], np.memmap)  # local store: memory-mapped
    m = ds.manifest
    assert [os.path.relpath(o["url"], src) for o in m["sources"]["objects"]] == [
        "a.txt",
        "b.txt",
        "bom-only.txt",
        "c/d.txt",
        "empty.txt",
    ]
    assert m["sources"]["requested"] == [src] and m["policies"]["newlines"] == "lf"
    assert all(o["version"] for o in m["sources"]["objects"])
    assert {k: v["n"] for k, v in m["splits"].items()} == {k: len(v) for k, v in want.items()}
    assert m["charlm_version"] and m["created"].endswith("Z")
    md = ingest.dataset_summary(ds.url)
    assert "vocab " + str(len(ds.vocab)) in md and "a.txt" in md and "'\\n' (U+000A)" in md


def test_ingest_ids(tmp_path, tmp_store, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_files(tmp_path / "corpus", CORPUS)
    first = ingest.ingest(src, tmp_store)
    # same corpus, other read-chunk sizes and small-object handling: same id, no rewrite
    monkeypatch.setattr(ingest.text, "SMALL_OBJECT", 0)

    def no_writes(*a, **k):
        raise AssertionError("re-ingesting an unchanged corpus must not write")

    with monkeypatch.context() as m:
        m.setattr(storage, "atomic_writer", no_writes)
        again = ingest.ingest(src, tmp_store, chunk_size=3)
    assert again["id"] == first["id"] and again["reused"]
    # any policy change: new id
    ids = {first["id"]}
    for p in (
        Policies(newlines="keep"),
        Policies(invalid="replace"),
        Policies(normalize="NFC"),
        Policies(val_frac=0.1),
    ):
        ids.add(ingest.ingest(src, tmp_store, p)["id"])
    assert len(ids) == 5
    # changed object: new id; an added empty object changes nothing
    write_files(src, {"a.txt": CORPUS["a.txt"] + b"!"})
    changed = ingest.ingest(src, tmp_store)
    assert changed["id"] not in ids and not changed["reused"]
    write_files(src, {"zz-empty.txt": b""})
    assert ingest.ingest(src, tmp_store)["id"] == changed["id"]
    assert len(datasets.list_datasets(tmp_store)) == 6


def test_empty_corpus_is_an_error(tmp_path, tmp_store) -> None:
    src = write_files(tmp_path / "corpus", {"a.txt": b"", "b.txt": b"\xef\xbb\xbf"})
    with pytest.raises(EmptyCorpusError, match="corpus is empty: 2 objects"):
        ingest.ingest(src, tmp_store)
    with pytest.raises(storage.ObjectNotFoundError, match="no such object"):
        ingest.ingest(str(tmp_path / "nope"), tmp_store)


def test_policy_errors_name_the_object(tmp_path, tmp_store) -> None:
    src = write_files(
        tmp_path / "corpus",
        {"good.txt": b"fine\n", "bad.txt": b"ab\xffcd", "bin.dat": b"\x89PNG\r\n\x1a\n\x00\x00"},
    )
    with pytest.raises(InvalidUTF8Error, match=rf"^{src}/bad.txt: invalid UTF-8 at byte offset 2 "):
        ingest.ingest(src + "/*.txt", tmp_store)
    with pytest.raises(
        BinaryObjectError, match=rf"^{src}/bin.dat: binary-looking object \(NUL byte at offset 8\)"
    ):
        ingest.ingest(src + "/bin.dat", tmp_store)
    r = ingest.ingest(src + "/*.txt", tmp_store, Policies(invalid="replace"))
    assert r["counts"]["invalid_replaced"] == 1
    assert "\ufffd" in datasets.open_dataset(r["id"], tmp_store).vocab.chars


def test_crash_mid_publish_leaves_no_dataset(tmp_path, tmp_store, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_files(tmp_path / "corpus", CORPUS)
    p = Policies()
    scans = ingest.scan_objects(ingest.list_sources([src]), p)
    did = ingest.dataset_id(p, scans)
    real = ingest.encode_object
    calls = []

    def crash_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(ingest.encode, "encode_object", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        ingest.publish(scans, p, tmp_store)
    folder = storage.join(tmp_store, "datasets", did)
    assert storage.exists(storage.join(folder, "vocab.json"))  # written before the crash ...
    assert not storage.exists(storage.join(folder, "manifest.json"))  # ... but never published
    names = os.listdir(folder)
    assert "val.npy" not in names and not [n for n in names if ".tmp-" in n]  # split in progress discarded
    assert datasets.list_datasets(tmp_store) == []
    with pytest.raises(datasets.DatasetNotFoundError):
        datasets.open_dataset(did, tmp_store)
    with pytest.raises(datasets.DatasetNotFoundError, match="without manifest"):
        datasets.open_dataset(folder, tmp_store)
    monkeypatch.setattr(ingest.encode, "encode_object", real)
    r = ingest.publish(scans, p, tmp_store)  # a later run completes it
    assert r["id"] == did and datasets.open_dataset(did, tmp_store) is not None


def test_source_changed_between_passes(tmp_path, tmp_store) -> None:
    src = write_files(tmp_path / "corpus", {"a.txt": b"abcdef\n" * 10})
    p = Policies()
    scans = ingest.scan_objects(ingest.list_sources([src]), p)
    write_files(src, {"a.txt": b"abcdeX\n" * 10})  # same size
    with pytest.raises(SourceChangedError, match=r"a\.txt: object changed between scan and encode"):
        ingest.publish(scans, p, tmp_store)
    write_files(src, {"a.txt": b"abc\n"})  # other size
    with pytest.raises(SourceChangedError, match="listed 70 bytes, read 4"):
        ingest.publish(scans, p, tmp_store)
    assert datasets.list_datasets(tmp_store) == []


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_memory_does_not_grow_with_corpus(tmp_path) -> None:
    line = "Some prose, naïve café — 😀 and more words to fill a line.\r\n".encode()
    peaks = {}
    p = Policies()
    for mb in (4, 32):
        src = write_files(tmp_path / f"c{mb}", {"big.txt": line * (mb * (1 << 20) // len(line))})
        objs = ingest.list_sources([src])
        store = str(tmp_path / f"s{mb}")
        scans: list[dict] = []

        def scan(objs=objs, scans=scans) -> None:
            scans.extend(ingest.scan_objects(objs, p, 1 << 20))

        def publish(scans=scans, store=store) -> None:
            ingest.publish(scans, p, store, chunk_size=1 << 20)

        scan_peak, pub_peak = _peak(scan), _peak(publish)
        peaks[mb] = (scan_peak, pub_peak)
    for i in range(2):  # 8x the corpus, (about) the same peak: a few read chunks, never the corpus
        assert peaks[32][i] < peaks[4][i] + (2 << 20), peaks
        assert peaks[32][i] < 24 << 20, peaks


# -- datasets ---------------------------------------------------------------------------------------------
def test_open_dataset_references(tmp_path, tmp_store, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_files(tmp_path / "corpus", {"a.txt": b"hello world\n" * 10})
    r = ingest.ingest(src, tmp_store, name="hello")
    did = r["id"]
    for ref in (did, did[:6], r["url"], r["url"] + "/", "hello"):
        ds = datasets.open_dataset(ref, tmp_store)
        assert ds is not None and ds.id == did, ref
    assert datasets.open_dataset(src + "/a.txt", tmp_store) is None  # a raw corpus
    assert datasets.open_dataset(src, tmp_store) is None
    assert datasets.open_dataset("no-such-name", tmp_store) is None
    with pytest.raises(datasets.DatasetNotFoundError, match="no dataset 'abcdef0'"):
        datasets.open_dataset("abcdef0", tmp_store)
    monkeypatch.setenv("CHARLM_STORE", tmp_store)
    assert datasets.open_dataset(did[:10]).id == did  # store from the environment

    # a second dataset sharing the first hex digit: a 1-digit prefix is too short, full ids work
    other = ingest.ingest(src, tmp_store, Policies(newlines="keep"))
    assert datasets.open_dataset(other["id"], tmp_store).id == other["id"]
    assert datasets.open_dataset(did[:5], tmp_store) is None  # shorter than 6: not an id reference
    shows = datasets.show(did[:8], tmp_store)
    assert shows["id"] == did and shows["url"] == r["url"]
    assert [d["id"] for d in datasets.list_datasets(tmp_store)] == sorted(
        [did, other["id"]], key=lambda i: (datasets.show(i, tmp_store)["created"], i)
    )


def test_ambiguous_prefix(tmp_store) -> None:
    root = storage.join(tmp_store, "datasets")
    for did in ("abcdef01" + "0" * 56, "abcdef02" + "0" * 56):
        storage.write_text_atomic(storage.join(root, did, "manifest.json"), "{}")
    with pytest.raises(datasets.DatasetError, match="ambiguous"):
        datasets.open_dataset("abcdef", tmp_store)


def test_broken_datasets_are_clear_errors(tmp_path, tmp_store) -> None:
    src = write_files(tmp_path / "corpus", {"a.txt": b"hello world\n" * 10})
    r = ingest.ingest(src, tmp_store)
    folder = r["url"]
    os.remove(os.path.join(folder, "val.npy"))
    with pytest.raises(datasets.DatasetError, match=r"val\.npy: split file missing"):
        datasets.open_dataset(r["id"], tmp_store)
    np.save(os.path.join(folder, "val.npy"), np.zeros(3, dtype=np.uint16))
    with pytest.raises(datasets.DatasetError, match=r"val\.npy: expected"):
        datasets.open_dataset(r["id"], tmp_store)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        f.write('{"format": "other/9"}')
    with pytest.raises(datasets.DatasetError, match="unsupported dataset format"):
        datasets.open_dataset(folder, tmp_store)


def test_memory_store_round_trip(tmp_path) -> None:
    src = write_files(tmp_path / "corpus", CORPUS)
    store = "memory://charlm-store-test"
    r = ingest.ingest(src, store)
    ds = datasets.open_dataset(r["id"][:12], store)
    assert ds is not None and not isinstance(ds.splits["train"], np.memmap)
    text = expected_text(CORPUS)
    assert ds.vocab.decode(np.concatenate([ds.splits[k] for k in ("train", "val", "test")])) == text
    assert isinstance(ds.vocab, Vocab)
    # a corpus in memory:// too, streamed through fsspec's file objects
    for name, data in CORPUS.items():
        storage.write_bytes_atomic(storage.join("memory://charlm-corpus-test", name), data)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ingest.text, "SMALL_OBJECT", 0)
        again = ingest.ingest("memory://charlm-corpus-test", store, chunk_size=5)
    assert again["id"] == r["id"] and again["reused"]
    storage.delete(store, recursive=True)
    storage.delete("memory://charlm-corpus-test", recursive=True)


def test_cli_arguments() -> None:
    p = argparse.ArgumentParser(prog="charlm")
    cli_datasets.add_commands(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(["ingest", "s3://b/c/", "s3://b/d/*.txt", "--invalid", "replace", "--normalize", "NFC"])
    assert a.sources == ["s3://b/c/", "s3://b/d/*.txt"] and a.store is None and not a.json
    assert (a.invalid, a.normalize, a.newlines, a.val_frac) == ("replace", "NFC", "lf", 0.05)
    with pytest.raises(SystemExit):
        p.parse_args(["ingest", "x", "--newlines", "crlf"])
    with pytest.raises(SystemExit):
        p.parse_args(["datasets"])


@pytest.mark.parametrize("n_wide", [3, 64, 65, 200, 300], ids=lambda n: f"{n}-nonascii")
def test_encoder_paths_agree_with_vocab(n_wide: int) -> None:
    # <= 64 non-ASCII characters: code bytes; up to 255 in all: marker bytes; more: code units
    rng = random.Random(n_wide)
    wide = [chr(c) for c in range(0xC0, 0xC0 + n_wide // 2)] + [
        chr(c) for c in range(0x1F600, 0x1F600 + n_wide - n_wide // 2)
    ]
    alphabet = [*"abc \n", *wide]
    text = "".join(rng.choice(alphabet) for _ in range(5000))
    vocab = Vocab.from_text(text)
    enc = ingest.encode._Encoder(vocab)
    assert enc.bytewise == (len(vocab) <= 255) and (not enc.bytewise or enc.coded == (n_wide <= 64))
    raw = ("\ufeff" + text.replace("\n", "\r\n")).encode()
    for check in (True, False):  # validated pieces (first pass) or not (second pass)
        ts = TextStream("u", Policies(), check=check)
        ids = [enc.encode(*ts.feed(raw[i : i + 777])) for i in range(0, len(raw), 777)]
        ids.append(enc.encode(*ts.finish()))
        np.testing.assert_array_equal(np.concatenate(ids), vocab.encode(text))
    if enc.bytewise:  # unvalidated garbage gives some ids, not a crash (the digest check rejects it)
        junk = b"\xff\xc3" + "😀".encode()[:3] + b"a\xe2"
        assert len(enc.encode(*TextStream("u", Policies(), check=False).feed(junk, final=True))) > 0
    if enc.bytewise:  # leads that do not match the text (the digest check catches the rest)
        with pytest.raises(SourceChangedError):
            enc.encode("x😀".encode(), "😀", np.array([0, 1]))


def test_ingestion_does_not_import_torch() -> None:
    # worker processes import charlm.ingest (and through it charlm.data for the split sizes)
    code = "import sys, charlm.ingest, charlm.datasets; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_workers_run_registered_functions_only() -> None:
    assert set(ingest.pool._WORKER_FUNCTIONS) == {"_scan_sequential", "_encode_group"}
    with pytest.raises(ValueError, match="not an ingest worker function"):
        ingest.pool._run_groups(print, [("x",)], 2)  # refused before any worker starts
    workers = ingest.pool._WorkerPool(1)
    try:
        with pytest.raises(IngestError, match="'print' is not an ingest worker function"):
            workers.call(0, "print", ("x",))
        assert not workers.broken  # the worker answered and goes on serving
    finally:
        workers.close()


@pytest.mark.slow
def test_worker_processes_give_the_same_dataset(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"p{i}.txt": (f"object {i}: naïve café — 😀\r\n" * (200 + 37 * i)).encode() for i in range(7)}
    files["empty.txt"] = b""
    src = write_files(tmp_path / "corpus", files)
    one = ingest.ingest(src, str(tmp_path / "s1"))
    monkeypatch.setattr(ingest.pool, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setenv("CHARLM_INGEST_PROCESSES", "2")
    assert ingest.pool._parallelism(1, 2) == 2
    two = ingest.ingest(src, str(tmp_path / "s2"), chunk_size=1000)
    assert two["id"] == one["id"] and two["counts"] == one["counts"]
    a, b = (
        datasets.open_dataset(one["id"], str(tmp_path / "s1")),
        datasets.open_dataset(two["id"], str(tmp_path / "s2")),
    )
    for k in ("train", "val", "test"):
        np.testing.assert_array_equal(a.splits[k], b.splits[k])
    assert a.vocab == b.vocab
    # errors from workers arrive whole, and nothing is published
    write_files(src, {"p3.txt": b"bad \xff byte\n" * 300})
    with pytest.raises(InvalidUTF8Error, match=r"p3\.txt: invalid UTF-8 at byte offset 4 "):
        ingest.ingest(src, str(tmp_path / "s3"))
    write_files(src, {"p3.txt": files["p3.txt"]})
    p = Policies()
    scans = ingest.scan_objects(ingest.list_sources([src]), p, 1000)
    write_files(src, {"p5.txt": files["p5.txt"].replace(b"object", b"OBJECT")})
    with pytest.raises(SourceChangedError, match=r"p5\.txt: object changed"):
        ingest.publish(scans, p, str(tmp_path / "s4"))
    folder = tmp_path / "s4" / "datasets" / ingest.dataset_id(p, scans)
    assert sorted(os.listdir(folder)) == ["vocab.json"]  # no manifest, no split, no temp file
