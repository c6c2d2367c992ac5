"""Where a training step's time goes: ``Trainer.train_step`` timed and profiled in one process.

    python benchmarks/step_profile.py                                  # median step time
    python benchmarks/step_profile.py --profile 5                      # + torch profiler table
    python benchmarks/step_profile.py --against --no-distributed-optimizer
    python benchmarks/step_profile.py --against-schedule-in-torch-function-mode
    python benchmarks/step_profile.py -- --loss ce --seq-length 1024   # trainer flags after --

The model is the Hugging Face comparison's shape (``train_bench.py --against-hf``: hidden
256, 4 layers, 4 heads, FFN 704, sequence 256, micro-batch 4) on the demo corpus, one
process on gloo; trainer flags after ``--`` override it. Step times are wall-clock and
process CPU time; on a shared machine the CPU time with ``--threads 1`` is the steadier one. With a baseline arm
(``--against FLAGS``: a second trainer built with those extra flags, or the schedule run
under the CPU layer's torch-function mode, as megatron-mile once did) the two arms alternate
in blocks of steps in the same process, and the report is each arm's median step time and
their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.train_bench import HF_SHAPE_FLAGS, prepare_demo  # noqa: E402


def _trainer(flags: list[str]):
    from megatron_mile.arguments import parse_args
    from megatron_mile.training import Trainer

    return Trainer(parse_args(flags))


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


def _timed_steps(trainer, steps: int, before: Callable[[], Callable[[], None]] | None = None,
                 ) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds of each step."""
    undo = before() if before else None
    times = []
    try:
        for _ in range(steps):
            wall, cpu = time.perf_counter(), time.process_time()
            trainer.train_step()
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
    arm = p.add_mutually_exclusive_group()
    arm.add_argument("--against", nargs=argparse.REMAINDER, help="baseline: a trainer with these extra flags")
    arm.add_argument("--against-schedule-in-torch-function-mode", action="store_true")
    p.add_argument("--data-dir", default=os.path.join(REPO, "data", "demo"))
    args = p.parse_args(own)

    import torch

    torch.set_num_threads(args.threads)
    blend, tokenizer = prepare_demo(args.data_dir)
    base_flags = [*HF_SHAPE_FLAGS, "--train-iters", "100000", "--lr-warmup-iters", "1", "--data-path", blend,
                  "--tokenizer-model", tokenizer, "--eval-iters", "1", *trainer_flags]
    arms: dict[str, tuple[object, Callable | None]] = {"this": (_trainer(base_flags), None)}
    if args.against:
        arms["baseline"] = (_trainer(base_flags + args.against), None)
    elif args.against_schedule_in_torch_function_mode:
        arms["baseline"] = (arms["this"][0], _schedule_in_torch_function_mode)

    for trainer, before in arms.values():
        _timed_steps(trainer, args.warmup, before)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
    while any(len(t) < args.steps for t in times.values()):
        for name, (trainer, before) in arms.items():
            times[name] += _timed_steps(trainer, min(args.block, args.steps - len(times[name])), before)

    print(f"load average {os.getloadavg()[0]:.1f}, {args.threads} threads, flags: {' '.join(base_flags)}")
    medians = {name: [statistics.median(step[i] for step in t) for i in (0, 1)] for name, t in times.items()}
    labels = {"this": "this", "baseline": "baseline (" + (" ".join(args.against) if args.against
                                                          else "schedule in torch-function mode") + ")"}
    for name, (wall, cpu) in medians.items():
        print(f"{labels[name]}: median step {1000 * wall:.1f} ms wall, {1000 * cpu:.1f} ms CPU "
              f"over {len(times[name])} steps")
    if "baseline" in medians:
        ratios = [medians["this"][i] / medians["baseline"][i] for i in (0, 1)]
        print(f"this / baseline step time: {ratios[0]:.3f} wall, {ratios[1]:.3f} CPU")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, (trainer, before) in arms.items():
            undo = before() if before else None
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile):
                    trainer.train_step()
            if undo:
                undo()
            print(f"\n### {name}: {args.profile} steps, by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
