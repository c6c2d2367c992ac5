#!/usr/bin/env python
"""Preprocessing throughput (tokens/s): tools/preprocess_data.py's pipeline against baselines run
in the same process on the same input and tokenizer.

Baselines:
  loop          a plain single-process loop: json.loads → tokenizer encode → IndexedDatasetBuilder.add_document
  megatron-lm   with --megatron-lm PATH, that checkout's tools/preprocess_data.py at the same --workers
                (both tools then run as subprocesses and are timed wall-clock, start-up included)

  python benchmarks/preprocess_bench.py --input data/demo/corpus.jsonl.zst \
      --tokenizer-model data/demo/tokenizer.model --workers 2

All runs read the same decompressed .jsonl copy of --input (Megatron-LM reads only plain JSONL) and
must produce the same number of tokens; the bench checks that.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", module=r"megatron\.core")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plain_loop(path: str, tokenizer_model: str, prefix: str) -> tuple[int, float]:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_mile.data import build_tokenizer
    from megatron_mile.data.indexed import token_dtype

    start = time.perf_counter()
    tok = build_tokenizer(tokenizer_model)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=token_dtype(tok.vocab_size))
    tokens = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids = tok.tokenize(json.loads(line)["text"]) + [tok.eod]
            builder.add_document(ids, [len(ids)])
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return tokens, time.perf_counter() - start


def ours(path: str, tokenizer_model: str, prefix: str, workers: int) -> tuple[int, float]:
    from megatron_mile.data.preprocess import PreprocessConfig, preprocess

    start = time.perf_counter()
    stats, _ = preprocess(PreprocessConfig(inputs=[path], output_prefix=prefix, tokenizer_model=tokenizer_model,
                                           append_eod=True, workers=workers, quiet=True))
    return stats.tokens, time.perf_counter() - start


def timed(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed:\n{out.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a JSONL / .jsonl.zst / .jsonl.gz file with a 'text' key")
    parser.add_argument("--tokenizer-model", required=True, help="SentencePiece .model")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--megatron-lm", default=None, help="path of a Megatron-LM checkout")
    parser.add_argument("--megatron-lm-python", default=sys.executable,
                        help="interpreter for Megatron-LM (its megatron.training imports need extra packages)")
    args = parser.parse_args()

    from megatron_mile.data.jsonl import decompressed_chunks

    tmp = tempfile.mkdtemp(prefix="preprocess_bench_")
    try:
        plain = os.path.join(tmp, "input.jsonl")
        with open(plain, "wb") as f:
            for chunk in decompressed_chunks(args.input):
                f.write(chunk)
        mb = os.path.getsize(plain) / 1e6
        print(f"input: {args.input} ({mb:.1f} MB decompressed), tokenizer: {args.tokenizer_model}")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"python {platform.python_version()}")
        base_tokens, base_s = plain_loop(plain, args.tokenizer_model, os.path.join(tmp, "loop"))
        our_tokens, our_s = ours(plain, args.tokenizer_model, os.path.join(tmp, "ours"), args.workers)
        if our_tokens != base_tokens:
            raise SystemExit(f"token counts differ: loop {base_tokens}, ours {our_tokens}")
        print(f"plain loop (1 process):     {base_tokens / base_s:>12,.0f} tokens/s  ({base_s:.2f} s)")
        print(f"preprocess_data ({args.workers} workers): {our_tokens / our_s:>12,.0f} tokens/s  ({our_s:.2f} s)"
              f"  = {base_s / our_s:.2f}x the loop")
        if args.megatron_lm:
            common = ["--input", plain, "--json-keys", "text", "--append-eod", "--workers", str(args.workers)]
            mine = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), *common, "--quiet",
                    "--tokenizer-model", args.tokenizer_model, "--output-prefix", os.path.join(tmp, "cli")]
            theirs = [args.megatron_lm_python, os.path.join(args.megatron_lm, "tools", "preprocess_data.py"), *common,
                      "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", args.tokenizer_model,
                      "--output-prefix", os.path.join(tmp, "mlm")]
            env = dict(os.environ, PYTHONPATH=args.megatron_lm)
            mine_s, theirs_s = timed(mine), timed(theirs, env)
            same = all(filecmp.cmp(os.path.join(tmp, f"cli_text_document{ext}"),
                                   os.path.join(tmp, f"mlm_text_document{ext}"), shallow=False)
                       for ext in (".bin", ".idx"))
            print(f"CLI wall time, start-up included: ours {mine_s:.2f} s, Megatron-LM {theirs_s:.2f} s "
                  f"= {theirs_s / mine_s:.2f}x; outputs byte-identical: {same}")
    finally:
        shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
