"""Layout planning: memory, communication and step-time estimates for TP/PP/DP layouts.

``megatron_mile.plan`` is the command line; the pieces are usable on their own, e.g. to put
the memory estimate next to a measured peak:

    from megatron_mile.planning import Layout, ModelSpec, estimate_memory
    estimate = estimate_memory(ModelSpec(shape, vocab_size), Layout(tp=1, pp=1, dp=1, vp=1,
                               micro_batch_size=8, num_microbatches=1, sequence_parallel=False,
                               distributed_optimizer=True, recompute="none"), attention="local")
    estimate.total, estimate.as_gib()
"""

from megatron_mile.planning.layout import Layout, ModelSpec, enumerate_layouts
from megatron_mile.planning.memory import MemoryEstimate, estimate_memory

__all__ = ["Layout", "MemoryEstimate", "ModelSpec", "enumerate_layouts", "estimate_memory"]
