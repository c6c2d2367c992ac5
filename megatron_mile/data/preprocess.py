"""JSONL(.zst/.gz) → megatron-core ``.bin/.idx`` datasets, optionally one per domain (Pile mode).

The main process streams blocks of lines, workers encode them (``documents.encode_block``), and
the main process writes the results strictly in input order, so the output bytes do not depend
on the worker count. ``partitions`` run contiguous groups of input files in parallel, then merge
the partial datasets in order: the same bytes again.
"""

from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from megatron_mile.data import documents
from megatron_mile.data.documents import EncodedBlock, EncodeSpec, encode_block
from megatron_mile.data.indexed import AtomicDatasetWriter, merge_datasets, remove_dataset, token_dtype
from megatron_mile.data.jsonl import Block, TruncatedInput, expand_inputs, read_blocks
from megatron_mile.data.tokenizer import build_tokenizer

MANIFEST_FORMAT = "megatron-mile-manifest/1"
MAX_LOCATIONS = 10


class PreprocessError(Exception):
    """A bad line under ``--on-error fail``, or bad arguments: one line for the user."""


@dataclass
class PreprocessConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer_model: str
    tokenizer_type: Optional[str] = None
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    split_by_domain: Optional[str] = None
    append_eod: bool = False
    workers: int = 1
    partitions: int = 1
    on_error: str = "skip"
    log_interval: int = 1000
    block_bytes: int = 1 << 20
    quiet: bool = False


@dataclass
class Stats:
    documents: int = 0
    tokens: int = 0
    nbytes: int = 0
    blank_lines: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    locations: list[str] = field(default_factory=list)  # the first few "file:line: detail"
    seconds: float = 0.0

    def add_error(self, path: str, line: int, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.locations) < MAX_LOCATIONS:
            self.locations.append(f"{path}:{line}: {detail}")

    def merge(self, other: "Stats") -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.nbytes += other.nbytes
        self.blank_lines += other.blank_lines
        self.skipped.update(other.skipped)
        self.locations = (self.locations + other.locations)[:MAX_LOCATIONS]

    def why_empty(self) -> str:
        """One line on why no document was kept."""
        if self.skipped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
            return f"every line was skipped ({reasons}), the first at {self.locations[0]}"
        return "the input holds only blank lines" if self.blank_lines else "the input is empty"

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        lines = [
            f"documents: {self.documents}",
            f"tokens: {self.tokens}",
            f"input: {self.nbytes / 1e6:.1f} MB decompressed",
            f"time: {self.seconds:.1f} s ({rate:,.0f} tokens/s)",
            f"skipped lines: {sum(self.skipped.values())}"
            + "".join(f"\n  {reason}: {n}" for reason, n in sorted(self.skipped.items())),
        ]
        if self.blank_lines:
            lines.append(f"blank lines ignored: {self.blank_lines}")
        if self.locations:
            lines.append("first skipped lines:" + "".join(f"\n  {loc}" for loc in self.locations))
        return "\n".join(lines)


