"""Estimate every layout, rank those that fit by step time, and explain the ranking.

A layout *fits* when its estimated memory (the larger of its first and last pipeline rank)
is at most ``(1 − margin) × card memory``: the margin stands for what the memory model
leaves out (see ``memory``). Layouts the trainer cannot run (selective recomputation) are
estimated but not ranked.

Many layouts differ only in micro-batch size, optimizer or recomputation and estimate
within a fraction of a percent of each other, so the summary shows one row per parallel
layout (TP, PP, VP, SP) — its fastest variant — and the micro-batch sizes within
``NEAR`` of that row's time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_mile.planning.communication import Hardware
from megatron_mile.planning.layout import Layout, ModelSpec, enumerate_layouts
from megatron_mile.planning.memory import GIB, MemoryEstimate, estimate_memory
from megatron_mile.planning.step_time import StepTime, estimate_step_time, model_flops_utilization

NEAR = 0.01  # micro-batch sizes within 1% of a row's step time are listed with it

# StepTime fields a slower layout may lose time in, and how the reason names them.
COSTS = {"tp": "TP communication", "pp": "pipeline sends", "bubble": "pipeline bubble", "recompute": "recomputation",
         "dp": "DP communication", "optimizer": "optimizer step", "mile": "MiLe all-reduces"}


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    memory: MemoryEstimate
    time: StepTime
    mfu: float
    fits: bool


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpu_memory: float  # bytes per GPU
    memory_margin: float
    hardware: Hardware
    attention: str = "flash"

    @property
    def usable_memory(self) -> float:
        return self.gpu_memory * (1 - self.memory_margin)


def evaluate(spec: ModelSpec, layout: Layout, cluster: Cluster) -> Estimate:
    memory = estimate_memory(spec, layout, cluster.attention)
    time = estimate_step_time(spec, layout, cluster.hardware)
    return Estimate(layout, memory, time, model_flops_utilization(spec, layout, cluster.hardware, time.total),
                    memory.total <= cluster.usable_memory)


def ranked(estimates: list[Estimate]) -> list[Estimate]:
    """The runnable layouts that fit, fastest first."""
    return sorted((e for e in estimates if e.fits and e.layout.runnable), key=lambda e: e.time.total)


def family(layout: Layout) -> tuple:
    return layout.tp, layout.pp, layout.vp, layout.sequence_parallel


@dataclass(frozen=True)
class Choice:
    """One row of the summary: a parallel layout's fastest variant, and why it ranks where it does."""

    estimate: Estimate
    near_micro_batch_sizes: tuple[int, ...]
    reason: str


def choices(ranking: list[Estimate], cluster: Cluster, top: int) -> list[Choice]:
    best_of: dict[tuple, Estimate] = {}
    for e in ranking:
        best_of.setdefault(family(e.layout), e)
    rows = sorted(best_of.values(), key=lambda e: e.time.total)[:top]
    out = []
    for e in rows:
        near = sorted({x.layout.micro_batch_size for x in ranking if family(x.layout) == family(e.layout)
                       and x.time.total <= e.time.total * (1 + NEAR)})
        out.append(Choice(e, tuple(near), reason(e, rows[0], cluster)))
    return out


def reason(e: Estimate, best: Estimate, cluster: Cluster) -> str:
    layout = e.layout
    parts = []
    if e is best:
        parts.append("fastest")
        if layout.tp == layout.pp == 1:
            parts.append("no model-parallel communication")
    else:
        slower = e.time.total / best.time.total - 1
        deltas = sorted(((getattr(e.time, k) - getattr(best.time, k), label) for k, label in COSTS.items()),
                        reverse=True)
        lost = ", ".join(f"{label} +{seconds * 1e3:.0f} ms" for seconds, label in deltas[:2] if seconds > 0.0005)
        parts.append(f"+{100 * slower:.1f}%" + (f": {lost}" if lost else ""))
        saved = best.memory.total - e.memory.total
        if saved > 0.5 * GIB:
            parts.append(f"{saved / GIB:.0f} GiB less memory")
    if layout.recompute != "none":
        parts.append(f"needs {layout.recompute} recomputation to fit")
    parts.append(f"{(cluster.usable_memory - e.memory.total) / GIB:.0f} GiB headroom")
    return "; ".join(parts)


def smallest_memory(estimates: list[Estimate]) -> Estimate:
    return min((e for e in estimates if e.layout.runnable), key=lambda e: e.memory.total)


def card_memory_needed(memory_bytes: float, margin: float) -> int:
    """Smallest whole number of GiB whose usable part holds ``memory_bytes``."""
    return math.ceil(memory_bytes / (1 - margin) / GIB)


def has_fitting_layout(spec: ModelSpec, gpus: int, gpus_per_node: int, global_batch_size: int,
                       micro_batch_size: int | None, cluster: Cluster) -> bool:
    return any(l.runnable and estimate_memory(spec, l, cluster.attention).total <= cluster.usable_memory
               for l in enumerate_layouts(spec, gpus, gpus_per_node, global_batch_size, micro_batch_size))


def nearest_gpu_counts(spec: ModelSpec, gpus: int, gpus_per_node: int, global_batch_size: int,
                       micro_batch_size: int | None, cluster: Cluster, limit: int = 64,
                       ) -> tuple[int | None, int | None]:
    """The nearest whole-node GPU counts below and above ``gpus`` with a layout that fits
    (searching up to ``limit`` nodes)."""
    def works(count: int) -> bool:
        return has_fitting_layout(spec, count, gpus_per_node, global_batch_size, micro_batch_size, cluster)

    nodes = gpus // gpus_per_node
    below = next((n * gpus_per_node for n in range(nodes - 1 if gpus % gpus_per_node == 0 else nodes, 0, -1)
                  if works(n * gpus_per_node)), None)
    above = next((n * gpus_per_node for n in range(nodes + 1, limit + 1) if works(n * gpus_per_node)), None)
    return below, above
