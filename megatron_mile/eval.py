"""megatron-mile-eval: downstream benchmarks (lm-eval) for runs and Hugging Face models, as one table.

  megatron-mile-eval runs/468M_mile_gamma1.0 runs/468M_ce_gamma1.0 --labels mile ce \\
      --tasks paper --num-fewshot 0 --batch-size 32 --output-dir results/468M_0shot

Each RUN_OR_HF is a training --save directory (its latest checkpoint, or --iteration N), one
iter_NNNNNNN checkpoint, or a Hugging Face model directory. Checkpoints are converted once
into RUN/hf/iter_NNNNNNN (or under --cache-dir) and reused. Writes OUT/results.json, .md,
.csv, .png and OUT/lm_eval/<label>.json. Bad input: one line each, exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from megatron_mile.cli import ArgumentParser
from megatron_mile.evaluation.harness import DTYPES, PRESETS, HarnessOptions

PROG = "megatron-mile-eval"


def _batch_size(value: str):
    if value.startswith("auto"):
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a positive integer or auto[:N], got {value!r}")


def _non_negative(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return int(value)


def _limit(value: str) -> float:
    try:
        limit = float(value)
    except ValueError:
        limit = -1.0
    if not limit > 0 or (limit >= 1 and limit != int(limit)):
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or a fraction in (0, 1), got {value!r}")
    return limit


def build_parser() -> argparse.ArgumentParser:
    presets = "; ".join(f"{name}: {','.join(tasks)}" for name, tasks in PRESETS.items())
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="RUN_OR_HF", help="run directories, checkpoints or HF model dirs")
    p.add_argument("--labels", nargs="+", help="one per model (default: the directory names)")
    p.add_argument("--tasks", required=True, help=f"comma-separated lm-eval task names and/or presets ({presets})")
    p.add_argument("--num-fewshot", type=_non_negative, default=HarnessOptions.num_fewshot,
                   help="examples in the prompt (the paper: 0 and 5); default: each task's own")
    p.add_argument("--include-path", default=HarnessOptions.include_path, help="a directory of local task YAMLs")
    p.add_argument("--limit", type=_limit, default=HarnessOptions.limit,
                   help="examples per task (a fraction below 1); for quick checks, not for reporting")
    p.add_argument("--batch-size", type=_batch_size, default=HarnessOptions.batch_size,
                   help="default: %(default)s; auto or auto:N: lm-eval finds the largest that fits")
    p.add_argument("--device", default=HarnessOptions.device, help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default=HarnessOptions.dtype,
                   help="weights' dtype for lm-eval; auto: as converted (bfloat16 for --bf16 runs)")
    p.add_argument("--iteration", type=_non_negative, help="checkpoint of every run directory (default: the latest)")
    p.add_argument("--cache-dir", help="converted checkpoints go here instead of RUN/hf/")
    p.add_argument("--offline", action="store_true",
                   help="never contact the Hugging Face hub: datasets must be in the local cache")
    p.add_argument("--output-dir", required=True, help="where results.json/.md/.csv/.png are written")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from checkpoint_conversion.convert_to_hf import ConversionError
    from checkpoint_conversion.hf_tokenizer import TokenizerExportError
    from megatron_mile.evaluation.downstream import EvalInputError, evaluate_downstream, go_offline

    if args.offline:
        go_offline()  # before lm-eval, transformers and datasets are imported
    options = HarnessOptions(num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                             device=args.device, dtype=args.dtype, include_path=args.include_path)
    try:
        evaluate_downstream(args.models, args.tasks, args.output_dir, labels=args.labels, iteration=args.iteration,
                            cache_dir=args.cache_dir, options=options, log=lambda line: print(line, flush=True))
    except EvalInputError as err:
        for problem in err.problems:
            print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    except (ConversionError, TokenizerExportError) as err:  # found while converting a checkpoint
        print(f"{PROG}: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
