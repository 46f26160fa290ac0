"""Corpus ingestion: stream objects from any storage URL into a versioned, encoded dataset.

Two streaming passes, memory independent of corpus size (a few read chunks at a time):

1. scan (per object, independent, cacheable): decode UTF-8 incrementally, apply the text
   policies, count characters, sha256 the normalized text;
2. publish (sequential): build the vocabulary from the merged counts, re-stream every object
   through the same decoder, encode to ids, write ``train|val|test.npy``, ``vocab.json`` and
   finally ``manifest.json``.

Text policies (docs/ingest.md has the full statement):

- encoding: UTF-8 only. ``invalid="strict"`` (default) stops at the first invalid byte with an
  error naming the object and byte offset; ``"replace"`` substitutes U+FFFD for each maximal
  invalid subsequence (Python's ``errors="replace"`` semantics) and reports how many.
- BOM: a UTF-8 byte-order mark (U+FEFF) at the start of every object is removed; U+FEFF anywhere
  else is kept (it is a zero-width no-break space there).
- newlines: ``"lf"`` (default) turns CRLF and lone CR into LF (a CR at the end of a read chunk is
  held back until the next chunk shows whether an LF follows); ``"keep"`` leaves them as they are.
- binary: an object holding a NUL byte anywhere, or whose first 8 KiB are more than 10% control
  bytes other than TAB, LF, VT, FF, CR and ESC, is binary-looking: an error names it. Isolated
  control characters in a text object are kept as characters.
- empty: objects with no characters after the policies (zero bytes, or only a BOM) are skipped with
  a warning; a corpus with no characters at all is an error.
- normalization (optional, ``NFC|NFD|NFKC|NFKD``): applied per object after the newline policy.
  Streaming keeps the text after the last *normalization boundary* of each chunk (a character
  with canonical combining class 0 that cannot combine with what precedes it) for the next chunk,
  so the result equals normalizing the whole object at once. A run of more than 4 Mi characters
  with no such boundary (not real text) is normalized in pieces.

Objects are processed independently (policies apply per object, a CR at the end of one object is
a newline of its own) and joined as-is, in listing order, with nothing inserted between them.
The dataset id is sha256 over the format tag, the policies (including split fractions) and the
sequence of per-object sha256 digests of the normalized text (empty objects contribute nothing),
so the same text under the same policies always gets the same id, and any change of a character,
of object order or of a policy gives a new id. Names, ETags and mtimes are not part of it.

The package does not import Prefect; flows/ingest.py wires these functions into tasks. One module
per concern:

- errors.py: IngestError and its kinds;
- format.py: the published format (FORMAT, SPLITS, read_manifest), which the reader
  (charlm.datasets) shares; it imports nothing of the writer's (split sizes: charlm.data);
- text.py: Policies, UTF-8 decoding under the policies (TextStream), reading objects' bytes;
- pool.py: the helper thread (_Ordered) and the worker processes, which run only the functions
  registered with @worker_function;
- scan.py: pass 1 (scan_objects, CharCounter), the vocabulary and the dataset id;
- encode.py: pass 2 (encode_object, the split files, in place over workers);
- publishing.py: publish(), ingest(), the manifest and the dataset summary.

This module re-exports the names callers use. The tunables read at run time (text.SMALL_OBJECT,
pool.PARALLEL_MIN_BYTES, ...) are only in their module: set them there.
"""

from __future__ import annotations

from charlm.ingest import encode, errors, format, pool, publishing, scan, text
from charlm.ingest.encode import encode_object, npy_header
from charlm.ingest.errors import (
    BinaryObjectError,
    EmptyCorpusError,
    IngestError,
    InvalidUTF8Error,
    SourceChangedError,
)
from charlm.ingest.format import FORMAT, SPLITS, read_manifest
from charlm.ingest.pool import processes, tune_malloc
from charlm.ingest.publishing import dataset_summary, ingest, publish, result_of, summary_markdown
from charlm.ingest.scan import (
    SCAN_VERSION,
    CharCounter,
    batch_objects,
    build_vocab,
    check_scans,
    dataset_id,
    list_sources,
    merge_counts,
    scan_object,
    scan_objects,
)
from charlm.ingest.text import (
    CHUNK_SIZE,
    INVALID,
    NEWLINES,
    NORMAL_FORMS,
    Piece,
    Policies,
    TextStream,
    iter_text,
    iter_utf8,
    nonascii_if_valid,
    split_incomplete,
)

__all__ = [
    "CHUNK_SIZE",
    "FORMAT",
    "INVALID",
    "NEWLINES",
    "NORMAL_FORMS",
    "SCAN_VERSION",
    "SPLITS",
    "BinaryObjectError",
    "CharCounter",
    "EmptyCorpusError",
    "IngestError",
    "InvalidUTF8Error",
    "Piece",
    "Policies",
    "SourceChangedError",
    "TextStream",
    "batch_objects",
    "build_vocab",
    "check_scans",
    "dataset_id",
    "dataset_summary",
    "encode",
    "encode_object",
    "errors",
    "format",
    "ingest",
    "iter_text",
    "iter_utf8",
    "list_sources",
    "merge_counts",
    "nonascii_if_valid",
    "npy_header",
    "pool",
    "processes",
    "publish",
    "publishing",
    "read_manifest",
    "result_of",
    "scan",
    "scan_object",
    "scan_objects",
    "split_incomplete",
    "summary_markdown",
    "text",
    "tune_malloc",
]
