"""Checkpoints through megatron-core ``dist_checkpointing``, saved atomically.

Layout of ``--save``::

    latest_checkpointed_iteration.txt   # the last *complete* checkpoint
    iter_0000100/                       # dist_checkpointing directory
    iter_0000200.tmp/                   # a save in progress (or one killed mid-way)

A checkpoint holds the model and optimizer as sharded tensors (so it loads at another
TP/PP layout), and, as common state, the scheduler, the iteration, the consumed samples,
the true vocabulary size and the layout it was saved at. Per-rank RNG states are
sharded objects; they are restored only when the layout is unchanged.

Atomicity: every rank writes into ``iter_N.tmp``; after a barrier, rank 0 renames it to
``iter_N`` and then replaces the pointer file through a temporary file. A run killed at
any moment leaves the pointer naming the previous complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

log = logging.getLogger(__name__)

POINTER = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used with this run; the message is one line."""


@dataclass
class TrainingState:
    iteration: int = 0
    consumed_samples: int = 0


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> int | None:
    path = os.path.join(root, POINTER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def _layout() -> dict[str, int]:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size()}


def _rng_state() -> ShardedObject:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    layout = _layout()
    return ShardedObject(
        "rng_state", state, (layout["pp"], layout["tp"]),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(),
    )


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(chunks: list[torch.nn.Module], optimizer, is_loading: bool) -> dict[str, Any]:
    # Chunk dicts share local key names, so they stay nested (the sharded keys inside are global).
    state: dict[str, Any] = {f"model{index}": chunk.sharded_state_dict() for index, chunk in enumerate(chunks)}
    state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading)
    return state


def save_checkpoint(root: str, chunks: list[torch.nn.Module], optimizer, scheduler, train_state: TrainingState,
                    vocab_size: int, run_args: dict[str, Any]) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    final = checkpoint_dir(root, train_state.iteration)
    staging = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        # A leftover from a save that was killed at this same iteration.
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    state = _sharded_state(chunks, optimizer, is_loading=False)
    state["rng_state"] = _rng_state()
    state.update(scheduler=scheduler.state_dict(), iteration=train_state.iteration,
                 consumed_samples=train_state.consumed_samples, vocab_size=vocab_size, layout=_layout(),
                 args=run_args)
    dist_checkpointing.save(state, staging)
    dist.barrier()
    if dist.get_rank() == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staging, final)
        pointer_tmp = os.path.join(root, POINTER + ".tmp")
        with open(pointer_tmp, "w") as f:
            f.write(f"{train_state.iteration}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, os.path.join(root, POINTER))
    dist.barrier()
    return final


def load_checkpoint(root: str, chunks: list[torch.nn.Module], optimizer, scheduler, vocab_size: int,
                    ) -> TrainingState | None:
    """Restore the latest complete checkpoint under ``root``; None when there is none yet."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    path = checkpoint_dir(root, iteration)
    if not os.path.isdir(path):
        raise CheckpointError(f"{root}/{POINTER} names iteration {iteration} but {path} is missing")
    common = dist_checkpointing.load_common_state_dict(path)
    if vocab_size > common["vocab_size"]:
        raise CheckpointError(f"--tokenizer-model has {vocab_size} tokens, more than the {common['vocab_size']} "
                              f"of the checkpoint {path}")
    same_layout = common["layout"] == _layout()
    state = _sharded_state(chunks, optimizer, is_loading=True)
    if same_layout:
        state["rng_state"] = _rng_state()
    loaded = dist_checkpointing.load(state, path)
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{index}"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _restore_rng(loaded["rng_state"])
    else:
        log.info("checkpoint layout %s differs from this run's %s: RNG states start fresh",
                 common["layout"], _layout())
    return TrainingState(iteration=loaded["iteration"], consumed_samples=loaded["consumed_samples"])
