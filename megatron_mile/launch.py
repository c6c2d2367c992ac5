"""torchrun, with the trainer's own exits left to the trainer.

    python -m megatron_mile.launch --nproc-per-node 2 -m megatron_mile.train --train-iters 200 ...

It takes exactly torchrun's arguments and runs torchrun in this process. What it adds:

1. Before any worker starts, so before any process group exists, the trainer's flags are
   checked at the world size torchrun will start (``--nnodes`` x ``--nproc-per-node``; not
   with an elastic ``--nnodes MIN:MAX``): a bad setting prints one line and exits 2.
2. torchrun answers every failed worker, and every signal, with its own traceback. The
   trainer has already said what happened, in one line, when its workers exit with 2 (a
   configuration, data or checkpoint error) or 130 (interrupted), so those end the launcher
   with the same code and nothing more; so does Ctrl-C, which torchrun forwards to every
   worker before it stops (exit 128 + the signal's number; a preemption signal the same way,
   after the workers saved). Any other failure keeps torchrun's report.
"""

from __future__ import annotations

import logging
import re
import sys

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

TRAINER = "megatron_mile.train"
# Worker exit codes after which the trainer has printed its one line.
REPORTED_EXITS = (2, 130)
_AGENT_LOGGERS = ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api")
# torchrun's notices while it forwards a signal to the workers, and about a reported exit.
_NOTICES = re.compile(r".*(death signal, shutting down workers|closing signal)|failed \(exitcode: (%s)\)"
                      % "|".join(map(str, REPORTED_EXITS)))


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOTICES.match(record.getMessage())


def world_size(args) -> int | None:
    """The number of workers torchrun will start; None when it is elastic."""
    min_nodes, max_nodes = torchrun.parse_min_max_nnodes(args.nnodes)
    if min_nodes != max_nodes:
        return None
    return max_nodes * torchrun.determine_local_world_size(args.nproc_per_node)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = torchrun.parse_args(argv)
    size = world_size(args)
    if args.module and args.training_script == TRAINER and size is not None:
        from megatron_mile.train import preflight
        from megatron_mile.arguments import parse_args

        preflight(parse_args(args.training_script_args), size)
    for name in _AGENT_LOGGERS:
        logging.getLogger(name).addFilter(_DropNotices())
    try:
        torchrun.main(argv)
    except SignalException as exc:
        return 128 + exc.sigval
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        if failure.exitcode in REPORTED_EXITS:
            return failure.exitcode
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
