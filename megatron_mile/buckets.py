"""``megatron-mile-buckets``: perplexity and predicted entropy per token-frequency bucket, per model.

  megatron-mile-buckets runs/468M_ce runs/468M_mile --labels CE MiLe \\
      --data-path data/pile/blend.json --tokenizer-model data/pile/tokenizer.model --output-dir results/buckets

Counts the training tokens of the blend (cached beside the data), buckets the vocabulary by
frequency (``--cutoffs``), and scores every model on the trainer's validation sets (the blend and
each domain). Writes OUTPUT_DIR/buckets.json, buckets.md and buckets.png, and prints the tables.
Runs single-process (CPU or one GPU) or under torchrun at --tensor-model-parallel-size /
--pipeline-model-parallel-size (the remaining ranks are data parallel).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings

warnings.filterwarnings("ignore", module=r"megatron\.core")  # Apex/TE fallbacks are irrelevant here
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint")

from megatron_mile.cli import ArgumentParser  # noqa: E402

# Nothing heavy at import: --count-workers spawns processes that import this module again.
PROG = "megatron-mile-buckets"


def build_parser() -> argparse.ArgumentParser:
    from megatron_mile.evaluation.bucket_analysis import DEFAULT_CUTOFFS, DEFAULT_MAX_TOKENS, DEFAULT_MICRO_BATCH_SIZE

    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="RUN_OR_HF",
                   help="training --save directories (or iter_N checkpoints) and Hugging Face model directories")
    p.add_argument("--labels", nargs="+", help="one per model (default: the directory names)")
    p.add_argument("--iteration", type=int, help="the runs' checkpoint to load (default: their latest)")
    p.add_argument("--data-path", nargs="+", required=True,
                   help="the training blend: one blend JSON, or Megatron-LM's '[weight] prefix ...' list")
    p.add_argument("--tokenizer-model", required=True,
                   help="the training tokenizer: SentencePiece .model file or Hugging Face tokenizer directory")
    p.add_argument("--tokenizer-type", choices=["sentencepiece", "huggingface"],
                   help="inferred from --tokenizer-model when omitted")
    p.add_argument("--split", help="train/valid/test split (default: the runs' --split; the trainer's default "
                                   "with Hugging Face models only)")
    p.add_argument("--cutoffs", default=",".join(f"{c:.2f}" for c in DEFAULT_CUTOFFS),
                   help="training-token shares closing the high and the medium bucket (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="target tokens scored at most per validation set: the blend and each domain "
                        "(default: %(default)s)")
    p.add_argument("--seq-length", type=int, help="default: the first run's (an HF model's max positions)")
    p.add_argument("--seed", type=int, help="validation sample order (default: the first run's --seed)")
    p.add_argument("--micro-batch-size", type=int, default=DEFAULT_MICRO_BATCH_SIZE,
                   help="sequences per forward pass (default: %(default)s)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="scoring layout (default: 1)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="scoring layout (default: 1)")
    p.add_argument("--count-workers", type=int, default=1,
                   help="processes counting tokens on each rank (default: %(default)s)")
    p.add_argument("--counts-cache-dir", help="where token counts are cached (default: beside each dataset)")
    p.add_argument("--output-dir", required=True,
                   help="buckets.json/.md/.png (and data_cache/, the validation sample indices)")
    return p


def parse_cutoffs(text: str) -> tuple[float, ...]:
    from megatron_mile.evaluation.bucket_analysis import BucketsError

    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise BucketsError(f"--cutoffs: expected two comma-separated shares like 0.80,0.95, got {text!r}") from None


def _check_output_dir(path: str) -> None:
    from megatron_mile.evaluation.bucket_analysis import BucketsError

    if os.path.exists(path) and not os.path.isdir(path):
        raise BucketsError(f"--output-dir: {path} exists and is not a directory")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BucketsError("buckets.png needs matplotlib (pip install matplotlib)") from None


def main(argv: list[str] | None = None) -> int:
    from megatron_mile.evaluation.bucket_analysis import BucketsError, analyze_buckets
    from megatron_mile.evaluation.frequency import FrequencyError

    args = build_parser().parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        _check_output_dir(args.output_dir)
        result = analyze_buckets(
            args.models, args.data_path, args.tokenizer_model, labels=args.labels, iteration=args.iteration,
            tokenizer_type=args.tokenizer_type, split=args.split, cutoffs=parse_cutoffs(args.cutoffs),
            max_tokens=args.max_tokens, seq_length=args.seq_length, seed=args.seed,
            micro_batch_size=args.micro_batch_size, tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size, counts_cache_dir=args.counts_cache_dir,
            count_workers=args.count_workers, data_cache_path=os.path.join(args.output_dir, "data_cache"))
    except (BucketsError, FrequencyError) as err:
        if rank == 0:  # every rank fails the same way; one line per problem
            for line in str(err).splitlines():
                print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)
        return 2
    if rank == world_size - 1:
        from megatron_mile.evaluation.bucket_report import markdown, write_reports

        command = shlex.join([PROG, *(argv if argv is not None else sys.argv[1:])])
        paths = write_reports(result, args.output_dir, command)
        print(markdown(result, command))
        print(f"wrote {', '.join(paths.values())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
