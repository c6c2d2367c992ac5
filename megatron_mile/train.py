"""Entry point: ``torchrun ... -m megatron_mile.train --data-path ... --tokenizer-model ... --train-iters N``.

The project's own errors (a bad flag, unusable data, a checkpoint this run cannot use, a
run that cannot go on) end the run with one line on stderr and exit code 2, printed once by
the first rank that hit it: a failure on one pipeline stage is reported by that stage, and
ranks that fail alike do not repeat it. Any other exception is a bug and keeps its traceback;
ranks that fail only because another rank left stay quiet (``runtime.claim_failure``).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# megatron-core warns at import about optional CUDA extensions that a CPU run does not use,
# so the filter goes in before the first import of it; the environment variable carries it
# into the checkpoint writer's processes.
_QUIET = ("Transformer Engine and Apex are not installed", "Apex is not installed")
for _message in _QUIET:
    warnings.filterwarnings("ignore", message=_message)

from megatron_mile import runtime  # noqa: E402
from megatron_mile.arguments import ConfigError, parse_args, validate  # noqa: E402
from megatron_mile.checkpointing import CheckpointError  # noqa: E402
from megatron_mile.data.errors import DataError  # noqa: E402

# Errors whose message says everything the user needs (with training's TrainingAborted);
# anything else shows its traceback.
ONE_LINE_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, CheckpointError)


def _fail(err: Exception) -> None:
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    if runtime.claim_failure(message):
        print(f"megatron-mile-train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        validate(args, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        _fail(err)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Our own decisions (CPU layer, resharded RNG) are worth a line; megatron's chatter is not.
    logging.getLogger("megatron_mile").setLevel(logging.INFO)
    os.environ.setdefault("PYTHONWARNINGS", ",".join(f"ignore:{m}" for m in _QUIET))

    from megatron_mile.training import TrainingAborted, pretrain

    try:
        pretrain(args)
    except (*ONE_LINE_ERRORS, TrainingAborted) as err:
        _fail(err)
    except Exception:
        if runtime.claim_failure():
            raise
        sys.exit(1)  # a consequence of another rank's failure, which that rank reports
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    main()
