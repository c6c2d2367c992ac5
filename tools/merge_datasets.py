#!/usr/bin/env python
"""Concatenate megatron-core .bin/.idx datasets, in the order given, with megatron-core's builder.

  python tools/merge_datasets.py --input data/a_text_document data/b_text_document \
      --output-prefix data/ab_text_document

An --input that is a directory stands for all the datasets in it, in sorted order. Token dtypes
must match. The output is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

if not __package__:  # run as a script from a checkout, not as megatron_mile.tools
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", module=r"megatron\.core")  # Apex/TE fallbacks are irrelevant here


def expand(inputs: list[str]) -> list[str]:
    prefixes = []
    for item in inputs:
        if os.path.isdir(item) and not os.path.isfile(item + ".idx"):  # megatron caches in PREFIX/cache
            found = sorted(os.path.join(item, f[: -len(".idx")]) for f in os.listdir(item) if f.endswith(".idx"))
            if not found:
                raise ValueError(f"--input {item}: directory holds no .idx files")
            prefixes.extend(found)
        else:
            prefixes.append(item.removesuffix(".bin").removesuffix(".idx"))
    return prefixes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="dataset prefixes or directories")
    parser.add_argument("--output-prefix", required=True, help="merged dataset prefix")
    args = parser.parse_args(argv)

    from megatron_mile.data.indexed import merge_datasets

    try:
        prefixes = expand(args.input)
        if os.path.abspath(args.output_prefix) in map(os.path.abspath, prefixes):
            raise ValueError(f"--output-prefix {args.output_prefix} is also an input")
        writer = merge_datasets(prefixes, args.output_prefix)
    except (ValueError, AssertionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.output_prefix}: {writer.documents} documents, {writer.tokens} tokens from {len(prefixes)} datasets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
