"""Data-parallel wrapping, optimizer and LR schedule, all from megatron-core.

The paper's recipe: Adam(W) with betas (0.9, 0.95), weight decay 0.1 except on norms and
biases (megatron-core's default parameter groups skip every 1-D tensor), cosine decay
after linear warm-up, gradient clipping at 1.0, bf16 with fp32 main weights.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, distrib_optimizer, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig

from megatron_mile import multi_tensor


@dataclass(frozen=True)
class OptimSettings:
    """A run's optimizer and schedule flags; their defaults live in ``megatron_mile.arguments``."""

    lr: float
    min_lr: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    clip_grad: float
    lr_warmup_iters: int
    lr_decay_iters: int | None  # None: the run's train iterations
    lr_decay_style: str
    use_distributed_optimizer: bool  # resolved: the flag may be unset (see choose_distributed_optimizer)

    @classmethod
    def from_args(cls, args: argparse.Namespace, use_distributed_optimizer: bool) -> OptimSettings:
        flags = {f.name: getattr(args, f.name) for f in fields(cls) if f.name != "use_distributed_optimizer"}
        return cls(**flags, use_distributed_optimizer=use_distributed_optimizer)


def wrap_data_parallel(config: TransformerConfig, chunks: list[torch.nn.Module], settings: OptimSettings,
                       ) -> list[DistributedDataParallel]:
    """megatron-core DDP with contiguous fp32 grad buffers, bucketed reduction overlapped with
    the backward pass, and reduce-scatter into the distributed optimizer's shards."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=True,
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


def adam_implementation() -> str:
    return "apex/Transformer Engine FusedAdam" if fused_adam_available() else "torch fused AdamW (no apex or Transformer Engine)"


def build_optimizer(model: list[DistributedDataParallel], settings: OptimSettings, bf16: bool) -> MegatronOptimizer:
    multi_tensor.install()  # before megatron-core's first grad norm: its fallback waits on the GPU per tensor
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
    optimizer = get_megatron_optimizer(config, model)
    _use_fused_torch_adam(optimizer)
    return optimizer


def _use_fused_torch_adam(optimizer: MegatronOptimizer) -> None:
    """Without apex or Transformer Engine megatron-core builds torch's AdamW with torch's default
    implementation: one tensor at a time on CPU, a chain of multi-tensor kernels on CUDA. torch's
    fused kernel makes the same update in one pass over the state (on a 2-core CPU, 5.3M
    parameters: 2.8 ms against 12.3 ms a step; on one GPU it is the kernel Hugging Face's
    Trainer uses).

    Set on the param groups, which checkpoints keep: a resumed run loads its step counters where
    the fused kernel wants them (on the parameters' device), and a checkpoint saved without the
    flag resumes without it.
    """
    for part in component_optimizers(optimizer):
        if type(part.optimizer) is torch.optim.AdamW:
            for group in part.optimizer.param_groups:
                group.update(fused=True, foreach=False)


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


def component_optimizers(optimizer: MegatronOptimizer) -> list[MegatronOptimizer]:
    """The optimizers inside megatron-core's ``ChainedOptimizer`` (or just this one)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


@torch.no_grad()
def step_if_finite(optimizer: MegatronOptimizer, loss_stats: torch.Tensor) -> float | None:
    """Clip and step when the loss statistics and the grad norm are finite; else leave everything untouched.

    Returns the grad norm (before clipping), or None for a skipped step. megatron-core's
    ``optimizer.step()`` would already have updated Adam's moments (and applied weight decay)
    by the time its caller sees an infinite norm, so the step is taken apart into its own
    pieces: ``prepare_grads`` (grads into the main params), the grad norm, and only when
    that is finite the clipping and ``step_with_ready_grads``. A skipped step leaves the
    parameters and the optimizer state exactly as they were.

    ``loss_stats`` (the step's loss statistics, still on the device; zeros on stages without
    the loss) rides in the norm's all-reduce as one more element, :math:`0 \cdot \sum_k s_k`,
    which is 0, or NaN when any :math:`s_k` is infinite or NaN. So the whole check costs the
    norm's own all-reduce and its one host sync, and no per-gradient temporary.
    Every rank gets the same norm: the all-reduce group (the world for the distributed
    optimizer; one data-parallel replica's model-parallel group for the regular one, whose
    grads and loss statistics are the same on every replica) always holds a last pipeline
    stage, where the loss lives.
    """
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    if optimizer.prepare_grads():  # an fp16 loss scaler found inf/NaN; never so without one
        return None
    parts = component_optimizers(optimizer)
    grads = [grad for part in parts for grad in part.get_main_grads_for_grad_norm()]
    grads.append((loss_stats.sum() * 0).float().reshape(1))
    # Looked up at call time: the CPU layer (megatron_mile.runtime) replaces these two.
    grad_norm = clip_grads.get_grad_norm_fp32(grads,
                                              grad_stats_parallel_group=optimizer.get_grad_stats_parallel_group())
    if not math.isfinite(grad_norm):
        return None
    for part in parts:
        params = part.get_parameters()
        if part.config.clip_grad > 0.0 and params:
            mcore_optimizer.clip_grad_by_total_norm_fp32(
                params, max_norm=part.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    optimizer.step_with_ready_grads()
    return grad_norm
