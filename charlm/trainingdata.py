"""Training data for a resolved corpus reference (charlm.refs): the embedded default corpus, a
local text file or folder, or a published dataset in the store. Used by `charlm train` and by
the Ray driver; it sits between the CLI and the storage/dataset adapters."""

from __future__ import annotations

import hashlib
from typing import Any

from charlm.refs import DataRef, DatasetRef


def load_training_data(
    corpus: str | DataRef, val_frac: float, test_frac: float, store: str | None = None
) -> tuple[Any, dict[str, Any], str, str]:
    """(vocab, splits, fingerprint, label). A string is resolved here (charlm.refs.resolve_data);
    the CLI and the flows pass a reference they resolved once."""
    import numpy as np

    from charlm.corpus import default_corpus_text, read_local_corpus
    from charlm.data import split_ids
    from charlm.refs import resolve_data
    from charlm.vocab import Vocab

    ref = resolve_data(corpus, store)
    if isinstance(ref, DatasetRef):
        from charlm import datasets

        ds = datasets.load(ref.url, ref.manifest)
        return ds.vocab, ds.splits, ds.fingerprint, ref.label
    text = default_corpus_text() if ref.is_builtin else read_local_corpus(ref.path)
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text, where=ref.path)
    h = hashlib.sha256(vocab.to_json().encode())
    h.update(np.ascontiguousarray(ids).tobytes())
    h.update(f"{val_frac}/{test_frac}".encode())
    return vocab, split_ids(ids, val_frac, test_frac), h.hexdigest(), ref.label
