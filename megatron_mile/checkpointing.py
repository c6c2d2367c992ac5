"""Checkpoints through megatron-core ``dist_checkpointing``, saved atomically.

Layout of ``--save``::

    latest_checkpointed_iteration.txt   # the last *complete* checkpoint
    iter_0000100/                       # dist_checkpointing directory
    iter_0000200.tmp/                   # a save in progress (or one killed mid-way)

A checkpoint holds the model as sharded tensors (so it loads at another TP/PP layout), the
optimizer state in one of the formats below, and, as common state, that format, the
scheduler, the iteration, the consumed samples, the true vocabulary size, the layout it
was saved at and the run's arguments (``args``, the architecture among them). Per-rank RNG
states are sharded objects; they are restored only when the layout is unchanged.

A *weights-only* checkpoint (``save_model_weights``, e.g. an imported Hugging Face model)
holds just the model, the vocabulary size, the layout and the arguments, at iteration 0,
with ``weights_only`` set. ``load_model_weights`` reads the model alone from any checkpoint
(``--finetune``, and ``--load`` of a weights-only checkpoint).

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

import argparse
import glob
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
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_mile.optim import component_optimizers, fused_adam_available

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


def saved_vocab_rows(path: str) -> int:
    """The embedding rows stored in the checkpoint at ``path``: the vocabulary with the run's padding."""
    return dist_checkpointing.load_tensors_metadata(path)["embedding.word_embeddings.weight"].global_shape[0]


