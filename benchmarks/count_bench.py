#!/usr/bin/env python
"""Token counting throughput (tokens/s) and peak memory of the frequency analysis' counter, against
baselines counting the same dataset in the same run.

  python benchmarks/count_bench.py --tokens 67108864 --vocab 32000 --workers 2

Methods (each in a fresh process, so its peak RSS is its own; the dataset is read once beforehand so
every method reads from the page cache and the numbers compare counting, not the disk):
  chunked       megatron_mile.evaluation.frequency.count_tokens: memory-mapped chunks + numpy.bincount
  chunked-N     the same with --workers processes
  per-document  a plain loop: numpy.bincount of every document read through megatron-core's IndexedDataset
  whole-file    numpy.fromfile of the whole .bin and one numpy.bincount

The dataset is synthetic: Zipf-distributed ids (exponent 1.1) in documents of log-normal lengths
(median ~700 tokens), written with megatron-core's IndexedDatasetBuilder. Every method must return
the same counts; the bench checks that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_dataset(prefix: str, tokens: int, vocab: int, seed: int = 0) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_mile.data.indexed import token_dtype

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, vocab + 1) ** 1.1
    cdf = np.cumsum(weights / weights.sum())
    lengths = np.maximum(1, rng.lognormal(6.5, 1.0, size=tokens // 100 + 1).astype(np.int64))
    ends = np.cumsum(lengths)
    lengths = np.append(lengths[ends < tokens], tokens - ends[ends < tokens][-1:].sum())
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=token_dtype(vocab))
    for group in np.array_split(lengths, max(1, len(lengths) // 4096)):
        ids = np.minimum(np.searchsorted(cdf, rng.random(int(group.sum()))), vocab - 1)
        for doc, length in zip(np.split(ids, np.cumsum(group)[:-1]), group.tolist()):
            builder.add_document(doc, [length])
    builder.finalize(prefix + ".idx")


class TreeMemory:
    """Peak resident memory of this process and its children (the counting workers) above the start,
    sampled every 5 ms in a thread (``ru_maxrss`` cannot be used: Linux carries a parent's peak into
    a child across fork and exec)."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.start = self.peak = self._resident()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _resident(self) -> int:
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # a worker that just exited
                pass
        return total

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self._resident())
            time.sleep(0.005)

    def stop(self) -> float:
        """Peak extra MiB."""
        self.running = False
        self.thread.join()
        return (max(self.peak, self._resident()) - self.start) / 2**20


def run_method(method: str, prefix: str, vocab: int, workers: int) -> dict:
    """Count the whole dataset with one method; returns tokens, seconds and a digest of the counts."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_mile.evaluation import frequency

    memory = TreeMemory()
    start = time.perf_counter()
    if method.startswith("chunked"):
        counts = frequency.count_tokens([frequency.dataset_span(prefix)], vocab,
                                        workers=workers if method != "chunked" else 1)[0, :vocab]
    elif method == "per-document":
        dataset = IndexedDataset(prefix)
        counts = np.zeros(vocab, dtype=np.int64)
        for i in range(len(dataset)):
            counts += np.bincount(dataset[i], minlength=vocab)
    elif method == "whole-file":
        dtype = IndexedDataset(prefix).index.dtype
        counts = np.bincount(np.fromfile(prefix + ".bin", dtype=dtype), minlength=vocab)
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - start
    return {"tokens": int(counts.sum()), "seconds": seconds, "extra_mib": memory.stop(),
            "digest": int(np.dot(counts, np.arange(1, vocab + 1)) % (2**61 - 1))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1 << 26)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", help="where to write the dataset (default: a temporary directory)")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # internal: one method in this process
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_method(args.method, args.prefix, args.vocab, args.workers)))
        return 0

    directory = tempfile.mkdtemp(dir=args.dir)
    try:
        prefix = os.path.join(directory, "bench")
        make_dataset(prefix, args.tokens, args.vocab)
        with open(prefix + ".bin", "rb") as f:  # into the page cache for every method alike
            while f.read(1 << 24):
                pass
        methods = ["per-document", "whole-file", "chunked", f"chunked-{args.workers}"]
        results = {}
        for method in methods:
            done = subprocess.run([sys.executable, __file__, "--method", method, "--prefix", prefix, "--vocab",
                                   str(args.vocab), "--workers", str(args.workers)],
                                  capture_output=True, text=True, check=True)
            results[method] = json.loads(done.stdout.strip().splitlines()[-1])
        if len({(r["tokens"], r["digest"]) for r in results.values()}) != 1:
            print(f"counts differ between methods: {results}", file=sys.stderr)
            return 1
        load = os.getloadavg()
        print(f"{args.tokens:,} tokens ({os.path.getsize(prefix + '.bin') / 2**20:,.0f} MiB), vocab {args.vocab}; "
              f"{platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}; "
              f"load average {load[0]:.2f} / {load[1]:.2f} (1 / 5 min) at the end\n")
        base = results["per-document"]
        print("| method | tokens/s | vs per-document | peak extra RSS MiB (workers included) |")
        print("|---|---|---|---|")
        for method, r in results.items():
            rate = r["tokens"] / r["seconds"]
            print(f"| {method} | {rate:,.0f} | {rate / (base['tokens'] / base['seconds']):.2f}x | "
                  f"{r['extra_mib']:,.0f} |")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
