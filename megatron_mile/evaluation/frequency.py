"""Token frequencies of the training data, and the frequency buckets of the vocabulary.

**Which tokens count.** The training part of every training dataset of the blend, cut the way
megatron-core's ``GPTDataset`` cuts it: when validation shares the training prefixes, ``--split``
keeps sequences ``[round(b0·N), round(b1·N))`` of a dataset's ``N`` sequences (``b`` the split's
train bounds); with separate validation data the training prefixes are used whole.

**How domains combine.** The frequency of token ``t`` is the share of training tokens that are ``t``
under the training blend's sampling weights ``w_d``::

    f(t) = Σ_d w_d · c_d(t) / N_d        (c_d: counts in domain d's training part, N_d = Σ_t c_d(t))

which is what the trainer's ``BlendedDataset`` feeds the model (samples are drawn from domain ``d``
with probability ``w_d``). Raw occurrences, ``Σ_d c_d(t) / Σ_d N_d``, would instead let a large
domain that the blend down-weights decide the buckets. A Megatron-LM ``prefix ...`` list without
weights is blended by size, and then ``f`` is exactly the raw occurrence share.

**Buckets** (``--cutoffs c1,c2``). Let ``S(t) = Σ f(u)`` over the tokens ``u`` with ``f(u) > f(t)``
(the share of all strictly more frequent tokens)::

    high     S(t) < c1
    medium   c1 <= S(t) < c2
    low      S(t) >= c2 and f(t) > 0
    unseen   f(t) = 0

Tokens of equal frequency always share a bucket, so ``high`` is the smallest set of whole frequency
classes covering at least ``c1`` of the occurrences, ``high ∪ medium`` the smallest covering ``c2``.
``S`` is compared with a tolerance of 1e-9, so a class that ends exactly on a cutoff in exact
arithmetic closes its bucket whatever the float rounding of the sum.

**Counting** maps each ``.bin`` chunk by chunk (``CHUNK_TOKENS``) and adds ``numpy.bincount`` of
the chunk: no Python work per document, and memory holds one chunk and one count vector per
dataset whatever the data size. The work is cut into blocks (``BLOCK_TOKENS``) that can be shared
between the ranks of a job and between worker processes.

**Cache.** The counts of one dataset's training part are saved beside the data (or in a chosen
directory) as ``{dataset}.token-counts-{key}.npz``, where the key hashes the ``.bin``/``.idx`` sizes
and modification times, the sequence range (so a different ``--split`` misses) and the tokenizer's
vocabulary size and file digest (so a different tokenizer misses). Files are written to a
temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from megatron_mile.evaluation.progress import Progress

BUCKETS = ("high", "medium", "low", "unseen")
CHUNK_TOKENS = 1 << 22  # 8 MiB of uint16 tokens per bincount: fast and cache friendly
BLOCK_TOKENS = 1 << 24  # one unit of work shared out to ranks and processes, and of progress
CACHE_FORMAT = "megatron-mile-token-counts/1"
BOUNDARY_TOLERANCE = 1e-9


class FrequencyError(ValueError):
    """Data that cannot be counted as asked; the message is one line naming the file."""


# --------------------------------------------------------------------------- which tokens


@dataclass(frozen=True)
class Span:
    """Sequences ``[begin, end)`` of the dataset ``prefix``: tokens ``[first_token, end_token)`` of its ``.bin``."""

    prefix: str
    begin: int
    end: int
    dtype: np.dtype
    first_token: int
    end_token: int

    @property
    def tokens(self) -> int:
        return self.end_token - self.first_token


def split_bounds(split: str, part: int) -> Optional[tuple[float, float]]:
    """megatron-core's bounds of split ``part`` (0 train, 1 valid, 2 test) for a ``--split`` string;
    None for an empty part."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[part]


