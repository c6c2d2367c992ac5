"""Entry point: ``torchrun ... -m megatron_mile.train --data-path ... --tokenizer-model ... --train-iters N``.

Configuration errors (the flags at this world size, the data, ``--save``/``--load``) are
checked before any process group exists; ``--check-config`` stops after those checks. The
project's own errors (a bad flag, unusable data, a checkpoint this run cannot use, a run that
cannot go on) end the run with one line on stderr and exit code 2, printed once by the first
rank that hit it: a failure on one pipeline stage is reported by that stage, and ranks that
fail alike do not repeat it. Any other exception is a bug and keeps its traceback; ranks that
fail only because another rank left stay quiet (``runtime.claim_failure``). Ctrl-C ends the
run with one line and exit code 130 (see ``megatron_mile.interrupts``).
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

from megatron_mile import interrupts, run_dir, runtime  # noqa: E402
from megatron_mile.arguments import ConfigError, adopt_checkpoint_architecture, parse_args, validate  # noqa: E402
from megatron_mile.checkpointing import CheckpointError, StartPlan, find_checkpoint, saved_arguments  # noqa: E402
from megatron_mile.data import load_blend  # noqa: E402
from megatron_mile.data.errors import DataError  # noqa: E402

# Errors whose message says everything the user needs (with training's TrainingAborted);
# anything else shows its traceback.
ONE_LINE_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, CheckpointError)


def _fail(err: Exception) -> None:
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    if runtime.claim_failure(message):
        print(f"megatron-mile-train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def preflight(args: argparse.Namespace, world_size: int) -> StartPlan:
    """Every check that needs no process group: the flags at ``world_size``, --save/--load, the data.

    A failure prints one line and exits 2.
    """
    try:
        # The checkpoint fixes the architecture, and the checks below depend on it.
        checkpoint = find_checkpoint(args.load) if args.load else None
        if checkpoint:
            adopt_checkpoint_architecture(args, saved_arguments(checkpoint), checkpoint)
        validate(args, world_size=world_size)
        plan = run_dir.plan_start(args)
        load_blend(args.data_path)
    except ONE_LINE_ERRORS as err:
        _fail(err)
    return plan


def _describe(plan: StartPlan) -> str:
    if plan.weights_only:
        return f"starting at iteration 0 from the model weights in {plan.load}"
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
    except interrupts.Interrupted:
        raise  # the entry point's decorator prints its one line
    except (*ONE_LINE_ERRORS, TrainingAborted) as err:
        _fail(err)
    except Exception:
        if runtime.claim_failure():
            raise
        sys.exit(1)  # a consequence of another rank's failure, which that rank reports
    finally:
        # After Ctrl-C a peer may have left in the middle of a collective: no orderly shutdown.
        if not interrupts.interrupted():
            runtime.shutdown()


if __name__ == "__main__":
    main()
