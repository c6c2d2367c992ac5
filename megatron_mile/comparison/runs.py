"""The training runs of a comparison: one per loss and seed, the trainer under torchrun
(``megatron_mile.launch``), resumable.

Every run gets the same trainer arguments (data, model, budget, schedule) and differs only in
``--loss`` and ``--seed``; its layout (``tp``, ``pp`` or ``dp`` over ``--nproc-per-node``
processes) may differ per loss, which changes no result (the trainer's initialisation and
losses are layout invariant). A run lives in ``OUT/runs/<loss>_seed<seed>``, where
``compare_run.json`` records its full trainer command first. A rerun finds one of:

- a finished run (its latest checkpoint is the last iteration): nothing to do;
- an interrupted one: the trainer resumes it from its latest checkpoint with ``--load``;
- a run trained with other arguments: refused before any work, so nothing is overwritten.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from megatron_mile.checkpointing import POINTER, checkpoint_dir, latest_iteration
from megatron_mile.comparison.steps import read_json, write_json

LAYOUTS = {"tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size", "dp": None}
# Flags a comparison sets per run: they may not come with the shared trainer arguments.
OWN_FLAGS = ("--loss", "--mile-gamma", "--seed", "--save", "--load", "--data-path", "--tokenizer-model",
             "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--metrics-file")
RUN_FILE = "compare_run.json"


class ComparisonError(ValueError):
    """Bad input for a comparison; the message is one line naming the flag, file or run."""


class TrainingFailed(RuntimeError):
    """The trainer stopped with an error; it printed its own message above this one line."""


@dataclass(frozen=True)
class RunSpec:
    loss: str
    seed: int
    layout: str  # a key of LAYOUTS

    @property
    def label(self) -> str:
        return f"{self.loss}_seed{self.seed}"


def trainer_argv(spec: RunSpec, run_dir: str, data_path: Sequence[str], tokenizer_model: str, gamma: float,
                 nproc: int, shared: Sequence[str]) -> list[str]:
    """The trainer's arguments for one run (without ``--load``)."""
    layout = [LAYOUTS[spec.layout], str(nproc)] if LAYOUTS[spec.layout] and nproc > 1 else []
    return ["--data-path", *data_path, "--tokenizer-model", tokenizer_model, "--loss", spec.loss,
            "--mile-gamma", str(gamma), "--seed", str(spec.seed), *layout, *shared, "--save", run_dir]


def check_trainer_argv(argv: list[str], nproc: int) -> argparse.Namespace:
    """The trainer's own parsing and checks, and what a comparison needs: a final evaluation."""
    from megatron_mile.arguments import ConfigError, build_parser, validate

    def refuse(message: str):
        raise ComparisonError(f"trainer arguments: {message}")

    parser = build_parser()
    parser.error = refuse  # argparse's usage + message + exit would bypass the one-line error
    args = parser.parse_args(argv)
    try:
        validate(args, world_size=nproc)
    except ConfigError as err:
        refuse(str(err))
    if args.train_iters % args.eval_interval:
        raise ComparisonError(f"trainer arguments: --eval-interval {args.eval_interval} does not divide --train-iters "
                              f"{args.train_iters}; the comparison reads the evaluation at the last iteration")
    return args


def check_shared_flags(shared: Sequence[str]) -> None:
    for flag in OWN_FLAGS:
        if any(arg == flag or arg.startswith(flag + "=") for arg in shared):
            raise ComparisonError(f"trainer arguments: {flag} is set per run by the comparison; leave it out")


def _first_difference(old: list[str], new: list[str]) -> str:
    """The first flag whose values differ between two trainer commands, for a one-line message."""

    def flags(argv: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        current = ""
        for arg in argv:
            if arg.startswith("--"):
                current = arg
                out[current] = []
            else:
                out.setdefault(current, []).append(arg)
        return out

    a, b = flags(old), flags(new)
    for flag in list(a) + [f for f in b if f not in a]:
        if a.get(flag) != b.get(flag):
            show = lambda v: "absent" if v is None else " ".join([flag, *v])  # noqa: E731
            return f"{show(a.get(flag))} then, {show(b.get(flag))} now"
    return "the same flags in another order"


def check_existing(run_dir: str, argv: list[str]) -> None:
    """A run directory holding a run of other arguments, or anything else, is refused (never overwritten)."""
    recorded = read_json(os.path.join(run_dir, RUN_FILE))
    if recorded is None and os.path.isdir(run_dir) and os.listdir(run_dir):
        raise ComparisonError(f"{run_dir}: not a run of this comparison (no {RUN_FILE}); remove it or choose "
                              "another --output-dir")
    if recorded is not None and recorded["argv"] != argv:
        raise ComparisonError(f"{run_dir}: trained with other arguments ({_first_difference(recorded['argv'], argv)}); "
                              "remove it or choose another --output-dir")


def finished_iteration(run_dir: str) -> Optional[int]:
    """The run's latest complete checkpoint, if any."""
    return latest_iteration(run_dir) if os.path.isfile(os.path.join(run_dir, POINTER)) else None


def checkpoint_key(run_dir: str) -> dict:
    """What evaluations of a run depend on: its latest checkpoint and when that was written."""
    iteration = finished_iteration(run_dir)
    path = checkpoint_dir(run_dir, iteration)
    return {"checkpoint": os.path.abspath(path), "mtime_ns": os.stat(os.path.join(path, "metadata.json")).st_mtime_ns}


def train(spec: RunSpec, run_dir: str, argv: list[str], nproc: int, train_iters: int,
          log: Callable[[str], None] = print, python: str = sys.executable) -> dict:
    """Train (or resume) one run to ``train_iters``; returns its checkpoint key."""
    check_existing(run_dir, argv)
    done = finished_iteration(run_dir) if read_json(os.path.join(run_dir, RUN_FILE)) else None
    command = [python, "-m", "megatron_mile.launch", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megatron_mile.train", *argv]
    if done is None:
        shutil.rmtree(run_dir, ignore_errors=True)  # no checkpoint of these arguments: start afresh
        write_json(os.path.join(run_dir, RUN_FILE), {"argv": argv, "label": spec.label, "layout": spec.layout})
    elif done < train_iters:
        log(f"{spec.label}: resuming from iteration {done}")
        command += ["--load", run_dir]
    if done != train_iters:
        proc = subprocess.run(command, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode:
            raise TrainingFailed(f"{spec.label}: the trainer exited with code {proc.returncode} (its output is above)")
    if finished_iteration(run_dir) != train_iters:
        raise TrainingFailed(f"{spec.label}: the trainer stopped before iteration {train_iters} (see its output above)")
    return checkpoint_key(run_dir)
