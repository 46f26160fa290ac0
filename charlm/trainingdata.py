"""Training data from any reference a user gives: the embedded default corpus, a local text file
or folder, or a dataset version in the store (id, id prefix, name or URL). Used by `charlm train`
and by the Ray workers' driver; it sits between the CLI and the storage/dataset adapters."""

from __future__ import annotations

import hashlib
from pathlib import Path


class TrainingDataError(ValueError):
    pass


def load_training_data(corpus: str, val_frac: float, test_frac: float, store: str | None = None):
    """(vocab, splits, fingerprint, label) for a builtin corpus, local file/folder or dataset."""
    import numpy as np

    from charlm.corpus import DEFAULT_CORPUS, default_corpus_text, read_local_corpus
    from charlm.data import split_ids
    from charlm.vocab import Vocab

    if corpus != DEFAULT_CORPUS and not Path(corpus).exists():
        try:
            from charlm.datasets import open_dataset
        except ImportError:  # storage extras not installed
            open_dataset = None
        ds = open_dataset(corpus, store) if open_dataset else None
        if ds is None:
            raise TrainingDataError(f"{corpus}: not a file, folder, dataset id or dataset URL")
        return ds.vocab, ds.splits, ds.fingerprint, f"dataset {ds.id}"
    text = default_corpus_text() if corpus == DEFAULT_CORPUS else read_local_corpus(corpus)
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text, where=corpus)
    h = hashlib.sha256(vocab.to_json().encode())
    h.update(np.ascontiguousarray(ids).tobytes())
    h.update(f"{val_frac}/{test_frac}".encode())
    return vocab, split_ids(ids, val_frac, test_frac), h.hexdigest(), corpus
