"""Step time of a layout: compute from FLOPs, the pipeline bubble, exposed communication and
the optimizer step.

**Compute.** FLOPs per token are ``megatron_mile.metrics.flops_per_token``'s
``6N + 12·L·s·h``, split by where they run: the layers' part, ``flops_per_token(shape, 0)``,
divided over the PP ranks; the output layer's, ``flops_per_token(shape, V_padded) −
flops_per_token(shape, 0) = 6·V_padded·h``, on the last rank. Recomputation adds a forward
(a third of the FLOPs) of what it recomputes: full, the layers; selective, the attention
kernel, 4·L·s·h / PP (a third of the 12·L·s·h term). A micro-batch of b·s tokens then takes
``FLOPs / (TP × peak × achievable MFU)`` on one GPU.

**Per micro-batch** a pipeline rank spends its compute plus its exposed communication (TP
forward collectives and the loss's, the pipeline sends, MiLe's alpha all-reduce; see
``communication``); the slower of the first and last rank sets the pace, t_mb.

**Pipeline.** m micro-batches through PP ranks with vp chunks each take
``(m + (PP − 1)/vp)·t_mb``: the bubble is ``(PP − 1)/vp·t_mb``, the fraction
``(PP − 1)/(vp·m)`` of the work.

**Data parallelism.** The fp32 gradient reduction overlaps the backward: on pipeline rank 0
the buckets of the first model chunk are reduced while the last micro-batch's backward runs,
and the bucket of the first parameters (reduced last) after it, so
``max(reduce − backward, last bucket)`` is exposed; a rank k > 0 reduces in one bucket after
its last backward, which ends about k micro-batch backwards before rank 0's:
``max(0, reduce − k·backward)``. With the distributed optimizer the bf16 weight all-gather
after the update is exposed.

**Optimizer step**, at HBM bandwidth: the finite-gradient check reads every fp32 gradient
and writes a flag per element (5 bytes an element); for each element the optimizer owns
(the rank's shard with the distributed optimizer), the gradient norm reads the gradient
(4 bytes), Adam reads gradient, main weight and both moments and writes the last three
(28 bytes), and the bf16 weight is rewritten from the main weight (6 bytes).

**Not modelled:** GEMM efficiency as a function of micro-batch size and TP width (taken as
the one achievable-MFU figure; larger micro-batches and narrower TP run somewhat faster in
practice), kernel-launch and framework overheads, non-matmul kernels (norms, SwiGLU,
RoPE, the loss) beyond the MFU figure, and congestion between collectives that run at the
same time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_mile.metrics import flops_per_token
from megatron_mile.model import padded_vocab_size
from megatron_mile.planning.communication import (Hardware, Traffic, last_bucket_seconds, microbatch_traffic,
                                                   per_step_traffic)
from megatron_mile.planning.layout import Layout, ModelSpec
from megatron_mile.planning.memory import layout_buffers

FINITE_CHECK_BYTES = 5
OPTIMIZER_STEP_BYTES = 38


@dataclass(frozen=True)
class StageFlops:
    """FLOPs per token of one pipeline rank (all its chunks)."""

    total: float  # forward + backward + recomputation
    recompute: float
    backward: float  # the part that runs in the backward pass (recomputation included)


def stage_flops(spec: ModelSpec, layout: Layout, pp_rank: int) -> StageFlops:
    shape = spec.shape
    layers = flops_per_token(shape, 0) / layout.pp
    head = 0.0
    if pp_rank == layout.pp - 1:
        head = flops_per_token(shape, padded_vocab_size(spec.vocab_size, layout.tp)) - flops_per_token(shape, 0)
    if layout.recompute == "full":
        recompute = layers / 3
    elif layout.recompute == "selective":
        recompute = 4.0 * shape.num_layers * shape.seq_length * shape.hidden_size / layout.pp
    else:
        recompute = 0.0
    return StageFlops(layers + head + recompute, recompute, 2 * (layers + head) / 3 + recompute)


@dataclass(frozen=True)
class StepTime:
    """Seconds per step, by where they go (on the rank that sets the pace)."""

    compute: float  # all micro-batches, recomputation included
    recompute: float  # part of compute
    tp: float  # exposed TP collectives, the loss's included
    pp: float
    mile: float  # MiLe's alpha all-reduces over DP
    bubble: float
    dp: float  # exposed gradient reduction and weight all-gather
    optimizer: float
    other: float  # per-step scalar all-reduces, and the SP norm gradients' all-reduce
    bubble_fraction: float

    @property
    def total(self) -> float:
        return self.compute + self.tp + self.pp + self.mile + self.bubble + self.dp + self.optimizer + self.other

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def _exposed(traffic: list[Traffic], names: tuple[str, ...], hw: Hardware) -> float:
    return sum(x.seconds(hw.latency) for x in traffic if x.name in names and not x.overlapped)


def estimate_step_time(spec: ModelSpec, layout: Layout, hw: Hardware) -> StepTime:
    m = layout.num_microbatches
    tokens = layout.micro_batch_size * spec.shape.seq_length
    rate = layout.tp * hw.peak_flops * hw.achievable_mfu
    ranks = sorted({0, layout.pp - 1})
    per_mb, dp, optimizer, other = [], [], [], []
    for k in ranks:
        flops = stage_flops(spec, layout, k)
        traffic = microbatch_traffic(spec, layout, hw, k)
        compute = flops.total * tokens / rate
        per_mb.append({"compute": compute, "recompute": flops.recompute * tokens / rate,
                       "tp": _exposed(traffic, ("tp", "loss (tp)"), hw), "pp": _exposed(traffic, ("pp",), hw),
                       "mile": _exposed(traffic, ("mile alpha (dp)",), hw)})
        whole = per_step_traffic(spec, layout, hw, k)
        reduce = sum(x.seconds(hw.latency) for x in whole if x.name == "dp grads")
        backward = flops.backward * tokens / rate
        if k == 0:
            exposed = max(reduce - backward, last_bucket_seconds(spec, layout, hw, k)) if reduce else 0.0
        else:
            exposed = max(0.0, reduce - k * backward)
        dp.append(exposed + _exposed(whole, ("dp params",), hw))
        other.append(_exposed(whole, ("step scalars", "sp norm grads (tp)"), hw))
        buffers = layout_buffers(spec, layout, k)
        optimizer.append((FINITE_CHECK_BYTES * buffers.padded + OPTIMIZER_STEP_BYTES * buffers.owned)
                         / hw.hbm_bandwidth)
    pace = max(per_mb, key=lambda x: x["compute"] + x["tp"] + x["pp"] + x["mile"])
    t_mb = pace["compute"] + pace["tp"] + pace["pp"] + pace["mile"]
    return StepTime(compute=m * pace["compute"], recompute=m * pace["recompute"], tp=m * pace["tp"],
                    pp=m * pace["pp"], mile=m * pace["mile"], bubble=(layout.pp - 1) / layout.vp * t_mb,
                    dp=max(dp), optimizer=max(optimizer), other=max(other),
                    bubble_fraction=(layout.pp - 1) / (layout.vp * m))


def model_flops_utilization(spec: ModelSpec, layout: Layout, hw: Hardware, step_seconds: float) -> float:
    """MFU as the trainer reports it (metrics.flops_per_token, the true vocabulary)."""
    tokens = layout.global_batch_size * spec.shape.seq_length
    return flops_per_token(spec.shape, spec.vocab_size) * tokens / (layout.gpus * hw.peak_flops * step_seconds)
