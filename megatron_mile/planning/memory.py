"""Per-GPU memory of a layout: weights, gradient buffers, optimizer state, activations, logits.

Weights, gradients and optimizer state are what megatron-core allocates for bf16 training
with ``megatron_mile.optim`` (checked element for element against megatron-core on CPU in
tests/test_plan.py):

- **weights**, bf16: this rank's TP/PP shard of every parameter (the embedding on the first
  pipeline stage, the final norm and the untied output layer on the last, padded vocabulary
  ``V_padded = ceil(V / (128·t))·128·t`` rows split over TP). With the distributed optimizer
  megatron-core DDP moves them into one contiguous bf16 buffer per model chunk, padded as
  the gradient buffer below; without it they stay where they are, unpadded.
- **gradients**, fp32 (``grad_reduce_in_fp32=True``): one contiguous buffer per model chunk.
  With the distributed optimizer it is padded (``_ParamAndGradBuffer``): walking the
  parameters in reverse order, each parameter starts at a multiple of 64 elements, a bucket
  closes once it holds ``bucket_size`` elements, and each bucket ends at a multiple of
  ``lcm(DP, 128)``. ``bucket_size`` is megatron-core's default ``max(4e7, 1e6·DP)`` with
  ``overlap_grad_reduce`` for the first model chunk of pipeline rank 0; every other chunk
  (other pipeline ranks, other virtual stages) is one bucket. Without the distributed
  optimizer nothing is padded.
- **optimizer state**, fp32: main weights, Adam's exp_avg and exp_avg_sq, 12 bytes an
  element. The regular optimizer keeps them for every parameter of the rank; the
  distributed optimizer keeps them for the rank's shard of each bucket (bucket size / DP
  elements, less any padding that falls inside it; padding is never allocated). Torch's
  per-parameter step counter (a 0-d tensor) is not counted.

Activations and logits follow ``megatron_mile.planning.activations``.

**Not modelled** (hence the planner's ``--memory-margin``): the CUDA context and NCCL's
buffers (outside PyTorch's allocator), allocator fragmentation, and transient tensors
(activation gradients during the backward, the bf16 weight gradient of a layer before it is
added into the fp32 buffer, all-gathered sequence-parallel inputs, GEMM workspaces, the
loss's fp32 working chunks), and fp32 per-token statistics (norms, the loss: ≤ 24 bytes a
token). With megatron-core's local attention the persistent ``[b·a/t, s, s]`` bf16 score
buffer that the attention GEMM takes as input is counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from megatron_mile.model import padded_vocab_size
from megatron_mile.planning.activations import (ACTIVATION_BYTES, LLAMA, Block, in_flight_chunk_forwards,
                                                layer_activation_terms)
from megatron_mile.planning.layout import Layout, ModelSpec

WEIGHT_BYTES = 2  # bf16
GRAD_BYTES = 4  # fp32 grad buffers
OPTIMIZER_BYTES = 12  # fp32 main weight + exp_avg + exp_avg_sq
GIB = 2**30


def default_bucket_size(dp: int) -> int:
    """megatron-core DDP's bucket size when ``overlap_grad_reduce`` is on (optim.wrap_data_parallel)."""
    return max(40_000_000, 1_000_000 * dp)


