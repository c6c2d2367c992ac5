"""Communication per training step: which collectives run, how many bytes each GPU sends, how long.

Cost model (α-β, ring algorithms, NCCL's bus-bandwidth convention): a collective over n
ranks of a tensor of M bytes takes ``latency + factor·M / bandwidth`` with factor
2(n−1)/n for an all-reduce, (n−1)/n for a reduce-scatter or all-gather, 1 for a
point-to-point send; ``factor·M`` is also what each GPU sends.

Bandwidth: TP groups stay inside a node (NVLink). megatron-core orders ranks TP fastest,
then DP, then PP, so a DP group is inside one node when TP·DP ≤ GPUs per node, and
otherwise has k = GPUs-per-node / TP members on each node; NCCL's rings then cross nodes
over k NICs at once: min(NVLink, k × per-GPU network bandwidth). Pipeline sends go over the
network once the job spans nodes.

What runs, per GPU of a pipeline rank (M = 2sbh bytes, one bf16 ``[s, b, h]`` tensor):

- TP, each layer and micro-batch. Without sequence parallelism: forward, two all-reduces
  (after the attention projection and after fc2), on the critical path; backward, two
  all-reduces of the QKV and fc1 input gradients, which megatron-core launches
  asynchronously and overlaps with the weight-gradient GEMMs (it needs
  ``CUDA_DEVICE_MAX_CONNECTIONS=1``, which the launchers set). With sequence parallelism:
  forward, two all-gathers and two reduce-scatters (exposed); backward, the two row-parallel
  layers' all-gathers of their output gradient (exposed), and for the two column-parallel
  layers the re-gather of their saved input shard (overlapped with the input-gradient GEMM)
  and the reduce-scatter of the input gradient (overlapped with the weight-gradient GEMM).
  Full recomputation repeats the forward collectives. The output layer adds one
  all-reduce in its backward (overlapped), or with SP one all-gather forward (exposed) and
  an all-gather and reduce-scatter backward (overlapped); the embedding on the first stage
  one all-reduce forward, or with SP a reduce-scatter forward and an all-gather backward.
  The loss adds two TP all-reduces per micro-batch, ``[s·b]`` fp32 (MAX) and ``[3, s·b]``
  fp32 (SUM): MiLe's entropy rides in them, so MiLe adds no TP collective.
  With SP the norm weights' gradients (fp32, 2h per layer) are all-reduced over TP once
  per step.
- PP, each micro-batch: every model chunk sends its output forward and receives the
  gradient back, ``[s/r, b, h]`` bf16 (r = t with SP), 2·vp sends per micro-batch; exposed.
- DP, each step: the fp32 gradient buffers, bucket by bucket (reduce-scatter into the
  distributed optimizer's shards, or all-reduce for the regular optimizer), overlapped
  with the backward (see ``step_time``); with the distributed optimizer the bf16 weights
  are all-gathered after the optimizer step, exposed (``overlap_param_gather`` is off).
- MiLe, each micro-batch: one all-reduce of two fp32 scalars over DP for alpha, on the
  last stage; exposed and latency-bound.
- Each step, three latency-bound all-reduces of a few scalars: the loss statistics, the
  finite-gradient check and the gradient norm.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mile.planning.layout import Layout, ModelSpec
from megatron_mile.planning.memory import GRAD_BYTES, WEIGHT_BYTES, layout_buffers

ACT = 2  # bf16 activations


@dataclass(frozen=True)
class Hardware:
    peak_flops: float  # dense bf16 FLOP/s per GPU
    achievable_mfu: float  # fraction of the peak that the model's GEMMs reach
    nvlink_bandwidth: float  # bytes/s, bus bandwidth inside a node
    inter_node_bandwidth: float  # bytes/s per GPU between nodes
    hbm_bandwidth: float  # bytes/s
    latency: float  # seconds per collective or send
    gpus_per_node: int


def ring_factor(collective: str, ranks: int) -> float:
    if collective == "p2p":
        return 1.0
    share = (ranks - 1) / ranks
    return 2 * share if collective == "all-reduce" else share


@dataclass(frozen=True)
class Traffic:
    """``count`` collectives of one kind, moving ``payload`` bytes (full tensors) in all."""

    name: str
    collective: str  # all-reduce, reduce-scatter, all-gather or p2p
    ranks: int
    count: float
    payload: float
    bandwidth: float
    overlapped: bool

    @property
    def bytes_per_gpu(self) -> float:
        return ring_factor(self.collective, self.ranks) * self.payload

    def seconds(self, latency: float) -> float:
        return self.count * latency + self.bytes_per_gpu / self.bandwidth


def dp_bandwidth(layout: Layout, hw: Hardware) -> float:
    if layout.tp * layout.dp <= hw.gpus_per_node:
        return hw.nvlink_bandwidth
    per_node = max(1, hw.gpus_per_node // layout.tp)
    return min(hw.nvlink_bandwidth, per_node * hw.inter_node_bandwidth)


def pp_bandwidth(layout: Layout, hw: Hardware) -> float:
    return hw.nvlink_bandwidth if layout.gpus <= hw.gpus_per_node else hw.inter_node_bandwidth


def microbatch_traffic(spec: ModelSpec, layout: Layout, hw: Hardware, pp_rank: int) -> list[Traffic]:
    """Collectives of one micro-batch (forward and backward) on one pipeline rank."""
    shape = spec.shape
    s, b, h = shape.seq_length, layout.micro_batch_size, shape.hidden_size
    t, sp = layout.tp, layout.sequence_parallel
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    M = ACT * s * b * h
    layers = shape.num_layers // layout.pp
    out: list[Traffic] = []

    def tp(name: str, collective: str, count: float, payload: float, overlapped: bool = False) -> None:
        if count:
            out.append(Traffic(name, collective, t, count, count * payload, hw.nvlink_bandwidth, overlapped))

    if t > 1:
        forwards = 2 if layout.recompute == "full" else 1
        if sp:
            tp("tp", "all-gather", layers * 2 * forwards + layers * 2 + last, M)
            tp("tp", "reduce-scatter", layers * 2 * forwards, M)
            tp("tp (overlapped)", "all-gather", layers * 2 + last, M, overlapped=True)
            tp("tp (overlapped)", "reduce-scatter", layers * 2 + last, M, overlapped=True)
            if first:
                tp("tp", "reduce-scatter", 1, M)
                tp("tp", "all-gather", 1, M)
        else:
            tp("tp", "all-reduce", layers * 2 * forwards + first, M)
            tp("tp (overlapped)", "all-reduce", layers * 2 + last, M, overlapped=True)
        if last:
            tp("loss (tp)", "all-reduce", 1, 4 * s * b)  # row max, fp32
            tp("loss (tp)", "all-reduce", 1, 3 * 4 * s * b)  # target logit, sum of exp, entropy sum
    if layout.pp > 1:
        r = t if sp else 1
        chunk_sends = 2 * layout.vp
        out.append(Traffic("pp", "p2p", 2, chunk_sends, chunk_sends * ACT * s * b * h / r,
                           pp_bandwidth(layout, hw), False))
    if last and layout.dp > 1:
        out.append(Traffic("mile alpha (dp)", "all-reduce", layout.dp, 1, 2 * 4, dp_bandwidth(layout, hw), False))
    return out


def step_traffic(spec: ModelSpec, layout: Layout, hw: Hardware, pp_rank: int) -> list[Traffic]:
    """Every collective of one step on one pipeline rank: the micro-batches' and the per-step ones."""
    m = layout.num_microbatches
    return [Traffic(x.name, x.collective, x.ranks, x.count * m, x.payload * m, x.bandwidth, x.overlapped)
            for x in microbatch_traffic(spec, layout, hw, pp_rank)] + per_step_traffic(spec, layout, hw, pp_rank)


