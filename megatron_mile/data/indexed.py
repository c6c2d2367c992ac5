"""Writing megatron-core ``.bin/.idx`` pairs so that a killed run never leaves one that looks complete.

Files are written as ``PREFIX.bin.partial`` / ``PREFIX.idx.partial`` and renamed at the end, the
``.idx`` last: ``IndexedDataset.exists(PREFIX)`` is true only for a finished pair.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

PARTIAL = ".partial"


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits (megatron-core's own threshold), int32 otherwise."""
    return DType.optimal_dtype(vocab_size)


class AtomicDatasetWriter:
    """An ``IndexedDatasetBuilder`` on temporary paths, plus document and token counts."""

    def __init__(self, prefix: str, dtype: type) -> None:
        self.prefix = prefix
        self.documents = 0
        self.tokens = 0
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._builder = IndexedDatasetBuilder(prefix + ".bin" + PARTIAL, dtype=dtype)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents stored back to back in ``tokens``."""
        start = 0
        for length in lengths.tolist():
            self._builder.add_document(tokens[start : start + length], [length])
            start += length
        self.documents += len(lengths)
        self.tokens += start

    def add_dataset(self, prefix: str) -> None:
        """Append a whole finished dataset (megatron-core checks the dtypes match)."""
        dataset = IndexedDataset(prefix)
        self.documents += len(dataset.document_indices) - 1
        self.tokens += int(dataset.sequence_lengths.sum())
        del dataset
        self._builder.add_index(prefix)

    def finalize(self) -> None:
        self._builder.finalize(self.prefix + ".idx" + PARTIAL)
        os.replace(self.prefix + ".bin" + PARTIAL, self.prefix + ".bin")
        os.replace(self.prefix + ".idx" + PARTIAL, self.prefix + ".idx")

    def abort(self) -> None:
        self._builder.data_file.close()
        for suffix in (".bin", ".idx"):
            if os.path.exists(self.prefix + suffix + PARTIAL):
                os.remove(self.prefix + suffix + PARTIAL)


def remove_dataset(prefix: str) -> None:
    for suffix in (".bin", ".idx"):
        if os.path.exists(prefix + suffix):
            os.remove(prefix + suffix)


def merge_datasets(prefixes: Iterable[str], output_prefix: str) -> AtomicDatasetWriter:
    """Concatenate datasets in the given order into ``output_prefix`` (documents kept as they are)."""
    prefixes = list(prefixes)
    if not prefixes:
        raise ValueError("nothing to merge")
    dtypes = {}
    for prefix in prefixes:
        if not IndexedDataset.exists(prefix):
            raise ValueError(f"{prefix}: no such dataset (.bin/.idx pair)")
        dtypes[prefix] = IndexedDataset(prefix).index.dtype
    if len(set(dtypes.values())) > 1:
        detail = ", ".join(f"{p}: {np.dtype(d).name}" for p, d in dtypes.items())
        raise ValueError(f"cannot merge datasets with different token dtypes ({detail})")
    writer = AtomicDatasetWriter(output_prefix, dtypes[prefixes[0]])
    try:
        for prefix in prefixes:
            writer.add_dataset(prefix)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    return writer