def chunk_parameter_numels(spec: ModelSpec, tp: int, pp: int, vp: int, pp_rank: int, chunk: int) -> list[int]:
    """Elements of this rank's parameters of one model chunk, in ``named_parameters`` order
    (megatron-core's local layer spec: input norm, attention projection, QKV, MLP norm, fc1, fc2)."""
    shape = spec.shape
    h, f = shape.hidden_size, shape.ffn_hidden_size
    qkv_rows = h + 2 * spec.query_groups * spec.kv_channels
    layer = [h, h * h // tp, qkv_rows * h // tp, h, 2 * f * h // tp, f * h // tp]
    vocab_rows = padded_vocab_size(spec.vocab_size, tp) // tp
    numels = []
    if pp_rank == 0 and chunk == 0:
        numels.append(vocab_rows * h)
    numels += layer * (shape.num_layers // (pp * vp))
    if pp_rank == pp - 1 and chunk == vp - 1:
        numels += [h, vocab_rows * h]
    return numels


@dataclass(frozen=True)
class GradBuffer:
    """megatron-core's contiguous gradient buffer of one model chunk (see the module docstring)."""

    numel: int
    buckets: tuple[tuple[int, int], ...]  # [start, end) of each bucket, in creation order
    param_ranges: tuple[tuple[int, int], ...]  # [start, end) of each parameter

    def shard_numel(self, dp: int, dp_rank: int) -> int:
        """Parameter elements inside this DP rank's shard of every bucket (distributed optimizer)."""
        total = 0
        for start, end in self.buckets:
            size = (end - start) // dp
            lo, hi = start + dp_rank * size, start + (dp_rank + 1) * size
            total += sum(max(0, min(hi, pe) - max(lo, ps)) for ps, pe in self.param_ranges)
        return total


def grad_buffer(numels: tuple[int, ...], dp: int, distributed_optimizer: bool, bucket_size: int | None) -> GradBuffer:
    def pad(value: int, multiple: int) -> int:
        return -(-value // multiple) * multiple

    end_multiple = math.lcm(dp, 128)
    buckets, ranges = [], []
    bucket_start = position = 0
    end = 0
    for numel in reversed(numels):  # megatron-core lays parameters out in reverse (backward) order
        start = pad(position, 64) if distributed_optimizer else position
        end = start + numel
        ranges.append((start, end))
        position = end
        if bucket_size is not None and end - bucket_start >= bucket_size:
            bucket_end = pad(end, end_multiple) if distributed_optimizer else end
            buckets.append((bucket_start, bucket_end))
            bucket_start = position = bucket_end
    if position > bucket_start:
        bucket_end = pad(end, end_multiple) if distributed_optimizer else end
        buckets.append((bucket_start, bucket_end))
        position = bucket_end
    return GradBuffer(position, tuple(buckets), tuple(ranges))


@dataclass(frozen=True)
class RankBuffers:
    """One rank's gradient buffers over all its model chunks, in elements."""

    padded: int  # the buffers' size (also the bf16 weight buffer's with the distributed optimizer)
    unpadded: int  # parameter elements
    owned: int  # elements whose optimizer state this rank keeps
    buckets: int
    last_bucket: int  # the bucket reduced last: first chunk, first parameters


@lru_cache(maxsize=None)
def rank_buffers(spec: ModelSpec, tp: int, pp: int, vp: int, dp: int, distributed_optimizer: bool, pp_rank: int,
                 dp_rank: int = 0, bucket_size: int | None = None) -> RankBuffers:
    """The gradient buffers of pipeline rank ``pp_rank``'s model chunks; optimizer state of ``dp_rank``."""
    buffers = []
    for chunk in range(vp):
        numels = tuple(chunk_parameter_numels(spec, tp, pp, vp, pp_rank, chunk))
        bucketed = pp_rank == 0 and chunk == 0
        size = (bucket_size or default_bucket_size(dp)) if bucketed else None
        buffers.append(grad_buffer(numels, dp, distributed_optimizer, size))
    unpadded = sum(end - start for b in buffers for start, end in b.param_ranges)
    owned = sum(b.shard_numel(dp, dp_rank) for b in buffers) if distributed_optimizer else unpadded
    start, end = buffers[0].buckets[-1]
    return RankBuffers(sum(b.numel for b in buffers), unpadded, owned, sum(len(b.buckets) for b in buffers),
                       end - start)


def layout_buffers(spec: ModelSpec, layout: Layout, pp_rank: int, dp_rank: int = 0,
                   bucket_size: int | None = None) -> RankBuffers:
    return rank_buffers(spec, layout.tp, layout.pp, layout.vp, layout.dp, layout.distributed_optimizer, pp_rank,
                        dp_rank, bucket_size)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU on one pipeline rank (the planner reports the larger of the first and last)."""

    pp_rank: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def as_gib(self) -> dict[str, float]:
        return {"pp_rank": self.pp_rank, **{k: getattr(self, k) / GIB for k in
                                           ("weights", "gradients", "optimizer", "activations", "logits", "total")}}


def static_memory(spec: ModelSpec, layout: Layout, pp_rank: int, dp_rank: int = 0,
                  bucket_size: int | None = None) -> tuple[int, int, int]:
    """(weight, gradient, optimizer-state) bytes of one rank, exactly as megatron-core allocates them."""
    buffers = layout_buffers(spec, layout, pp_rank, dp_rank, bucket_size)
    weights = buffers.padded if layout.distributed_optimizer else buffers.unpadded
    return weights * WEIGHT_BYTES, buffers.padded * GRAD_BYTES, buffers.owned * OPTIMIZER_BYTES


def activation_memory(spec: ModelSpec, layout: Layout, pp_rank: int, block: Block = LLAMA) -> tuple[float, float]:
    """(activation, logits) bytes of one pipeline rank at its peak."""
    shape = spec.shape
    s, b, h, t = shape.seq_length, layout.micro_batch_size, shape.hidden_size, layout.tp
    r = t if layout.sequence_parallel else 1

    def layer(recompute: str) -> float:
        return sum(layer_activation_terms(s, b, h, shape.num_attention_heads, spec.query_groups,
                                          shape.ffn_hidden_size, t, sequence_parallel=layout.sequence_parallel,
                                          recompute=recompute, block=block).values())

    layers_per_chunk = shape.num_layers // (layout.pp * layout.vp)
    chunks = in_flight_chunk_forwards(layout.pp, layout.vp, layout.num_microbatches, pp_rank)
    activations = chunks * layers_per_chunk * layer(layout.recompute)
    if layout.recompute == "full":
        activations += layer("none")  # the layer being recomputed
    if block.attention == "local":
        activations += ACTIVATION_BYTES * b * shape.num_attention_heads * s * s / t  # GEMM input buffer
    logits = 0.0
    if pp_rank == layout.pp - 1:
        activations += 2 * (ACTIVATION_BYTES * s * b * h / r)  # final norm input, output layer input
        logits = ACTIVATION_BYTES * s * b * padded_vocab_size(spec.vocab_size, t) / t
    return activations, logits


def stage_memory(spec: ModelSpec, layout: Layout, pp_rank: int, block: Block = LLAMA, dp_rank: int = 0,
                 bucket_size: int | None = None) -> MemoryEstimate:
    weights, gradients, optimizer = static_memory(spec, layout, pp_rank, dp_rank, bucket_size)
    activations, logits = activation_memory(spec, layout, pp_rank, block)
    return MemoryEstimate(pp_rank, weights, gradients, optimizer, activations, logits)


def estimate_memory(spec: ModelSpec, layout: Layout, attention: str = "flash") -> MemoryEstimate:
    """Per-GPU memory of ``layout``: the first or last pipeline rank, whichever needs more
    (middle ranks hold no more than the first). DP rank 0's optimizer shard."""
    block = Block(attention=attention)
    stages = {0, layout.pp - 1}
    return max((stage_memory(spec, layout, k, block) for k in stages), key=lambda e: e.total)
