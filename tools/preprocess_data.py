#!/usr/bin/env python
"""Tokenize JSONL / .jsonl.zst / .jsonl.gz into megatron-core .bin/.idx datasets.

Flags follow Megatron-LM's tools/preprocess_data.py; ``--split-by-domain`` writes one dataset per
domain plus a manifest, ``--on-error`` chooses between skipping and failing on bad lines.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

if not __package__:  # run as a script from a checkout, not as megatron_mile.tools
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", module=r"megatron\.core")  # Apex/TE fallbacks are irrelevant here


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from megatron_mile.cli import ArgumentParser
    from megatron_mile.data.tokenizer import TOKENIZER_TYPE_HELP, tokenizer_type_argument

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True, help="JSONL files (.jsonl, .jsonl.zst, .jsonl.gz) or globs")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (one dataset each)")
    group.add_argument("--split-by-domain", metavar="KEY", default=None,
                       help="dotted JSON path of the domain, e.g. meta.pile_set_name: one dataset per domain + manifest")
    group.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                       help="skip: count bad lines and go on; fail: stop at the first one (non-zero exit)")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", type=tokenizer_type_argument, default=None, help=TOKENIZER_TYPE_HELP)
    group.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file or HF tokenizer directory")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to every document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="datasets are {prefix}[_{domain}]_{key}_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="encoding processes; output is identical for any value")
    group.add_argument("--partitions", type=int, default=1,
                       help="process contiguous groups of input files in parallel, then merge (same output)")
    group.add_argument("--log-interval", type=int, default=1000, help="documents between progress updates")
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_mile.data.preprocess import PreprocessConfig, PreprocessError, preprocess

    config = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer_model=args.tokenizer_model,
        tokenizer_type=args.tokenizer_type, json_keys=args.json_keys, split_by_domain=args.split_by_domain,
        append_eod=args.append_eod, workers=args.workers, partitions=args.partitions, on_error=args.on_error,
        log_interval=args.log_interval, quiet=args.quiet,
    )
    try:
        stats, written = preprocess(config)
    except PreprocessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no partial dataset was left under its final name", file=sys.stderr)
        return 130
    print(stats.summary())
    print("wrote:" + "".join(f"\n  {path}" for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
