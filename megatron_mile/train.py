"""Entry point: ``torchrun ... -m megatron_mile.train --data-path ... --tokenizer-model ... --train-iters N``.

Configuration errors (the flags at this world size, the data, ``--save``/``--load``) are
checked before any process group exists and end the run with one line on stderr and exit
code 2; ``--check-config`` stops after those checks. Ctrl-C ends it with one line and exit
code 130 (see ``megatron_mile.interrupts``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

if __name__ == "__mp_main__":
    # A helper process that multiprocessing spawned (the checkpoint writer's manager) runs this
    # module as its main. Ctrl-C is for the trainer, which stops its helpers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

from megatron_mile import interrupts, run_dir  # noqa: E402
from megatron_mile.arguments import ConfigError, parse_args, validate  # noqa: E402
from megatron_mile.checkpointing import CheckpointError, StartPlan  # noqa: E402
from megatron_mile.data import load_blend  # noqa: E402


def _fail(message: str) -> None:
    # Every rank fails the same way; one line from the first is enough.
    if os.environ.get("RANK", "0") == "0":
        print(f"megatron-mile-train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def preflight(args: argparse.Namespace, world_size: int) -> StartPlan:
    """Every check that needs no process group: the flags at ``world_size``, --save/--load, the data.

    A failure prints one line and exits 2.
    """
    try:
        validate(args, world_size=world_size)
        plan = run_dir.plan_start(args)
        load_blend(args.data_path)
    except (ConfigError, CheckpointError, ValueError) as err:
        _fail(str(err))
    return plan


def _describe(plan: StartPlan) -> str:
    if plan.load:
        return f"resuming {plan.load} at iteration {plan.iteration}"
    return plan.notice or "starting from iteration 0"


@interrupts.exit_quietly_on_interrupt("megatron-mile-train")
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    plan = preflight(args, world_size)
    if args.check_config:
        print(f"megatron-mile-train: configuration OK at world size {world_size}; {_describe(plan)}")
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Our own decisions (CPU layer, kernels, resharded RNG) are worth a line, once; megatron's
    # chatter is not.
    logging.getLogger("megatron_mile").setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else
                                                logging.WARNING)

    from megatron_mile.training import TrainingAborted, pretrain

    try:
        pretrain(args)
    except (ConfigError, CheckpointError, TrainingAborted, ValueError, FileNotFoundError) as err:
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)


if __name__ == "__main__":
    main()
