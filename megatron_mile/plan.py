"""megatron-mile-plan: choose a TP/PP/DP layout from memory, pipeline bubble and communication.

    megatron-mile-plan --model-preset 6.7B --gpus 128 --gpu-memory 80 --global-batch-size 2048 --seq-length 2048

lists every layout the trainer can run on the GPUs, estimates each one's per-GPU memory,
pipeline bubble, communication and step time (``megatron_mile.planning``), and prints the
fastest layouts that fit, one row per parallel layout, with the reason for each;
``--json`` prints every layout with every estimate. Bad input (a GPU count no layout
splits, a model that fits nowhere) gets one line naming the nearest alternative.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

# megatron-core (imported through the model presets) warns about optional CUDA extensions
# that planning never uses.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

from megatron_mile.arguments import ConfigError, add_model_arguments, checked_model_shape  # noqa: E402
from megatron_mile.cli import ArgumentParser  # noqa: E402
from megatron_mile.metrics import PEAK_BF16_FLOPS, format_tokens  # noqa: E402
from megatron_mile.model import count_parameters  # noqa: E402
from megatron_mile.planning.activations import ATTENTIONS  # noqa: E402
from megatron_mile.planning.communication import Hardware, step_traffic  # noqa: E402
from megatron_mile.planning.layout import ModelSpec, enumerate_layouts  # noqa: E402
from megatron_mile.planning.memory import GIB  # noqa: E402
from megatron_mile.planning.planner import (Choice, Cluster, Estimate, card_memory_needed, choices,  # noqa: E402
                                            evaluate, nearest_gpu_counts, ranked, smallest_memory)

PROG = "megatron-mile-plan"


class PlanError(ValueError):
    """Input that no layout satisfies; the message is one line with the nearest alternative."""


def _micro_batch_size(value: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) == 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {value!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="the tokenizer's vocabulary (the paper's LLaMA tokenizer: 32000); padded per TP as in training")

    g = p.add_argument_group("cluster and batch")
    g.add_argument("--gpus", type=int, required=True)
    g.add_argument("--gpus-per-node", type=int, default=8, help="TP stays inside a node")
    g.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    g.add_argument("--memory-margin", type=float, default=0.1,
                   help="fraction of --gpu-memory kept free for what the estimate leaves out (CUDA context, NCCL "
                        "buffers, fragmentation, transient tensors)")
    g.add_argument("--global-batch-size", type=int, required=True, help="sequences per step")
    g.add_argument("--micro-batch-size", type=_micro_batch_size, default="auto",
                   help="'auto' tries every size that divides the per-DP-rank batch")

    g = p.add_argument_group("assumed throughput (defaults: H100 SXM, 400 Gb/s InfiniBand per GPU)")
    g.add_argument("--peak-tflops", type=float, default=PEAK_BF16_FLOPS["H100"] / 1e12, help="dense bf16, per GPU")
    g.add_argument("--achievable-mfu", type=float, default=0.5,
                   help="fraction of the peak the model's GEMMs reach (bubble and communication are added on top)")
    g.add_argument("--nvlink-bandwidth", type=float, default=360.0, help="GB/s, NCCL bus bandwidth inside a node")
    g.add_argument("--inter-node-bandwidth", type=float, default=40.0, help="GB/s per GPU between nodes")
    g.add_argument("--hbm-bandwidth", type=float, default=3350.0, help="GB/s, for the optimizer step")
    g.add_argument("--collective-latency", type=float, default=15.0, help="microseconds per collective or send")
    g.add_argument("--attention-backend", default="flash", choices=ATTENTIONS[:2],
                   help="flash: Transformer Engine's flash/fused attention (no s x s scores kept); local: "
                        "megatron-core's DotProductAttention, used without Transformer Engine (keeps the scores)")

    g = p.add_argument_group("output")
    g.add_argument("--top", type=int, default=5, help="parallel layouts in the table")
    g.add_argument("--json", action="store_true", help="every layout with every estimate, as JSON")
    return p


def _check_positive(args: argparse.Namespace) -> None:
    for name in ("vocab_size", "gpus", "gpus_per_node", "gpu_memory", "global_batch_size", "peak_tflops",
                 "nvlink_bandwidth", "inter_node_bandwidth", "hbm_bandwidth", "top"):
        if getattr(args, name) <= 0:
            raise PlanError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.collective_latency < 0:
        raise PlanError(f"--collective-latency must be >= 0, got {args.collective_latency}")
    if not 0 < args.achievable_mfu <= 1:
        raise PlanError(f"--achievable-mfu must be in (0, 1], got {args.achievable_mfu}")
    if not 0 <= args.memory_margin < 1:
        raise PlanError(f"--memory-margin must be in [0, 1), got {args.memory_margin}")


def model_spec(args: argparse.Namespace) -> ModelSpec:
    # Grouped-query attention counts only once the shared model flags define it
    # (--group-query-attention, --num-query-groups); until then every layout is multi-head.
    groups = getattr(args, "num_query_groups", None) if getattr(args, "group_query_attention", False) else None
    return ModelSpec(checked_model_shape(args), args.vocab_size, groups)


def cluster(args: argparse.Namespace) -> Cluster:
    hardware = Hardware(peak_flops=args.peak_tflops * 1e12, achievable_mfu=args.achievable_mfu,
                        nvlink_bandwidth=args.nvlink_bandwidth * 1e9,
                        inter_node_bandwidth=args.inter_node_bandwidth * 1e9,
                        hbm_bandwidth=args.hbm_bandwidth * 1e9, latency=args.collective_latency * 1e-6,
                        gpus_per_node=args.gpus_per_node)
    return Cluster(args.gpus, args.gpu_memory * GIB, args.memory_margin, hardware, args.attention_backend)


def _either(below: int | None, above: int | None) -> str:
    found = [str(n) for n in (below, above) if n]
    return " or ".join(found) if found else "none within 64 nodes"


def _micro_batch_alternatives(spec: ModelSpec, args: argparse.Namespace) -> str:
    sizes = sorted({l.micro_batch_size for l in enumerate_layouts(spec, args.gpus, args.gpus_per_node,
                                                                   args.global_batch_size)})
    below = max((b for b in sizes if b < args.micro_batch_size), default=None)
    above = min((b for b in sizes if b > args.micro_batch_size), default=None)
    return _either(below, above)


def plan(args: argparse.Namespace) -> tuple[ModelSpec, Cluster, list[Estimate], list[Estimate]]:
    """All estimates and the ranking, or PlanError with the nearest alternative."""
    _check_positive(args)
    spec = model_spec(args)
    where = cluster(args)
    gpn = args.gpus_per_node
    if args.gpus % gpn:
        below, above = nearest_gpu_counts(spec, args.gpus, gpn, args.global_batch_size, args.micro_batch_size, where)
        hint = f" (or --gpus-per-node {args.gpus} for a single node)" if args.gpus < gpn else ""
        raise PlanError(f"--gpus-per-node {gpn} does not divide --gpus {args.gpus}: nearest GPU counts that work: "
                        f"{_either(below, above)}{hint}")
    layouts = enumerate_layouts(spec, args.gpus, gpn, args.global_batch_size, args.micro_batch_size)
    if not layouts:
        if args.micro_batch_size and enumerate_layouts(spec, args.gpus, gpn, args.global_batch_size):
            raise PlanError(f"--micro-batch-size {args.micro_batch_size} divides no per-DP-rank batch of "
                            f"--global-batch-size {args.global_batch_size} on {args.gpus} GPUs: nearest sizes that "
                            f"do: {_micro_batch_alternatives(spec, args)}")
        below, above = nearest_gpu_counts(spec, args.gpus, gpn, args.global_batch_size, args.micro_batch_size, where)
        shape = spec.shape
        raise PlanError(f"no layout splits {args.gpus} GPUs (TP must divide {gpn} GPUs per node, "
                        f"{shape.num_attention_heads} heads and FFN {shape.ffn_hidden_size}; PP {shape.num_layers} "
                        f"layers; DP --global-batch-size {args.global_batch_size}): nearest GPU counts that work: "
                        f"{_either(below, above)}")
    estimates = [evaluate(spec, layout, where) for layout in layouts]
    ranking = ranked(estimates)
    if not ranking:
        least = smallest_memory(estimates)
        _, above = nearest_gpu_counts(spec, args.gpus, gpn, args.global_batch_size, args.micro_batch_size, where)
        more = f", or {above} GPUs" if above else ""
        raise PlanError(f"{args.model_preset if _is_preset(args) else 'the model'} fits no layout on {args.gpus} x "
                        f"{args.gpu_memory:g} GiB GPUs: the smallest needs {least.memory.total / GIB:.1f} GiB "
                        f"({_name(least)}); use cards of at least "
                        f"{card_memory_needed(least.memory.total, args.memory_margin)} GiB{more}")
    return spec, where, estimates, ranking


def _is_preset(args: argparse.Namespace) -> bool:
    return all(getattr(args, k) is None for k in ("num_layers", "hidden_size", "num_attention_heads",
                                                  "ffn_hidden_size"))


def _name(e: Estimate) -> str:
    layout = e.layout
    extra = [] if layout.distributed_optimizer else ["regular optimizer"]
    if layout.recompute != "none":
        extra.append(f"{layout.recompute} recomputation")
    return f"{layout.describe()}, micro-batch {layout.micro_batch_size}" + "".join(f", {x}" for x in extra)


def _micro_batches(choice: Choice) -> str:
    near = choice.near_micro_batch_sizes
    best = choice.estimate.layout.micro_batch_size
    return str(best) if near == (best,) else f"{best} ({near[0]}-{near[-1]})"


def table(spec: ModelSpec, where: Cluster, args: argparse.Namespace, estimates: list[Estimate],
          ranking: list[Estimate]) -> str:
    shape = spec.shape
    params = count_parameters(shape, spec.vocab_size)
    tokens = args.global_batch_size * shape.seq_length
    lines = [
        f"{args.model_preset if _is_preset(args) else 'custom'}: {shape.num_layers} layers, "
        f"hidden {shape.hidden_size}, {shape.num_attention_heads} heads ({spec.query_groups} query groups), "
        f"FFN {shape.ffn_hidden_size}, seq {shape.seq_length}, vocab {spec.vocab_size}: {params / 1e9:.2f}B parameters",
        f"{args.gpus} GPUs ({args.gpus // args.gpus_per_node} x {args.gpus_per_node} per node), "
        f"{args.gpu_memory:g} GiB each ({where.usable_memory / GIB:.1f} usable); "
        f"global batch {args.global_batch_size} x {shape.seq_length} = {format_tokens(tokens)} tokens",
        f"assumed: {args.peak_tflops:g} TFLOP/s x {args.achievable_mfu:g}; NVLink {args.nvlink_bandwidth:g} GB/s, "
        f"inter-node {args.inter_node_bandwidth:g} GB/s per GPU, HBM {args.hbm_bandwidth:g} GB/s, "
        f"{args.collective_latency:g} us per collective; {args.attention_backend} attention",
        f"{len(estimates)} layouts, {sum(e.fits for e in estimates)} fit, {len(ranking)} of those runnable; "
        f"the fastest variant of each parallel layout:",
        "",
    ]
    header = ("#", "layout", "micro-batch", "optimizer", "recompute", "GiB", "bubble", "comm s", "step s", "MFU",
              "why")
    rows = []
    for i, choice in enumerate(choices(ranking, where, args.top), 1):
        e = choice.estimate
        comm = e.time.tp + e.time.pp + e.time.mile + e.time.dp + e.time.other
        rows.append((str(i), e.layout.describe(), _micro_batches(choice),
                     "distributed" if e.layout.distributed_optimizer else "regular", e.layout.recompute,
                     f"{e.memory.total / GIB:.1f}", f"{100 * e.time.bubble_fraction:.1f}%", f"{comm:.3f}",
                     f"{e.time.total:.3f}", f"{100 * e.mfu:.0f}%", choice.reason))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    best = ranking[0]
    lines += ["", "best: megatron-mile-train " + " ".join(best.layout.trainer_flags(shape.num_layers))]
    return "\n".join(lines)


def as_json(spec: ModelSpec, where: Cluster, args: argparse.Namespace, estimates: list[Estimate],
            ranking: list[Estimate]) -> dict:
    rank = {id(e): i for i, e in enumerate(ranking, 1)}
    summary = choices(ranking, where, args.top)

    def entry(e: Estimate) -> dict:
        communication: dict[str, dict] = {}
        for x in step_traffic(spec, e.layout, where.hardware, e.layout.pp - 1):
            item = communication.setdefault(x.name, {"collectives": 0.0, "bytes_per_gpu": 0.0, "seconds": 0.0,
                                                     "overlapped": x.overlapped})
            item["collectives"] += x.count
            item["bytes_per_gpu"] += x.bytes_per_gpu
            item["seconds"] += x.seconds(where.hardware.latency)
        return {"layout": e.layout.as_dict(), "trainer_flags": e.layout.trainer_flags(spec.shape.num_layers),
                "runnable": e.layout.runnable, "fits": e.fits, "rank": rank.get(id(e)),
                "memory_gib": e.memory.as_gib(), "bubble_fraction": e.time.bubble_fraction,
                "step_time_s": e.time.as_dict(), "mfu": e.mfu, "communication_last_stage": communication}

    return {
        "inputs": {k: v for k, v in vars(args).items() if k not in ("json", "top")},
        "model": {**vars(spec.shape), "vocab_size": spec.vocab_size, "num_query_groups": spec.query_groups},
        "usable_memory_gib": where.usable_memory / GIB,
        "choices": [{**entry(c.estimate), "near_micro_batch_sizes": list(c.near_micro_batch_sizes),
                     "reason": c.reason} for c in summary],
        "layouts": [entry(e) for e in estimates],
    }


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        spec, where, estimates, ranking = plan(args)
    except (ConfigError, PlanError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(2)
    if args.json:
        json.dump(as_json(spec, where, args, estimates, ranking), sys.stdout)
        print()
    else:
        print(table(spec, where, args, estimates, ranking))


if __name__ == "__main__":
    main()
