"""Where a training step's time goes: ``Trainer.train_step`` timed and profiled in one process.

    python benchmarks/step_profile.py                                  # median step time
    python benchmarks/step_profile.py --profile 3                      # + torch profiler table
    python benchmarks/step_profile.py --baseline-flags=--use-distributed-optimizer
    python benchmarks/step_profile.py --baseline-dot-product-attention --baseline-schedule-in-torch-function-mode
    python benchmarks/step_profile.py --baseline-megatron-core-glu -- --loss ce    # megatron_mile/swiglu.py's gain
    python benchmarks/step_profile.py --baseline-flags=--no-rope-fusion -- --loss ce   # megatron_mile/rope.py's gain
    python benchmarks/step_profile.py --baseline-hf -- --loss ce --seq-length 1024   # trainer flags after --

The model is the Hugging Face comparison's shape (``train_bench.py --against-hf``: hidden
256, 4 layers, 4 heads, FFN 704, sequence 256, micro-batch 4) on the demo corpus, one
process on gloo; trainer flags after ``--`` override it. Step times are wall-clock and
process CPU time; on a shared machine the CPU time with ``--threads 1`` is the steadier one.

A baseline arm is a second trainer in the same process, built with any of: extra trainer
flags (``--baseline-flags``), megatron-core's ``DotProductAttention`` as the core attention,
megatron-core's unfused GLU instead of megatron-mile's SwiGLU, and the pipeline schedule run under the CPU layer's torch-function mode (which that layer
keeps for a few small helpers); or, with ``--baseline-hf``, Hugging Face's LlamaForCausalLM
at the same shape, loss and micro-batch (``hf_llama_train.py``). The two arms alternate in
blocks of steps, and the report is each arm's median step time and their ratio: on a busy
machine a steadier comparison than ``train_bench.py``'s separate processes, but not the same one
(on the CPU, sharing a process came out a few percent more favourable to megatron-mile against
Hugging Face than separate processes; BENCHMARKS.md).

On a GPU every timed step ends with a device synchronisation (the time counts the kernels,
not only their launches), and ``--profile`` adds the device activity: each arm's GPU kernel time
per step next to its step time (a step much longer than its kernels waits on the host), and a
table by self device time before the one by self CPU time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.train_bench import HF_SHAPE_FLAGS, prepare_demo  # noqa: E402


def _trainer(flags: list[str], dot_product_attention: bool = False, megatron_core_glu: bool = False):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_mile import model, training
    from megatron_mile.arguments import parse_args
    from megatron_mile.training import Trainer

    block_spec, build_config = model.block_spec, training.build_transformer_config
    if dot_product_attention:
        model.block_spec = functools.partial(block_spec, core_attention=DotProductAttention)
    if megatron_core_glu:  # without the activation-module hook, block_spec keeps megatron-core's GLU
        training.build_transformer_config = lambda *a, **k: dataclasses.replace(
            build_config(*a, **k), use_te_activation_func=False)
    try:
        return Trainer(parse_args(flags))
    finally:
        model.block_spec, training.build_transformer_config = block_spec, build_config


def _schedule_in_torch_function_mode() -> Callable[[], None]:
    """Wrap the no-pipelining schedule in the CPU layer's torch-function mode; returns the undo."""
    from megatron.core.pipeline_parallel import schedules

    from megatron_mile import runtime

    original = schedules.forward_backward_no_pipelining

    def wrapped(*args, **kwargs):
        with runtime._CudaDevicesOnCpu():
            return original(*args, **kwargs)

    schedules.forward_backward_no_pipelining = wrapped
    return lambda: setattr(schedules, "forward_backward_no_pipelining", original)