def find_checkpoint(root: str) -> str | None:
    """The latest complete checkpoint directory under ``root`` (a --save directory); None when there is none yet."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    path = checkpoint_dir(root, iteration)
    if not os.path.isdir(path):
        raise CheckpointError(f"{root}/{POINTER} names iteration {iteration} but {path} is missing")
    return path


def saved_arguments(path: str) -> dict[str, Any]:
    """The arguments saved with the checkpoint directory ``path``."""
    return dist_checkpointing.load_common_state_dict(path)["args"]


def holds_weights_only(root: str) -> bool:
    """Whether the latest checkpoint under ``root`` is a weights-only one (nothing to resume but the model)."""
    path = find_checkpoint(root)
    return path is not None and bool(dist_checkpointing.load_common_state_dict(path).get("weights_only"))


def saved_optimizer_format(root: str) -> str | None:
    """The optimizer format of the latest complete checkpoint under ``root`` (None: none yet)."""
    path = find_checkpoint(root)
    return None if path is None else dist_checkpointing.load_common_state_dict(path).get("optimizer_format", "plain")


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


def optimizer_format(optimizer: MegatronOptimizer, fully_reshardable: bool) -> str:
    if any(isinstance(opt, DistributedOptimizer) for opt in component_optimizers(optimizer)):
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
    for opt in component_optimizers(optimizer):
        if _is_distributed_torch_adam(opt) and not opt.optimizer.state:
            # megatron's own initialiser: one zero-grad step at the scheduler's lr, which
            # the load then overwrites.
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer: MegatronOptimizer, loaded: dict[str, Any]) -> None:
    opts = component_optimizers(optimizer)
    states = [loaded] if len(opts) == 1 else [loaded[i] for i in range(len(opts))]
    for opt, state in zip(opts, states):
        if not _is_distributed_torch_adam(opt):
            continue
        (step,) = {group["step"] for group in state["optimizer"]["param_groups"]}
        for param_state in opt.optimizer.state.values():
            # Where the load put it: on the parameter's device for the fused kernel, else on the CPU.
            param_state["step"] = torch.full_like(param_state["step"], float(step))


def save_checkpoint(root: str, chunks: list[torch.nn.Module], optimizer: MegatronOptimizer, scheduler,
                    train_state: TrainingState, vocab_size: int, run_args: dict[str, Any],
                    fully_reshardable: bool = False) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    optim_format = optimizer_format(optimizer, fully_reshardable)
    state = _sharded_state(chunks, optimizer, optim_format, is_loading=False)
    state["rng_state"] = _rng_state()
    state.update(scheduler=scheduler.state_dict(), optimizer_format=optim_format, iteration=train_state.iteration,
                 consumed_samples=train_state.consumed_samples, vocab_size=vocab_size, layout=_layout(),
                 args=run_args)
    return _save_atomically(root, train_state.iteration, state)


def save_model_weights(root: str, chunks: list[torch.nn.Module], vocab_size: int, run_args: dict[str, Any]) -> str:
    """Collective: a weights-only checkpoint at iteration 0 (see the module docstring)."""
    state = _sharded_state(chunks, None, "plain", is_loading=False)
    state.update(weights_only=True, iteration=0, vocab_size=vocab_size, layout=_layout(), args=run_args)
    return _save_atomically(root, 0, state)


def _save_atomically(root: str, iteration: int, state: dict[str, Any]) -> str:
    """Write ``iter_N.tmp``, rename it to ``iter_N``, then move the pointer (see the module docstring)."""
    final = checkpoint_dir(root, iteration)
    staging = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        # A leftover from a save that was killed at this same iteration.
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    dist_checkpointing.save(state, staging)
    dist.barrier()
    if dist.get_rank() == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staging, final)
        pointer_tmp = os.path.join(root, POINTER + ".tmp")
        with open(pointer_tmp, "w") as f:
            f.write(f"{iteration}\n")
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
    path = find_checkpoint(root)
    if path is None:
        return None
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


def load_model_weights(path: str, chunks: list[torch.nn.Module], vocab_size: int) -> dict[str, Any]:
    """Load only the model of the checkpoint directory ``path`` (an ``iter_N`` directory) into ``chunks``.

    Collective. ``chunks`` may be built at any TP/PP/VP layout: ``dist_checkpointing`` reshards the
    saved tensors into it (the vocabulary rows included, whatever padding either layout uses).
    Nothing else is read: no optimizer, scheduler or RNG state. Returns the checkpoint's common
    state (``args``, ``vocab_size``, ``layout``, ``iteration``, ...).
    """
    common = dist_checkpointing.load_common_state_dict(path)
    if vocab_size > common["vocab_size"]:
        raise CheckpointError(f"the tokenizer has {vocab_size} tokens, more than the {common['vocab_size']} of the "
                              f"checkpoint {path}")
    # RAISE_UNEXPECTED: a model that asks for a tensor the checkpoint lacks is the wrong model.
    loaded = dist_checkpointing.load(_sharded_state(chunks, None, "plain", is_loading=True), path,
                                     strict=StrictHandling.RAISE_UNEXPECTED)
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{index}"])
    return common


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


# ------------------------------------------------------------------------- where a run starts


@dataclass(frozen=True)
class StartPlan:
    """Where a run starts, decided before any process group exists (see ``resolve_start``)."""

    resume: bool  # the run continues the run saved in --load (possibly from iteration 0)
    load: str | None  # the checkpoint root to load, None for fresh weights
    iteration: int  # the iteration the run starts after: the checkpoint's, or 0
    overwrite: bool  # --overwrite: an earlier run in --save is removed first
    notice: str | None = None  # one line for the log
    weights_only: bool = False  # load the model weights alone and start at iteration 0 (--finetune, or an import)


def _same_directory(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def resolve_start(args: argparse.Namespace) -> StartPlan:
    """Decide from ``--load``/``--save`` which checkpoint the run starts from; never a silent restart.

    Reads the filesystem only, so every rank and ``--check-config`` can call it before any
    process group exists. Raises ``CheckpointError`` (one line) when the flags would lose work.

    * ``--load X`` with a checkpoint (a ``latest_checkpointed_iteration.txt``): resume the latest.
    * ``--load X`` without one: start from iteration 0 with the notice "no checkpoint in X;
      starting from iteration 0" when X is also ``--save`` (the cluster habit ``--save X --load X``
      on its first run) or with ``--load-optional``; an error otherwise, since it is most likely
      a wrong path. ``--exit-on-missing-checkpoint`` makes it an error in every case. (Megatron-LM
      starts from scratch with a warning unless ``--exit-on-missing-checkpoint`` is given.)
    * A ``--save`` directory that holds checkpoints must be the one resumed (``--load`` the same
      directory), or be cleared with ``--overwrite``; otherwise its run would be overwritten step
      by step and its pointer moved back.
    * ``--finetune`` (Megatron-LM's name) starts a new run at iteration 0 from the model weights of
      the latest checkpoint in ``--load``, which must exist, into another ``--save`` directory. A
      weights-only checkpoint (``convert_from_hf.py``'s) is always loaded that way.
    """
    save, load = args.save, args.load
    load_is_save = bool(load and save and _same_directory(load, save))
    if args.overwrite and load_is_save:
        raise CheckpointError(f"--overwrite would remove the checkpoints that --load {load} resumes; pass only one of them")
    if args.finetune and load_is_save:
        raise CheckpointError(f"--finetune starts a new run from the weights in --load {load}; pass another --save "
                              "directory")
    iteration, notice = None, None
    if load:
        iteration = latest_iteration(load)
        if iteration is None and args.finetune:
            raise CheckpointError(f"--finetune: no checkpoint in {load}")
        if iteration is None:
            missing = f"no checkpoint in {load}"
            if args.exit_on_missing_checkpoint:
                raise CheckpointError(f"{missing} (--exit-on-missing-checkpoint)")
            if not (load_is_save or args.load_optional):
                raise CheckpointError(f"{missing}; check --load, or pass --load-optional to start from iteration 0")
            notice = f"{missing}; starting from iteration 0"
    if save and not load_is_save and not args.overwrite:
        earlier = latest_iteration(save)
        if earlier is not None:
            raise CheckpointError(f"--save {save} already holds checkpoints (latest: iteration {earlier}); resume "
                                  f"with --load {save}, or pass a new --save directory or --overwrite")
    # Weights-only checkpoints (convert_from_hf.py's) are saved at iteration 0, where training never saves.
    weights_only = iteration is not None and (args.finetune or (iteration == 0 and holds_weights_only(load)))
    return StartPlan(resume=load is not None and not args.finetune, load=load if iteration is not None else None,
                     iteration=0 if weights_only else iteration or 0, overwrite=args.overwrite, notice=notice,
                     weights_only=weights_only)


def remove_checkpoints(root: str) -> list[str]:
    """Delete every checkpoint under ``root`` (complete, staging, and the pointer); returns what went."""
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(root), "iter_[0-9]*"))) + \
            [os.path.join(root, POINTER), os.path.join(root, POINTER + ".tmp")]:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        else:
            continue
        removed.append(os.path.basename(path))
    return removed