def safe_domain_name(domain: str) -> str:
    """File-safe name: ``Gutenberg (PG-19)`` → ``Gutenberg_PG-19``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", domain).strip("_.")
    return name or "unnamed"


def output_prefix_for(output_prefix: str, key: str, domain: Optional[str]) -> str:
    if domain is None:
        return f"{output_prefix}_{key}_document"
    return f"{output_prefix}_{safe_domain_name(domain)}_{key}_document"


def manifest_path(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_manifest.json"


class Progress:
    """docs/s, MB/s, tokens/s on stderr: redrawn in place on a terminal, at most every 10 s otherwise."""

    def __init__(self, log_interval: int, quiet: bool, n_files: int) -> None:
        self.log_interval = max(1, log_interval)
        self.enabled = not quiet
        self.tty = sys.stderr.isatty()
        self.n_files = n_files
        self.start = time.monotonic()
        self._next_docs = self.log_interval
        self._last_print = 0.0

    def update(self, stats: Stats, file_index: int, force: bool = False) -> None:
        if not self.enabled or (stats.documents < self._next_docs and not force):
            return
        self._next_docs = stats.documents + self.log_interval
        now = time.monotonic()
        if not self.tty and not force and now - self._last_print < 10.0:
            return
        self._last_print = now
        elapsed = max(now - self.start, 1e-9)
        bar_width = 20
        filled = bar_width * file_index // max(self.n_files, 1)
        text = (
            f"[{'#' * filled}{'.' * (bar_width - filled)}] file {file_index}/{self.n_files} | "
            f"{stats.documents:,} docs ({stats.documents / elapsed:,.0f}/s) | "
            f"{stats.nbytes / elapsed / 1e6:,.1f} MB/s | {stats.tokens / elapsed:,.0f} tokens/s | "
            f"skipped {sum(stats.skipped.values())}"
        )
        sys.stderr.write(("\r" + text) if self.tty else (text + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


# Set in the parent before the worker pool forks, so the tokenizer is never pickled.
_SPEC: Optional[EncodeSpec] = None


def _encode(block: Block) -> EncodedBlock:
    return encode_block(block, _SPEC)


def _blocks(files: list[str], block_bytes: int) -> Iterator[tuple[int, object]]:
    """(file index, Block) in order; a truncated stream yields (file index, TruncatedInput) and moves on."""
    for index, path in enumerate(files):
        try:
            for block in read_blocks(path, block_bytes):
                yield index, block
        except TruncatedInput as exc:
            yield index, exc
        except OSError as exc:
            raise PreprocessError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _ordered_results(items: Iterator[tuple[int, object]], workers: int) -> Iterator[tuple[int, object]]:
    """Encode blocks on ``workers`` processes, yielding results in input order with bounded memory."""
    if workers <= 1:
        for index, item in items:
            yield index, (_encode(item) if isinstance(item, Block) else item)
        return
    in_flight: collections.deque = collections.deque()
    with mp.get_context("fork").Pool(workers) as pool:
        for index, item in items:
            if isinstance(item, Block):
                in_flight.append((index, pool.apply_async(_encode, (item,))))
            else:
                in_flight.append((index, item))
            while len(in_flight) > 2 * workers:
                index0, head = in_flight.popleft()
                yield index0, (head.get() if hasattr(head, "get") else head)
        while in_flight:
            index0, head = in_flight.popleft()
            yield index0, (head.get() if hasattr(head, "get") else head)


def _process_files(config: PreprocessConfig, files: list[str], output_prefix: str, workers: int,
                   show_progress: bool) -> tuple[Stats, dict[tuple[Optional[str], str], tuple[int, int]]]:
    """Preprocess ``files`` into datasets under ``output_prefix``; returns stats and per-output counts."""
    global _SPEC
    tokenizer = build_tokenizer(config.tokenizer_model, config.tokenizer_type)
    if config.append_eod and tokenizer.eod is None:
        raise PreprocessError(f"--append-eod: tokenizer {config.tokenizer_model} defines no end-of-document token")
    dtype = token_dtype(tokenizer.vocab_size)
    _SPEC = EncodeSpec(tokenizer, config.json_keys, dtype, config.append_eod, config.split_by_domain)
    stats = Stats()
    writers: dict[tuple[Optional[str], str], AtomicDatasetWriter] = {}
    safe_names: dict[str, str] = {}
    progress = Progress(config.log_interval, config.quiet or not show_progress, len(files))
    start = time.monotonic()

    def writer_for(domain: Optional[str], key: str) -> AtomicDatasetWriter:
        if (domain, key) not in writers:
            if domain is not None:
                other = safe_names.setdefault(safe_domain_name(domain), domain)
                if other != domain:
                    raise PreprocessError(f"domains {other!r} and {domain!r} map to the same file name")
            writers[(domain, key)] = AtomicDatasetWriter(output_prefix_for(output_prefix, key, domain), dtype)
        return writers[(domain, key)]

    try:
        if config.split_by_domain is None:  # plain mode always writes its datasets, even if empty
            for key in config.json_keys:
                writer_for(None, key)
        for index, result in _ordered_results(_blocks(files, config.block_bytes), workers):
            path = files[index]
            if isinstance(result, TruncatedInput):
                stats.add_error(path, result.line, documents.TRUNCATED, str(result))
                if config.on_error == "fail":
                    raise PreprocessError(f"{path}:{result.line}: {result}")
                continue
            if result.errors and config.on_error == "fail":
                line, _, detail = result.errors[0]
                raise PreprocessError(f"{path}:{line}: {detail}")
            for line, reason, detail in result.errors:
                stats.add_error(path, line, reason, detail)
            stats.nbytes += result.nbytes
            stats.blank_lines += result.blank_lines
            _write(result, config.json_keys, writer_for, stats)
            progress.update(stats, index + 1)
        for writer in writers.values():
            writer.finalize()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        progress.close()
    stats.seconds = time.monotonic() - start
    counts = {k: (w.documents, w.tokens) for k, w in writers.items()}
    return stats, counts


def _write(result: EncodedBlock, keys: list[str], writer_for, stats: Stats) -> None:
    """Route each document of the block to its (domain, key) dataset, keeping line order."""
    domains = result.domains
    stats.documents += len(domains)
    for k, key in enumerate(keys):
        tokens, lengths = result.tokens[k], result.lengths[k]
        stats.tokens += int(lengths.sum())
        if not domains:
            continue
        if all(d == domains[0] for d in domains):
            writer_for(domains[0], key).add_documents(tokens, lengths)
            continue
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        for i, domain in enumerate(domains):
            writer_for(domain, key).add_documents(tokens[offsets[i] : offsets[i + 1]], lengths[i : i + 1])


def _partition_files(files: list[str], partitions: int) -> list[list[str]]:
    """Contiguous groups of files, as even in count as possible, order preserved."""
    groups = np.array_split(np.arange(len(files)), min(partitions, len(files)))
    return [[files[i] for i in group] for group in groups if len(group)]


def _run_partition(config: PreprocessConfig, files: list[str], prefix: str, workers: int, show: bool):
    return _process_files(config, files, prefix, workers, show)


def _run_partitions(config: PreprocessConfig, files: list[str]):
    groups = _partition_files(files, config.partitions)
    workers = max(1, config.workers // len(groups))
    prefixes = [f"{config.output_prefix}_partition{i}" for i in range(len(groups))]
    results = []
    with ProcessPoolExecutor(len(groups), mp_context=mp.get_context("fork")) as pool:
        futures = [pool.submit(_run_partition, config, g, p, workers, i == 0)
                   for i, (g, p) in enumerate(zip(groups, prefixes))]
        errors = []
        for future in futures:  # in input order, so the reported error is the first one
            try:
                results.append(future.result())
            except BaseException as exc:
                errors.append(exc)
    try:
        if errors:
            raise errors[0]
        stats = Stats()
        outputs: dict[tuple[Optional[str], str], tuple[int, int]] = {}
        keys = sorted({k for _, counts in results for k in counts}, key=lambda k: (k[0] or "", k[1]))
        for domain, key in keys:
            parts = [output_prefix_for(p, key, domain) for (_, counts), p in zip(results, prefixes)
                     if (domain, key) in counts]
            writer = merge_datasets(parts, output_prefix_for(config.output_prefix, key, domain))
            outputs[(domain, key)] = (writer.documents, writer.tokens)
        for part_stats, _ in results:
            stats.merge(part_stats)
        return stats, outputs
    finally:
        for (_, counts), p in zip(results, prefixes):
            for domain, key in counts:
                remove_dataset(output_prefix_for(p, key, domain))


def write_manifest(config: PreprocessConfig, key: str, vocab_size: int,
                   outputs: dict[tuple[Optional[str], str], tuple[int, int]]) -> str:
    """``{output_prefix}_{key}_manifest.json``: domain → prefix (relative to the manifest), documents, tokens."""
    path = manifest_path(config.output_prefix, key)
    directory = os.path.dirname(os.path.abspath(path))
    domains = {}
    for (domain, k), (docs, tokens) in sorted(outputs.items(), key=lambda item: item[0][0] or ""):
        if k == key and domain is not None:
            prefix = os.path.abspath(output_prefix_for(config.output_prefix, key, domain))
            domains[domain] = {"prefix": os.path.relpath(prefix, directory), "documents": docs, "tokens": tokens}
    manifest = {
        "format": MANIFEST_FORMAT,
        "json_key": key,
        "split_by_domain": config.split_by_domain,
        "tokenizer_model": os.path.relpath(os.path.abspath(config.tokenizer_model), directory),
        "vocab_size": vocab_size,
        "dtype": np.dtype(token_dtype(vocab_size)).name,
        "append_eod": config.append_eod,
        "domains": domains,
    }
    with open(path + ".partial", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(path + ".partial", path)
    return path


def preprocess(config: PreprocessConfig) -> tuple[Stats, list[str]]:
    """Run the whole job; returns the stats and the paths of the datasets (prefixes) and manifests."""
    if config.on_error not in ("skip", "fail"):
        raise PreprocessError(f"--on-error {config.on_error}: expected skip or fail")
    if config.workers < 1 or config.partitions < 1:
        raise PreprocessError("--workers and --partitions must be at least 1")
    try:
        files = expand_inputs(config.inputs)
        vocab_size = build_tokenizer(config.tokenizer_model, config.tokenizer_type).vocab_size
    except ValueError as exc:
        raise PreprocessError(str(exc)) from None
    if config.partitions > 1 and len(files) > 1:
        stats, outputs = _run_partitions(config, files)
    else:
        stats, outputs = _process_files(config, files, config.output_prefix, config.workers, True)
    written = [output_prefix_for(config.output_prefix, key, domain) for domain, key in sorted(
        outputs, key=lambda k: (k[0] or "", k[1]))]
    if stats.documents == 0:
        for prefix in written:
            remove_dataset(prefix)
        raise PreprocessError(f"no documents written: {stats.why_empty()}")
    if config.split_by_domain is not None:
        written += [write_manifest(config, key, vocab_size, outputs) for key in config.json_keys]
    return stats, written