def _hf_step(trainer) -> Callable[[], None]:
    """Hugging Face's LlamaForCausalLM at the trainer's shape, loss, micro-batch and vocabulary."""
    from benchmarks.hf_llama_train import build_step

    if trainer.args.loss not in ("ce", "mile") or trainer.num_microbatches != 1:
        sys.exit("step_profile: --baseline-hf needs --loss ce or mile and --global-batch-size = --micro-batch-size")
    return build_step(trainer.args.loss, trainer.shape, trainer.vocab_size, trainer.args.micro_batch_size,
                      trainer.args.bf16, trainer.rt.device)


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed_steps(step: Callable[[], object], steps: int, before: Callable[[], Callable[[], None]] | None = None,
                 ) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds of each step."""
    undo = before() if before else None
    times = []
    try:
        for _ in range(steps):
            _synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            _synchronize()
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
    finally:
        if undo:
            undo()
    return times


def main() -> None:
    argv = sys.argv[1:]
    trainer_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed steps per arm")
    p.add_argument("--block", type=int, default=5, help="steps per arm before switching")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS", help="profile this many steps per arm")
    p.add_argument("--rows", type=int, default=20, help="profiler table rows")
    p.add_argument("--baseline-flags", type=str.split, default=[], help="baseline: these extra trainer flags")
    p.add_argument("--baseline-dot-product-attention", action="store_true",
                   help="baseline: megatron-core's DotProductAttention as the core attention")
    p.add_argument("--baseline-megatron-core-glu", action="store_true",
                   help="baseline: megatron-core's unfused GLU instead of megatron_mile/swiglu.py")
    p.add_argument("--baseline-schedule-in-torch-function-mode", action="store_true")
    p.add_argument("--baseline-hf", action="store_true",
                   help="baseline: Hugging Face's LlamaForCausalLM (benchmarks/hf_llama_train.py) instead")
    p.add_argument("--data-dir", default=os.path.join(REPO, "data", "demo"))
    args = p.parse_args(own)

    import torch

    torch.set_num_threads(args.threads)
    blend, tokenizer = prepare_demo(args.data_dir)
    base_flags = [*HF_SHAPE_FLAGS, "--train-iters", "100000", "--lr-warmup-iters", "1", "--data-path", blend,
                  "--tokenizer-model", tokenizer, "--eval-iters", "1", *trainer_flags]
    trainer = _trainer(base_flags)
    arms: dict[str, tuple[Callable[[], object], Callable | None]] = {"this": (trainer.train_step, None)}
    baseline = [*args.baseline_flags, *(["DotProductAttention"] if args.baseline_dot_product_attention else []),
                *(["megatron-core's GLU"] if args.baseline_megatron_core_glu else []),
                *(["schedule in torch-function mode"] if args.baseline_schedule_in_torch_function_mode else [])]
    if args.baseline_hf:
        baseline = ["Hugging Face LlamaForCausalLM, SDPA, AdamW"]
        arms["baseline"] = (_hf_step(trainer), None)
    elif baseline:
        arms["baseline"] = (_trainer(base_flags + args.baseline_flags, args.baseline_dot_product_attention,
                                     args.baseline_megatron_core_glu).train_step,
                            _schedule_in_torch_function_mode if args.baseline_schedule_in_torch_function_mode
                            else None)

    for step, before in arms.values():
        _timed_steps(step, args.warmup, before)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
    while any(len(t) < args.steps for t in times.values()):
        for name, (step, before) in arms.items():
            times[name] += _timed_steps(step, min(args.block, args.steps - len(times[name])), before)

    print(f"load average {os.getloadavg()[0]:.1f}, {args.threads} threads, flags: {' '.join(base_flags)}")
    medians = {name: [statistics.median(step[i] for step in t) for i in (0, 1)] for name, t in times.items()}
    labels = {"this": "this", "baseline": f"baseline ({', '.join(baseline)})"}
    for name, (wall, cpu) in medians.items():
        print(f"{labels[name]}: median step {1000 * wall:.1f} ms wall, {1000 * cpu:.1f} ms CPU "
              f"over {len(times[name])} steps")
    if "baseline" in medians:
        ratios = [medians["this"][i] / medians["baseline"][i] for i in (0, 1)]
        print(f"this / baseline step time: {ratios[0]:.3f} wall, {ratios[1]:.3f} CPU")

    if args.profile:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        on_gpu = torch.cuda.is_available()
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
        for name, (step, before) in arms.items():
            undo = before() if before else None
            with profile(activities=activities) as prof:
                for _ in range(args.profile):
                    step()
                _synchronize()
            if undo:
                undo()
            events = prof.key_averages()
            if on_gpu:
                # Kernel time only, as the profiler's own total: not the operators that launched the
                # kernels, nor annotations such as the optimizer's step.
                kernel_ms = sum(e.self_device_time_total for e in events
                                if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1000
                wall_ms = 1000 * medians[name][0]
                print(f"\n### {name}: {args.profile} steps; GPU kernels {kernel_ms / args.profile:.1f} ms per step, "
                      f"against a median step of {wall_ms:.1f} ms (unprofiled)")
                print(f"by self device time:\n{events.table(sort_by='self_device_time_total', row_limit=args.rows)}")
            else:
                print(f"\n### {name}: {args.profile} steps")
            print(f"by self CPU time:\n{events.table(sort_by='self_cpu_time_total', row_limit=args.rows)}")


if __name__ == "__main__":
    main()
