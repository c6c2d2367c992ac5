"""Data-parallel wrapping, optimizer and LR schedule, all from megatron-core.

The paper's recipe: Adam(W) with betas (0.9, 0.95), weight decay 0.1 except on norms and
biases (megatron-core's default parameter groups skip every 1-D tensor), cosine decay
after linear warm-up, gradient clipping at 1.0, bf16 with fp32 main weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, distrib_optimizer, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_iters: int = 2000
    lr_decay_iters: int | None = None  # defaults to train iters
    lr_decay_style: str = "cosine"
    use_distributed_optimizer: bool = True  # the resolved choice (choose_distributed_optimizer)
    overlap_grad_reduce: bool = True


def wrap_data_parallel(config: TransformerConfig, chunks: list[torch.nn.Module], settings: OptimSettings,
                       ) -> list[DistributedDataParallel]:
    """megatron-core DDP with contiguous fp32 grad buffers, bucketed reduction overlapped with
    the backward pass, and reduce-scatter into the distributed optimizer's shards."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=settings.overlap_grad_reduce,
        use_distributed_optimizer=settings.use_distributed_optimizer,
        # The training loop checks the loss and the grad norm for NaN/inf itself.
        check_for_nan_in_grad=False,
    )
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                # Only the first chunk's grads are bucketed for overlap (as in Megatron-LM).
                                disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    # The pipeline schedules call these to sync grads once per global batch.
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def choose_distributed_optimizer(requested: bool | None, dp: int, saved_format: str | None,
                                 ) -> tuple[bool, str | None]:
    """Whether to build megatron-core's distributed optimizer, and a line to log when the
    default picked something other than the usual choice for this DP size.

    ``requested`` is the flag (None: neither ``--use-distributed-optimizer`` nor
    ``--no-distributed-optimizer``); an explicit choice is always taken. By default:

    - resuming optimizer state (``saved_format``, the checkpoint's; None when none is loaded)
      takes the optimizer that saved it, since the two save different formats: a DP=1 run's
      regular state resumes at DP=2, distributed state saved at DP=2 resumes at DP=1;
    - otherwise the distributed optimizer when DP > 1. It shards Adam's state and the fp32
      main weights over the data-parallel ranks; at DP=1 it has nothing to shard, yet it
      still all-gathers every parameter after each step, so megatron-core's regular
      optimizer runs instead.
    """
    if requested is not None:
        return requested, None
    if saved_format is not None:
        distributed = saved_format != "plain"
        if distributed == (dp > 1):
            return distributed, None
        kind = "distributed" if distributed else "regular"
        return distributed, f"the checkpoint holds the {kind} optimizer's state: resuming with the {kind} optimizer"
    if dp == 1:
        return False, ("data-parallel size 1: megatron-core's regular optimizer (the distributed one shards over "
                       "data-parallel ranks; --use-distributed-optimizer forces it)")
    return True, None


def fused_adam_available() -> bool:
    """megatron-core uses apex's or Transformer Engine's FusedAdam when either is installed,
    else torch's Adam (always so on CPU)."""
    return distrib_optimizer.HAVE_APEX_OR_TE


def build_optimizer(model: list[DistributedDataParallel], settings: OptimSettings, bf16: bool) -> MegatronOptimizer:
    config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=settings.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, model)


def build_scheduler(optimizer: MegatronOptimizer, settings: OptimSettings, train_iters: int) -> OptimizerParamScheduler:
    """Steps are optimizer steps (one per global batch)."""
    decay_iters = settings.lr_decay_iters or train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=settings.lr,
        min_lr=settings.min_lr,
        lr_warmup_steps=settings.lr_warmup_iters,
        lr_decay_steps=decay_iters,
        lr_decay_style=settings.lr_decay_style,
        start_wd=settings.weight_decay,
        end_wd=settings.weight_decay,
        wd_incr_steps=decay_iters,
        wd_incr_style="constant",
    )
