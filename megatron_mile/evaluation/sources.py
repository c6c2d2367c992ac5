"""What an evaluation command is pointed at: a megatron-mile run directory or a Hugging Face model.

Every evaluation tool takes ``RUN_OR_HF [RUN_OR_HF ...]`` with optional ``--labels``. A *run* is a
training ``--save`` directory (its latest complete checkpoint, or ``--iteration N``) or one
``iter_NNNNNNN`` checkpoint directory; a *Hugging Face* directory has a ``config.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_mile.checkpointing import POINTER, CheckpointError, checkpoint_dir, latest_iteration

RUN = "run"
HF = "hf"
CHECKPOINT_METADATA = "metadata.json"  # dist_checkpointing writes it into every complete checkpoint


class SourceError(ValueError):
    """A path that is not something we can evaluate: one line naming it per bad input."""


@dataclass(frozen=True)
class Source:
    label: str
    path: str  # as given on the command line
    kind: str  # RUN or HF
    checkpoint: Optional[str] = None  # RUN: the iter_NNNNNNN directory
    iteration: Optional[int] = None  # RUN: its iteration


def _is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CHECKPOINT_METADATA))


def _iteration_of(checkpoint: str) -> Optional[int]:
    name = os.path.basename(os.path.normpath(checkpoint))
    return int(name[len("iter_"):]) if name.startswith("iter_") and name[len("iter_"):].isdigit() else None


def resolve_source(path: str, label: str, iteration: Optional[int] = None) -> Source:
    """Classify ``path``; raises ``SourceError`` with one line when it is neither kind."""
    if not os.path.isdir(path):
        raise SourceError(f"{path}: no such directory")
    if _is_checkpoint(path):
        if iteration is not None:
            raise SourceError(f"{path}: --iteration needs the run's --save directory, not one checkpoint")
        return Source(label, path, RUN, path, _iteration_of(path))
    is_run = os.path.isfile(os.path.join(path, POINTER))
    if not is_run and os.path.isfile(os.path.join(path, "config.json")):
        return Source(label, path, HF)  # --iteration applies to the runs among the models
    if is_run or iteration is not None:
        try:
            found = latest_iteration(path) if iteration is None else iteration
        except CheckpointError as err:
            raise SourceError(str(err)) from None
        checkpoint = checkpoint_dir(path, found)
        if not _is_checkpoint(checkpoint):
            raise SourceError(f"{path}: no complete checkpoint at {checkpoint}")
        return Source(label, path, RUN, checkpoint, found)
    raise SourceError(f"{path}: neither a megatron-mile run (no {POINTER}) nor a Hugging Face model "
                      "directory (no config.json)")


def default_labels(paths: Sequence[str]) -> list[str]:
    """The directory names, made unique with their parents where two collide."""
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [os.path.normpath(p) for p in paths]


def resolve_sources(paths: Sequence[str], labels: Optional[Sequence[str]] = None,
                    iteration: Optional[int] = None) -> list[Source]:
    """All sources of one command, checked before any work; labels must be unique.

    Every bad input is reported: the ``SourceError`` holds one line per problem.
    """
    problems = []
    if labels is not None and len(labels) != len(paths):
        problems.append(f"--labels: {len(labels)} labels for {len(paths)} models")
    labels = list(labels) if labels is not None and len(labels) == len(paths) else default_labels(paths)
    if len(set(labels)) != len(labels):
        problems.append(f"--labels: labels must be unique, got {', '.join(labels)}")
    sources = []
    for path, label in zip(paths, labels):
        try:
            sources.append(resolve_source(path, label, iteration))
        except SourceError as err:
            problems.append(str(err))
    if problems:
        raise SourceError("\n".join(problems))
    return sources