def per_step_traffic(spec: ModelSpec, layout: Layout, hw: Hardware, pp_rank: int) -> list[Traffic]:
    """Collectives that run once a step: DP, the SP norm gradients, the scalars."""
    out = dp_traffic(spec, layout, hw, pp_rank)
    if layout.sequence_parallel:
        h = spec.shape.hidden_size
        norms = 2 * spec.shape.num_layers // layout.pp + (pp_rank == layout.pp - 1)
        out.append(Traffic("sp norm grads (tp)", "all-reduce", layout.tp, 1, GRAD_BYTES * norms * h,
                           hw.nvlink_bandwidth, False))
    out.append(Traffic("step scalars", "all-reduce", layout.gpus, 3, 3 * 8, hw.inter_node_bandwidth, False))
    return out


def dp_traffic(spec: ModelSpec, layout: Layout, hw: Hardware, pp_rank: int) -> list[Traffic]:
    if layout.dp == 1:
        return []
    buffers = layout_buffers(spec, layout, pp_rank)
    bw, buckets, elements = dp_bandwidth(layout, hw), buffers.buckets, buffers.padded
    if layout.distributed_optimizer:
        return [Traffic("dp grads", "reduce-scatter", layout.dp, buckets, GRAD_BYTES * elements, bw, True),
                Traffic("dp params", "all-gather", layout.dp, buckets, WEIGHT_BYTES * elements, bw, False)]
    return [Traffic("dp grads", "all-reduce", layout.dp, buckets, GRAD_BYTES * elements, bw, True)]


def last_bucket_seconds(spec: ModelSpec, layout: Layout, hw: Hardware, pp_rank: int) -> float:
    """The gradient bucket reduced last (first parameters, after the last backward), which nothing hides."""
    if layout.dp == 1:
        return 0.0
    elements = layout_buffers(spec, layout, pp_rank).last_bucket
    collective = "reduce-scatter" if layout.distributed_optimizer else "all-reduce"
    last = Traffic("", collective, layout.dp, 1, GRAD_BYTES * elements, dp_bandwidth(layout, hw), True)
    return last.seconds(hw.latency)