def dataset_span(prefix: str, bounds: tuple[float, float] = (0.0, 1.0)) -> Span:
    """The sequences of ``prefix`` that ``GPTDataset`` assigns to a split with these bounds."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    index = IndexedDataset(prefix).index
    sequences = len(index.sequence_lengths)
    # The rounding megatron-core's BlendedMegatronDatasetBuilder applies to cut a dataset into splits.
    begin, end = (int(round(bound * float(sequences))) for bound in bounds)
    itemsize = np.dtype(index.dtype).itemsize
    if end > begin:
        first = int(index.sequence_pointers[begin]) // itemsize
        last = int(index.sequence_pointers[end - 1]) // itemsize + int(index.sequence_lengths[end - 1])
    else:
        first = last = 0
    return Span(prefix, begin, end, np.dtype(index.dtype), first, last)


# --------------------------------------------------------------------------- counting


def count_range(path: str, dtype: np.dtype, first: int, end: int, vocab_size: int,
                chunk_tokens: int = CHUNK_TOKENS) -> np.ndarray:
    """Counts of tokens ``[first, end)`` of ``path``; ids ``>= vocab_size`` are summed into the last slot."""
    counts = np.zeros(vocab_size + 1, dtype=np.int64)
    for start in range(first, end, chunk_tokens):
        stop = min(end, start + chunk_tokens)
        # A fresh map per chunk keeps the resident pages to one chunk.
        chunk = np.memmap(path, dtype=dtype, mode="r", offset=start * dtype.itemsize, shape=(stop - start,))
        found = np.bincount(chunk, minlength=vocab_size)
        del chunk
        counts[:vocab_size] += found[:vocab_size]
        counts[vocab_size] += found[vocab_size:].sum()
    return counts


def _blocks(spans: Sequence[Span], block_tokens: int) -> list[tuple[int, int, int]]:
    """(span index, first token, end token) of every block, in a fixed order."""
    return [(i, start, min(span.end_token, start + block_tokens))
            for i, span in enumerate(spans) for start in range(span.first_token, span.end_token, block_tokens)]


def _run_jobs(jobs: list[tuple], workers: int) -> Iterator[np.ndarray]:
    """``count_range`` of every job, in order; at most ``2 * workers`` results wait in memory."""
    if workers <= 1:
        yield from (count_range(*job) for job in jobs)
        return
    # Spawned, not forked: the parent may hold process groups and threads of its own.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(count_range, *job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def count_tokens(spans: Sequence[Span], vocab_size: int, workers: int = 1, shard: tuple[int, int] = (0, 1),
                 log: Optional[Callable[[str], None]] = None, block_tokens: int = BLOCK_TOKENS,
                 chunk_tokens: int = CHUNK_TOKENS) -> np.ndarray:
    """Token counts ``[len(spans), vocab_size + 1]`` (int64), the last column counting ids ``>= vocab_size``.

    With ``shard=(rank, world)`` only every ``world``-th block (from ``rank``) is counted, so the
    ranks of a job can split the work and sum their results. ``workers > 1`` counts blocks in that
    many processes.
    """
    rank, world = shard
    mine = _blocks(spans, block_tokens)[rank::world]
    counts = np.zeros((len(spans), vocab_size + 1), dtype=np.int64)
    progress = Progress("counting", sum(end - first for _, first, end in mine), log or (lambda _: None))
    jobs = [(spans[i].prefix + ".bin", spans[i].dtype, first, end, vocab_size, chunk_tokens) for i, first, end in mine]
    for (i, first, end), found in zip(mine, _run_jobs(jobs, workers)):
        counts[i] += found
        progress.add(end - first)
    return counts


def check_in_vocabulary(span: Span, counts: np.ndarray, vocab_size: int) -> None:
    """One line when the data holds ids the tokenizer does not have (``counts[vocab_size]`` > 0)."""
    if counts[vocab_size]:
        raise FrequencyError(f"{span.prefix}.bin: {counts[vocab_size]:,} token ids >= the tokenizer's vocabulary "
                             f"size {vocab_size}; the data was tokenized with another tokenizer")


# --------------------------------------------------------------------------- cache


def file_digest(path: str) -> str:
    """sha256 of a tokenizer file (or of an HF tokenizer directory's tokenizer.json)."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(span: Span, vocab_size: int, tokenizer_digest: str) -> dict:
    stats = {suffix: os.stat(span.prefix + suffix) for suffix in (".bin", ".idx")}
    files = {suffix: [stat.st_size, stat.st_mtime_ns] for suffix, stat in stats.items()}
    return {"format": CACHE_FORMAT, "files": files, "sequences": [span.begin, span.end], "vocab_size": vocab_size,
            "tokenizer": tokenizer_digest}


def cache_path(span: Span, key: dict, cache_dir: Optional[str] = None) -> str:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    directory = cache_dir or os.path.dirname(os.path.abspath(span.prefix))
    return os.path.join(directory, f"{os.path.basename(span.prefix)}.token-counts-{name}.npz")


def load_cached_counts(path: str, key: dict) -> Optional[np.ndarray]:
    """The cached counts when ``path`` holds them under exactly ``key``; None otherwise."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as stored:
            if json.loads(str(stored["key"])) != key:
                return None
            return stored["counts"]
    except (OSError, ValueError, KeyError):  # a damaged cache file is recounted, not trusted
        return None


def save_counts(path: str, key: dict, counts: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial"
    with open(partial, "wb") as f:
        np.savez(f, counts=counts, key=json.dumps(key, sort_keys=True))
    os.replace(partial, path)


# --------------------------------------------------------------------------- frequencies and buckets


def blend_frequencies(counts: np.ndarray, weights: Optional[Sequence[float]]) -> np.ndarray:
    """``f(t) = Σ_d w_d c_d(t) / N_d`` (float64, sums to 1); ``weights=None``: raw occurrence share."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1)
    if weights is None:
        return counts.sum(axis=0) / totals.sum()
    weights = np.asarray(weights, dtype=np.float64)
    used = weights > 0
    return (weights[used, None] * counts[used] / totals[used, None]).sum(axis=0) / weights[used].sum()


def assign_buckets(frequencies: np.ndarray, cutoffs: Sequence[float]) -> np.ndarray:
    """Bucket index (into ``BUCKETS``) of every token id, by the rule in the module docstring."""
    c1, c2 = cutoffs
    order = np.argsort(-frequencies, kind="stable")
    ordered = frequencies[order]
    # Share strictly before each class: the cumulative sum up to the first token of its class.
    before = np.concatenate(([0.0], np.cumsum(ordered)[:-1]))
    class_start = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    strictly_more = np.maximum.accumulate(np.where(class_start, np.arange(len(ordered)), 0))
    share_before = before[strictly_more]
    bucket_sorted = np.where(share_before < c1 - BOUNDARY_TOLERANCE, 0,
                             np.where(share_before < c2 - BOUNDARY_TOLERANCE, 1, 2))
    bucket_sorted[ordered == 0] = BUCKETS.index("unseen")
    buckets = np.empty_like(bucket_sorted, dtype=np.int8)
    buckets[order] = bucket_sorted
    return buckets


def bucket_table(frequencies: np.ndarray, buckets: np.ndarray) -> dict[str, dict]:
    """``{bucket: {"ids": how many token ids, "share": their share of training occurrences}}``."""
    return {name: {"ids": int((buckets == b).sum()), "share": float(frequencies[buckets == b].sum())}
            for b, name in enumerate(BUCKETS)}
