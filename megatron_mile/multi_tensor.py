"""The multi-tensor kernels megatron-core's optimizer takes from Transformer Engine or Apex,
as ``torch._foreach`` operations, for machines with neither.

megatron-core's gradient clipping (``optimizer/clip_grads.py``) and mixed-precision optimizer
(``optimizer/optimizer.py``) call two ``amp_C``-style kernels through ``multi_tensor_applier``:

- ``multi_tensor_l2norm``: the global L2 norm of a list of tensors,
  :math:`\\lVert g \\rVert_2 = \\sqrt{\\sum_t \\lVert g_t \\rVert_2^2}`, as a one-element fp32 tensor;
- ``multi_tensor_scale``: ``dst_t = src_t * scale`` for every pair (with scale 1 it is the fp32
  main weights' copy into the bf16 model weights after each step).

Without Transformer Engine or Apex, megatron-core falls back to per-tensor Python loops
(``megatron.core.utils.local_multi_tensor_*``): the norm turns every tensor's norm into a Python
float, which on a GPU waits for the device once per parameter (about 150 times a step for the
468M preset), and the scale launches one kernel per tensor. The versions here keep megatron-core's
call sites and the kernels' signatures, never wait for the device, and launch a handful of
kernels for the whole list. Like megatron-core's fallback (and unlike ``amp_C``) they leave the
no-op flag alone: megatron-core only ever passes a dummy flag for these two.
"""

from __future__ import annotations

import torch


def l2_norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]], per_tensor: bool,
            *args) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``amp_C.multi_tensor_l2norm``: the fp32 norm of ``tensor_lists[0]`` as a whole, shape ``[1]``,
    and with ``per_tensor`` each tensor's norm as well."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    return torch.linalg.vector_norm(norms).reshape(1), norms if per_tensor else None


def scale(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]], factor: float) -> None:
    """``amp_C.multi_tensor_scale``: ``dst = src * factor`` for each pair of ``tensor_lists = [src, dst]``,
    cast to ``dst``'s dtype; in place when the lists hold the same tensors."""
    src, dst = tensor_lists
    if not src:
        return
    if factor == 1.0:
        torch._foreach_copy_(dst, src)
    elif all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, factor)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, factor))


def install() -> None:
    """Put these kernels where megatron-core fell back to its per-tensor loops.

    A no-op where Transformer Engine or Apex supplied the kernels, and idempotent.
    """
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    if clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = l2_norm
    for module in (clip_grads, mcore_optimizer):
        if module.multi_tensor_scale_impl is mcore_utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = scale


def implementation() -> str:
    """Which kernels megatron-core's gradient clipping uses now (the trainer logs it)."""
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is l2_norm:
        return "torch._foreach"
    if clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm:
        return "megatron-core's per-tensor loops"
    return "Transformer Engine or Apex"
