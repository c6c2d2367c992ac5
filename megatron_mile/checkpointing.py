"""Checkpoints through megatron-core ``dist_checkpointing``, saved atomically.

Layout of ``--save``::

    latest_checkpointed_iteration.txt   # the last *complete* checkpoint
    iter_0000100/                       # dist_checkpointing directory
    iter_0000200.tmp/                   # a save in progress (or one killed mid-way)

A checkpoint holds the model as sharded tensors (so it loads at another TP/PP layout), the
optimizer state in one of the formats below, and, as common state, that format, the
scheduler, the iteration, the consumed samples, the true vocabulary size and the layout it
was saved at. Per-rank RNG states are sharded objects; they are restored only when the
layout is unchanged.

Optimizer formats: ``plain`` (megatron-core's regular optimizers) reshards like the model.
The distributed optimizer saves ``dp_reshardable`` by default (Megatron-LM's default: every
rank writes its own flat shards, no gather; it reloads at the same TP/PP, any DP), or
``fully_reshardable`` with ``--dist-ckpt-optim-fully-reshardable`` (gathered into
per-parameter tensors over DP, so it reloads at any layout). ``--no-load-optim`` restores
everything but the optimizer state, for a layout the saved format cannot reach.

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
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_mile.optim import fused_adam_available

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


def saved_optimizer_format(root: str) -> str | None:
    """The optimizer format of the latest complete checkpoint under ``root`` (None: none yet)."""
    iteration = latest_iteration(root)
    if iteration is None or not os.path.isdir(checkpoint_dir(root, iteration)):
        return None
    return dist_checkpointing.load_common_state_dict(checkpoint_dir(root, iteration)).get("optimizer_format", "plain")


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


def _optimizers(optimizer: MegatronOptimizer) -> list[MegatronOptimizer]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_format(optimizer: MegatronOptimizer, fully_reshardable: bool) -> str:
    if any(isinstance(opt, DistributedOptimizer) for opt in _optimizers(optimizer)):
        return "fully_reshardable" if fully_reshardable else "dp_reshardable"
    return "plain"


def _sharded_state(chunks: list[torch.nn.Module], optimizer: MegatronOptimizer | None, optim_format: str,
                   is_loading: bool) -> dict[str, Any]:
    # Chunk dicts share local key names, so they stay nested (the sharded keys inside are global).
    state: dict[str, Any] = {f"model{index}": chunk.sharded_state_dict() for index, chunk in enumerate(chunks)}
    if optimizer is not None:
        metadata = {} if optim_format == "plain" else {"distrib_optim_sharding_type": optim_format}
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading, metadata=metadata)
    return state


# megatron-core 0.16.1's DistributedOptimizer assumes apex/TE's FusedAdam, which keeps
# Adam's step in the param groups. Without them (any CPU, or a GPU without TE) it wraps
# torch's Adam, which keeps a per-parameter "step" tensor, and two things break on load:
# state_dict() asserts that a step exists (none does before the first step), and
# load_state_dict() hands every parameter one shared step tensor that the param-state
# copy then overwrites with the template's value.
def _is_distributed_torch_adam(optimizer: MegatronOptimizer) -> bool:
    return not fused_adam_available() and isinstance(optimizer, DistributedOptimizer)


def _materialize_adam_state(optimizer: MegatronOptimizer) -> None:
    for opt in _optimizers(optimizer):
        if _is_distributed_torch_adam(opt) and not opt.optimizer.state:
            # megatron's own initialiser: one zero-grad step at the scheduler's lr, which
            # the load then overwrites.
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer: MegatronOptimizer, loaded: dict[str, Any]) -> None:
    opts = _optimizers(optimizer)
    states = [loaded] if len(opts) == 1 else [loaded[i] for i in range(len(opts))]
    for opt, state in zip(opts, states):
        if not _is_distributed_torch_adam(opt):
            continue
        (step,) = {group["step"] for group in state["optimizer"]["param_groups"]}
        for param_state in opt.optimizer.state.values():
            param_state["step"] = torch.tensor(float(step))


def save_checkpoint(root: str, chunks: list[torch.nn.Module], optimizer: MegatronOptimizer, scheduler,
                    train_state: TrainingState, vocab_size: int, run_args: dict[str, Any],
                    fully_reshardable: bool = False) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    final = checkpoint_dir(root, train_state.iteration)
    staging = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        # A leftover from a save that was killed at this same iteration.
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    optim_format = optimizer_format(optimizer, fully_reshardable)
    state = _sharded_state(chunks, optimizer, optim_format, is_loading=False)
    state["rng_state"] = _rng_state()
    state.update(scheduler=scheduler.state_dict(), optimizer_format=optim_format, iteration=train_state.iteration,
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


def load_checkpoint(root: str, chunks: list[torch.nn.Module], optimizer: MegatronOptimizer, scheduler,
                    vocab_size: int, load_optimizer: bool = True) -> TrainingState | None:
    """Restore the latest complete checkpoint under ``root``; None when there is none yet.

    With ``load_optimizer=False`` the optimizer keeps its fresh state, its main params
    re-read from the loaded model.
    """
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
    saved_format = common.get("optimizer_format", "plain")
    if load_optimizer:
        _check_optimizer_format(path, saved_format, optimizer_format(optimizer, False), common["layout"])
        _materialize_adam_state(optimizer)
    state = _sharded_state(chunks, optimizer if load_optimizer else None, saved_format, is_loading=True)
    if same_layout:
        state["rng_state"] = _rng_state()
    loaded = dist_checkpointing.load(state, path)
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{index}"])
    if load_optimizer:
        # No autograd here: fp32 params' distributed-optimizer shards are views of leaf params.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, loaded["optimizer"])
    else:
        optimizer.reload_model_params()
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _restore_rng(loaded["rng_state"])
    else:
        log.info("checkpoint layout %s differs from this run's %s: RNG states start fresh",
                 common["layout"], _layout())
    return TrainingState(iteration=loaded["iteration"], consumed_samples=loaded["consumed_samples"])


def _check_optimizer_format(path: str, saved: str, this_run: str, saved_layout: dict[str, int]) -> None:
    """Refuse, in one line, optimizer state this run cannot read."""
    saved_plain, this_plain = saved == "plain", this_run == "plain"
    if saved_plain != this_plain:
        wanted = "--no-distributed-optimizer" if saved_plain else "--use-distributed-optimizer"
        raise CheckpointError(f"checkpoint {path} holds {saved} optimizer state; resume with {wanted}, "
                              "or pass --no-load-optim")
    if saved == "fully_reshardable" and not fused_adam_available():
        raise CheckpointError(f"checkpoint {path} holds fully_reshardable optimizer state, which megatron-core "
                              "0.16.1 loads only into apex/Transformer Engine's FusedAdam; pass --no-load-optim")
    if saved == "dp_reshardable" and saved_layout != _layout():
        raise CheckpointError(f"checkpoint {path} holds dp_reshardable optimizer state saved at "
                              f"TP {saved_layout['tp']} PP {saved_layout['pp']}, which loads only at that TP/PP; "
                              "pass --no-load-optim, or save with --dist-ckpt-optim-fully-reshardable")
