"""What a parallel layout is, and which layouts megatron-mile can run on a given cluster.

A layout splits ``gpus = TP × PP × DP`` and fixes how each data-parallel rank runs its share
of the global batch. The rules below are the trainer's (``megatron_mile.arguments.validate``)
plus megatron-core 0.16.1's that the trainer does not check itself:

- TP stays inside a node (it divides the GPUs per node) and divides the attention heads,
  the query groups and the FFN width; with sequence parallelism it also divides the
  sequence length. Sequence parallelism needs TP > 1.
- PP divides the layers. Interleaving (``vp`` model chunks per pipeline rank, i.e.
  ``--num-layers-per-virtual-pipeline-stage = L / (PP·vp)``) needs PP > 1 (megatron-core's
  no-pipelining schedule refuses model chunks), and the interleaved schedule needs the
  number of micro-batches to be a multiple of PP: it runs them in groups of
  ``microbatch_group_size_per_vp_stage`` (default PP) and raises when a group is short
  (``forward_backward_pipelining_with_interleaving`` in ``pipeline_parallel/schedules.py``).
- DP divides the global batch, and the micro-batch size divides the per-DP-rank batch.
- Recomputation is none, selective (megatron-core's ``recompute_granularity="selective"``:
  core attention only) or full (``--recompute-activations``: every layer, uniform, one
  layer per checkpoint). The trainer has no flag for selective recomputation, so those
  layouts are estimated but marked as not runnable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_mile.model import ModelShape

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class ModelSpec:
    """The model as the planner sees it: its shape, the true vocabulary and the query groups."""

    shape: ModelShape
    vocab_size: int
    num_query_groups: int | None = None  # None: multi-head attention (one group per head)

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.shape.num_attention_heads

    @property
    def kv_channels(self) -> int:
        return self.shape.hidden_size // self.shape.num_attention_heads


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    vp: int  # model chunks per pipeline rank; 1 is plain 1F1B
    micro_batch_size: int
    num_microbatches: int  # per DP rank and step
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: str  # one of RECOMPUTE

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_microbatches * self.dp

    @property
    def runnable(self) -> bool:
        """Whether the trainer has flags for it (it has none for selective recomputation)."""
        return self.recompute != "selective"

    def trainer_flags(self, num_layers: int) -> list[str]:
        flags = ["--tensor-model-parallel-size", str(self.tp), "--pipeline-model-parallel-size", str(self.pp)]
        if self.vp > 1:
            flags += ["--num-layers-per-virtual-pipeline-stage", str(num_layers // (self.pp * self.vp))]
        if self.sequence_parallel:
            flags.append("--sequence-parallel")
        flags += ["--micro-batch-size", str(self.micro_batch_size)]
        if not self.distributed_optimizer:
            flags.append("--no-distributed-optimizer")
        if self.recompute == "full":
            flags.append("--recompute-activations")
        elif self.recompute == "selective":  # Megatron-LM's flag; this trainer has none (not runnable)
            flags += ["--recompute-granularity", "selective"]
        return flags

    def describe(self) -> str:
        parts = [f"TP={self.tp}", f"PP={self.pp}"]
        if self.vp > 1:
            parts.append(f"VP={self.vp}")
        parts.append(f"DP={self.dp}")
        if self.sequence_parallel:
            parts.append("SP")
        return " ".join(parts)

    def as_dict(self) -> dict:
        return {**asdict(self), "gpus": self.gpus}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tensor_parallel_sizes(spec: ModelSpec, gpus: int, gpus_per_node: int) -> list[int]:
    shape = spec.shape
    return [tp for tp in _divisors(gpus) if gpus_per_node % tp == 0 and shape.num_attention_heads % tp == 0
            and spec.query_groups % tp == 0 and shape.ffn_hidden_size % tp == 0]


def enumerate_layouts(spec: ModelSpec, gpus: int, gpus_per_node: int, global_batch_size: int,
                      micro_batch_size: int | None = None) -> list[Layout]:
    """Every layout of ``gpus`` GPUs the trainer and megatron-core accept (see the module docstring).

    ``micro_batch_size=None`` tries every divisor of the per-DP-rank batch.
    """
    shape = spec.shape
    layouts = []
    for tp in tensor_parallel_sizes(spec, gpus, gpus_per_node):
        for pp in _divisors(shape.num_layers):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            if global_batch_size % dp:
                continue
            per_rank = global_batch_size // dp
            sizes = _divisors(per_rank) if micro_batch_size is None else \
                [micro_batch_size] if per_rank % micro_batch_size == 0 else []
            chunk_counts = _divisors(shape.num_layers // pp) if pp > 1 else [1]
            sp_options = [False, True] if tp > 1 and shape.seq_length % tp == 0 else [False]
            for mbs in sizes:
                m = per_rank // mbs
                for vp in chunk_counts:
                    if vp > 1 and m % pp:
                        continue
                    for sp in sp_options:
                        for distributed_optimizer in (True, False):
                            for recompute in RECOMPUTE:
                                layouts.append(Layout(tp, pp, dp, vp, mbs, m, sp, distributed_optimizer, recompute))
    return layouts
