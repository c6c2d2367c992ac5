"""megatron-mile-compare: train every loss × seed on the same data and budget, evaluate, and compare.

  megatron-mile-compare --data-path data/demo/blend.json --tokenizer-model data/demo/tokenizer.model \\
      --output-dir runs/demo --losses ce focal mile --seeds 1234 --nproc-per-node 2 --layout tp focal=pp \\
      -- --model-preset tiny --micro-batch-size 4 --global-batch-size 16 --train-iters 300 \\
         --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 30 --eval-interval 50 --eval-iters 2 --save-interval 100

Everything after ``--`` goes to every run's trainer (megatron-mile-train's flags; the comparison
sets --loss, --mile-gamma, --seed, --save/--load, the data and the layout itself). Each run is
converted and evaluated with megatron-mile-eval's and megatron-mile-buckets' code. A rerun
reuses every finished step and resumes an interrupted run from its checkpoint. Writes
OUTPUT_DIR/comparison.md (the table), comparison.json, compare.png, lm_eval.png, buckets/,
results/<run>.json, and runs/, lm_eval/, task/, steps/. Bad input: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from megatron_mile.cli import ArgumentParser
from megatron_mile.comparison.heldout_task import TaskSettings

PROG = "megatron-mile-compare"


def build_parser() -> argparse.ArgumentParser:
    from megatron_mile.comparison.pipeline import LOSSES, ComparisonConfig, trainer_default
    from megatron_mile.comparison.runs import LAYOUTS

    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True, help="runs, evaluations and the comparison go here")
    p.add_argument("--data-path", nargs="+", required=True, help="the training data, as megatron-mile-train takes it")
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES),
                   help="default: %(default)s")
    p.add_argument("--seeds", nargs="+", type=int, default=[trainer_default("seed")],
                   help="one run per loss and seed (default: the trainer's --seed, %(default)s)")
    p.add_argument("--gamma", type=float, default=trainer_default("mile_gamma"),
                   help="gamma of focal and MiLe (default: %(default)s)")
    p.add_argument("--nproc-per-node", type=int, default=ComparisonConfig.nproc,
                   help="processes per run (default: %(default)s)")
    p.add_argument("--layout", nargs="+", default=[ComparisonConfig.default_layout], metavar="[LOSS=]LAYOUT",
                   help=f"how a run uses its processes: {', '.join(LAYOUTS)} (all processes tensor parallel, "
                        "pipeline stages, or data parallel); LOSS=LAYOUT for one loss (default: %(default)s)")
    p.add_argument("--tasks", help="lm-eval tasks or presets instead of the held-out next-line task")
    p.add_argument("--task-items-per-domain", type=int, default=TaskSettings.items_per_domain,
                   help="held-out task items per domain (default: %(default)s)")
    p.add_argument("--task-choices", type=int, default=TaskSettings.choices,
                   help="candidates per held-out task item; chance accuracy is 1/this (default: %(default)s)")
    p.add_argument("--eval-limit", type=float, help="lm-eval items per task (for quick checks)")
    p.add_argument("--eval-batch-size", type=int, default=ComparisonConfig.eval_batch_size,
                   help="lm-eval batch size (default: %(default)s)")
    p.add_argument("--device", help="lm-eval's device (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--buckets-max-tokens", type=int, default=ComparisonConfig.buckets_max_tokens,
                   help="tokens scored per validation set by the bucket analysis (default: %(default)s)")
    return p


def _layouts(entries: list[str], default: str) -> tuple[str, dict[str, str]]:
    """``["tp", "focal=pp"]`` -> ("tp", {"focal": "pp"}): a bare layout is every other loss's."""
    per_loss = {}
    for entry in entries:
        loss, sep, layout = entry.rpartition("=")
        if sep:
            per_loss[loss] = layout
        else:
            default = layout
    return default, per_loss


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, trainer_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(ours)

    from megatron_mile.comparison.heldout_task import TaskDataError
    from megatron_mile.comparison.pipeline import ComparisonConfig, run_comparison
    from megatron_mile.comparison.runs import ComparisonError, TrainingFailed
    from megatron_mile.evaluation.bucket_analysis import BucketsError
    from megatron_mile.evaluation.downstream import EvalInputError

    default_layout, layouts = _layouts(args.layout, ComparisonConfig.default_layout)
    config = ComparisonConfig(
        output_dir=args.output_dir, data_path=args.data_path, tokenizer_model=args.tokenizer_model,
        trainer_args=trainer_args, losses=args.losses, seeds=args.seeds, gamma=args.gamma, layouts=layouts,
        default_layout=default_layout, nproc=args.nproc_per_node, tasks=args.tasks,
        task_items_per_domain=args.task_items_per_domain, task_choices=args.task_choices,
        eval_limit=args.eval_limit, eval_batch_size=args.eval_batch_size, device=args.device,
        buckets_max_tokens=args.buckets_max_tokens)
    try:
        run_comparison(config, log=lambda line: print(line, flush=True))
    except (ComparisonError, TaskDataError, BucketsError, EvalInputError) as err:
        for line in str(err).splitlines():
            print(f"{PROG}: error: {line}", file=sys.stderr)
        return 2
    except TrainingFailed as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
