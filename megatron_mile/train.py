"""Entry point: ``torchrun ... -m megatron_mile.train --data-path ... --tokenizer-model ... --train-iters N``.

Configuration errors are checked before any process group exists and end the run with
one line on stderr and exit code 2.
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

from megatron_mile.arguments import ConfigError, adopt_checkpoint_architecture, parse_args, validate  # noqa: E402
from megatron_mile.checkpointing import CheckpointError, find_checkpoint, saved_arguments  # noqa: E402


def _fail(message: str) -> None:
    # Every rank fails the same way; one line from the first is enough.
    if os.environ.get("RANK", "0") == "0":
        print(f"megatron-mile-train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        # The checkpoint fixes the architecture, and the checks below depend on it.
        checkpoint = find_checkpoint(args.load) if args.load else None
        if checkpoint:
            adopt_checkpoint_architecture(args, saved_arguments(checkpoint), checkpoint)
        validate(args, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigError, CheckpointError) as err:
        _fail(str(err))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Our own decisions (CPU layer, resharded RNG) are worth a line; megatron's chatter is not.
    logging.getLogger("megatron_mile").setLevel(logging.INFO)
    os.environ.setdefault("PYTHONWARNINGS", ",".join(f"ignore:{m}" for m in _QUIET))

    from megatron_mile.training import TrainingAborted, pretrain

    try:
        pretrain(args)
    except (ConfigError, CheckpointError, TrainingAborted, ValueError, FileNotFoundError) as err:
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)


if __name__ == "__main__":
    main()
