"""The run directory: what a run leaves behind, and how the next start treats it.

A run writes into ``--save``: checkpoints (``iter_N/``, ``latest_checkpointed_iteration.txt``),
``metrics.jsonl`` and TensorBoard events (``tensorboard/``); ``--metrics-file`` and
``--tensorboard-dir`` move the last two. Work there is never lost silently, and two runs never
mix in one metrics file or one TensorBoard directory:

* ``--load`` continues the run saved there (``--save X --load X``, also on the first run, when X
  does not exist yet). The run starts after the latest checkpoint, or at iteration 0; the
  ``metrics.jsonl`` records after that iteration are dropped and TensorBoard hides the events
  after it (``purge_step``), since they belong to steps the run does again.
* A fresh start (no ``--load``) into a directory that holds checkpoints, metrics or events is
  refused in one line that names the ways out: ``--load``, another directory, or ``--overwrite``.
* ``--overwrite`` removes exactly those: every checkpoint, the metrics file and the TensorBoard
  event files, before the new run starts, after its configuration was checked and its data and
  model were built. Nothing else (the data cache, launcher logs, plots, other files) is touched.

Which checkpoint a run starts from is decided in one place, ``checkpointing.resolve_start``.
"""

from __future__ import annotations

import argparse
import os

from megatron_mile.checkpointing import CheckpointError, StartPlan, remove_checkpoints, resolve_start

EVENT_FILE_PREFIX = "events.out.tfevents."


def output_root(args: argparse.Namespace) -> str | None:
    """The directory the metrics file and TensorBoard events default into."""
    return args.save or args.load


def metrics_file(args: argparse.Namespace) -> str | None:
    root = output_root(args)
    return args.metrics_file or (os.path.join(root, "metrics.jsonl") if root else None)


def tensorboard_dir(args: argparse.Namespace) -> str | None:
    root = output_root(args)
    return args.tensorboard_dir or (os.path.join(root, "tensorboard") if root else None)


def _event_files(directory: str | None) -> list[str]:
    if not directory or not os.path.isdir(directory):
        return []
    return sorted(os.path.join(parent, name) for parent, _, names in os.walk(directory)
                  for name in names if name.startswith(EVENT_FILE_PREFIX))


def earlier_logs(args: argparse.Namespace) -> list[str]:
    """The metrics file (when not empty) and TensorBoard directory (when it holds events) of an earlier run."""
    found = []
    path = metrics_file(args)
    if path and os.path.isfile(path) and os.path.getsize(path) > 0:
        found.append(path)
    if _event_files(tensorboard_dir(args)):
        found.append(tensorboard_dir(args))
    return found


def plan_start(args: argparse.Namespace) -> StartPlan:
    """``resolve_start``, plus the refusal to start a fresh run on top of an earlier run's logs."""
    plan = resolve_start(args)
    logs = earlier_logs(args)
    if logs and not plan.resume and not plan.overwrite:
        resume = f"resume with --load {args.save}, or pass a new --save directory" if args.save else \
            "pass another --metrics-file / --tensorboard-dir"
        raise CheckpointError(f"{' and '.join(logs)} already hold an earlier run's metrics; {resume} or --overwrite")
    return plan


def remove_earlier_run(args: argparse.Namespace) -> str | None:
    """``--overwrite``: delete the earlier run's checkpoints, metrics file and TensorBoard events.

    Call on one rank only, before anything of the new run is written. Returns a one-line
    summary, or None when there was nothing to remove.
    """
    removed = remove_checkpoints(args.save) if args.save and os.path.isdir(args.save) else []
    path = metrics_file(args)
    if path and os.path.isfile(path):
        os.remove(path)
        removed.append(os.path.basename(path))
    events = _event_files(tensorboard_dir(args))
    for event_file in events:
        os.remove(event_file)
    if events:
        removed.append(f"{len(events)} TensorBoard event file(s)")
    if not removed:
        return None
    return f"--overwrite: removed {', '.join(removed)} from {args.save or 'the metrics and TensorBoard paths'}"
