#!/usr/bin/env python
"""Make a blend JSON (for --data-path) from a preprocessing manifest and per-domain weights.

  python tools/make_blend.py --manifest data/pile/pile_text_manifest.json \
      --weights pile --output data/pile/blend.json

Weights files hold {"train_domain_weights": {...}, "eval_domain_weights": {...}} or a flat
{domain: weight}; they are relative and get normalised. Without --weights all domains weigh the
same. A manifest domain missing from the weights gets their mean weight (with a warning); a
weighted domain missing from the manifest is an error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

if not __package__:  # run as a script from a checkout, not as megatron_mile.tools
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", module=r"megatron\.core")  # Apex/TE fallbacks are irrelevant here


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="{output-prefix}_{key}_manifest.json of preprocess_data.py")
    parser.add_argument("--weights", default=None,
                        help="per-domain weights JSON, or a shipped one by name: pile (the paper's 22 Pile "
                             "domains) or demo (default: uniform)")
    parser.add_argument("--eval-manifest", default=None,
                        help="manifest of separate validation data (e.g. the Pile's val.jsonl.zst)")
    parser.add_argument("--output", required=True, help="blend JSON to write")
    args = parser.parse_args(argv)
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)

    from megatron_mile.data.blend import load_blend, make_blend, write_blend

    try:
        blend = make_blend(args.manifest, args.weights, args.eval_manifest)
        write_blend(blend, args.output)
        load_blend([args.output])  # fail now, not at training time, if a prefix is unusable
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
