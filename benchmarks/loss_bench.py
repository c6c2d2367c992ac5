"""Forward+backward time and peak extra memory of the LM losses, as ratios to megatron-core.

    python benchmarks/loss_bench.py                 # 2048 x 32000 fp32 logits, TP=1 and TP=2 (gloo)
    python benchmarks/loss_bench.py --rows 256      # a quicker look
    python benchmarks/loss_bench.py --device cuda --rows 8192 --dtype bf16   # one GPU (TP=1, NCCL)

Cases: megatron-core's ``vocab_parallel_cross_entropy`` (the baseline); this project's CE, focal
and MiLe through ``weighted_lm_loss``, in place and out of place; and, at TP=1 only (it has no
tensor parallelism), the original MiLe trainer's computation: a full-vocabulary softmax of the
detached logits, clamp to [1e-8, 1], log, product and sum for the entropy, plus
``F.cross_entropy`` for the CE.

Every rank runs one intra-op thread. The logits come out of an autograd node whose backward
drops the gradient, as the output layer would consume it, so a gradient buffer counts while it
lives; each repetition starts from a fresh copy of the same logits.

Time: median over ``--repeats`` of the wall time of forward+backward on rank 0, all cases
interleaved in one process group per TP size (after one warm-up round), a barrier before each
when TP > 1. A rank that dies fails the benchmark at once (exit 1, one line naming the rank).

On CUDA the clock stops after ``torch.cuda.synchronize()``, and the peak extra memory is
``max_memory_allocated()`` across one forward+backward minus what was allocated before it,
divided by the bytes of the logits (the caching allocator's view: live tensors only); one process
measures both.

CPU memory: the cases run one after the other in a second process group, started with
``MALLOC_MMAP_THRESHOLD_=65536`` so that every buffer above 64 KiB is its own mmap and goes back to
the OS when freed. For each case, after a warm-up call, ``/proc/self/clear_refs`` (``5``) resets the
high-water mark and the peak extra memory is ``VmHWM - VmRSS`` across one forward+backward, i.e.
pages really touched, divided by the bytes of this rank's logits (the maximum over ranks). This
needs Linux; it counts every allocation, not only torch tensors, and rounds to pages.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

CASES = ["megatron_ce", "ce_inplace", "ce", "focal_inplace", "focal", "mile_inplace", "mile", "original_mile"]


def original_mile(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                  sigma: float = 1.0) -> torch.Tensor:
    """The original trainer's MiLe loss at DP=1 (its alpha is 1 / mean of w over all positions)."""
    p = torch.softmax(logits.detach().float(), dim=-1).clamp(1e-8, 1.0)
    entropy = -(p * torch.log(p)).sum(-1)
    w = (sigma + entropy) ** gamma
    ce = F.cross_entropy(logits.float(), target, reduction="none") * mask
    return (w / w.mean() * ce).mean()


def loss_fn(case: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_mile.loss import weighted_lm_loss

    if case == "megatron_ce":
        return lambda x, t, m: (vocab_parallel_cross_entropy(x, t) * m).sum() / m.sum()
    if case == "original_mile":
        return original_mile
    kind, _, inplace = case.partition("_")
    return lambda x, t, m: weighted_lm_loss(x, t, m, kind=kind, inplace=bool(inplace))[0]


class LogitsHarness:
    """This rank's logits shard, targets and mask, and a producer node that drops the gradient."""

    def __init__(self, rows: int, vocab: int, tp: int, rank: int, device: str, dtype: torch.dtype):
        gen = torch.Generator().manual_seed(0)
        full_target = torch.randint(0, vocab, (rows,), generator=gen)
        part = vocab // tp
        source = 2 * torch.randn(rows, part, generator=torch.Generator().manual_seed(1 + rank))
        self.source = source.to(device=device, dtype=dtype)
        self.buffer = torch.empty_like(self.source)
        self.target, self.mask = full_target.to(device), torch.ones(rows, device=device)
        self.anchor = torch.zeros((), requires_grad=True, device=device)
        buffer = self.buffer

        class Produce(torch.autograd.Function):
            @staticmethod
            def forward(ctx, _anchor):
                return buffer.detach()

            @staticmethod
            def backward(ctx, grad):
                return None

        self.produce = Produce

    def run(self, fn) -> None:
        fn(self.produce.apply(self.anchor), self.target, self.mask).backward()


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def peak_extra_rss(harness: LogitsHarness, fn) -> float:
    """Peak resident memory above the start across one forward+backward after a warm-up, in units
    of the logits' bytes (Linux; see the module docstring)."""
    harness.buffer.copy_(harness.source)
    harness.run(fn)  # warm-up: lazy initialisation is not the loss's memory
    harness.buffer.copy_(harness.source)
    if dist.is_initialized():
        dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss_kib("VmRSS")
    harness.run(fn)
    return (rss_kib("VmHWM") - base) * 1024 / harness.buffer.nbytes


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _time_cases(harness: LogitsHarness, fns: dict, repeats: int, cuda: bool) -> dict[str, float]:
    """Median forward+backward seconds per case, the cases interleaved, after one warm-up round."""
    sync = torch.cuda.synchronize if cuda else lambda: None
    times: dict[str, list[float]] = {case: [] for case in fns}
    for rep in range(repeats + 1):  # round 0 is a warm-up
        for case, fn in fns.items():
            harness.buffer.copy_(harness.source)
            sync()
            if dist.get_world_size() > 1:
                dist.barrier()
            start = time.perf_counter()
            harness.run(fn)
            sync()
            if rep:
                times[case].append(time.perf_counter() - start)
    return {case: statistics.median(ts) for case, ts in times.items()}


def _cuda_peak_extra(harness: LogitsHarness, fns: dict) -> dict[str, float]:
    """Peak allocated bytes above the start across one forward+backward, over the logits' bytes."""
    out = {}
    for case, fn in fns.items():
        harness.buffer.copy_(harness.source)
        harness.run(fn)  # warm-up
        harness.buffer.copy_(harness.source)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        harness.run(fn)
        torch.cuda.synchronize()
        out[case] = (torch.cuda.max_memory_allocated() - base) / harness.buffer.nbytes
    return out


def _worker(rank: int, tp: int, store: str, mode: str, cases: list[str], args: argparse.Namespace,
            results) -> None:
    """One rank: ``mode`` "time", "memory" or (on CUDA, where memory needs no special process) "both"."""
    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=tp)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    harness = LogitsHarness(args.rows, args.vocab, tp, rank, args.device, DTYPES[args.dtype])
    fns = {case: loss_fn(case) for case in cases}
    out: dict[str, dict[str, float]] = {}
    if mode in ("time", "both"):
        out["time"] = _time_cases(harness, fns, args.repeats, cuda)
    if mode in ("memory", "both"):
        out["memory"] = (_cuda_peak_extra(harness, fns) if cuda
                         else {case: peak_extra_rss(harness, fn) for case, fn in fns.items()})
    results.put((rank, out))
    dist.destroy_process_group()


class WorkerFailed(RuntimeError):
    pass


def spawn(tp: int, mode: str, cases: list[str], args: argparse.Namespace,
          target: Callable = _worker) -> list[dict[str, dict[str, float]]]:
    """Run ``target`` on ``tp`` fresh ranks and return their results, in rank order.

    A rank that dies (a crash, an out-of-memory kill) fails the run within about a second, with the
    other ranks killed, instead of leaving them waiting in a collective for the missing one.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if mode == "memory" and args.device == "cpu":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=target, args=(r, tp, os.path.join(tmp, "store"), mode, cases, args, results))
                 for r in range(tp)]
        for p in procs:
            p.start()
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
        outs = {}
        try:
            while len(outs) < tp:
                try:
                    rank, out = results.get(timeout=1.0)
                except queue.Empty:
                    dead = [(r, p.exitcode) for r, p in enumerate(procs) if r not in outs and p.exitcode is not None]
                    if not dead:
                        continue
                    try:  # a rank exits right after its put: its result may still be in the pipe
                        rank, out = results.get(timeout=1.0)
                    except queue.Empty:
                        rank, code = dead[0]
                        raise WorkerFailed(f"rank {rank} of the TP={tp} {mode} run exited with code {code} "
                                           "without a result (its error, if any, is above)") from None
                outs[rank] = out
        finally:
            for p in procs:
                if len(outs) < tp:
                    p.kill()
                p.join()
    return [outs[r] for r in range(tp)]


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return re.search(r"Model name:\s+(.*)", text).group(1).strip()
    except (OSError, subprocess.CalledProcessError, AttributeError):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the logits' dtype")
    args = parser.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device on this machine")
        args.tp = [1]  # one GPU

    table: dict[int, dict[str, tuple[float, float]]] = {}
    try:
        for tp in args.tp:
            cases = [c for c in CASES if tp == 1 or c != "original_mile"]
            if args.device == "cuda":  # the caching allocator's statistics need no process of their own
                out = spawn(tp, "both", cases, args)[0]
                times, memory = out["time"], out["memory"]
            else:  # separate process groups: the memory one runs with MALLOC_MMAP_THRESHOLD_
                times = spawn(tp, "time", cases, args)[0]["time"]
                ranks = spawn(tp, "memory", cases, args)
                memory = {case: max(r["memory"][case] for r in ranks) for case in cases}
            table[tp] = {case: (times[case], memory[case]) for case in cases}
    except WorkerFailed as exc:
        sys.exit(f"loss_bench: {exc}")

    machine = (f"GPU: {torch.cuda.get_device_name()}" if args.device == "cuda"
               else f"CPU: {cpu_model()}, {os.cpu_count()} cores, 1 thread per rank")
    print(f"`python benchmarks/loss_bench.py {' '.join(sys.argv[1:])}`".replace(" `", "`"))
    print(f"{args.rows} x {args.vocab} {args.dtype} logits, fwd+bwd, median of {args.repeats}; "
          f"torch {torch.__version__}; {machine}; load average at the end {os.getloadavg()[0]:.2f}\n")
    header = "| case |" + "".join(f" TP={tp} time ms | TP={tp} time / megatron | TP={tp} peak extra / logits |"
                                  for tp in table)
    print(header)
    print("|" + "---|" * (1 + 3 * len(table)))
    for case in CASES:
        cells = []
        for tp, rows in table.items():
            if case not in rows:
                cells.append(" n/a | n/a | n/a |")
                continue
            seconds, extra = rows[case]
            base = rows["megatron_ce"][0]
            cells.append(f" {1e3 * seconds:.0f} | {seconds / base:.2f}x | {extra:.3f}x |")
        print(f"| {case} |" + "".join(cells))

    print()
    for tp, rows in table.items():
        t, m = rows["mile_inplace"][0] / rows["megatron_ce"][0], rows["mile_inplace"][1]
        checks = [f"MiLe in-place time {t:.2f}x megatron CE (target <= 1.0x): {'met' if t <= 1.0 else 'MISSED'}",
                  f"MiLe in-place peak extra {m:.3f}x (target <= 0.1x): {'met' if m <= 0.1 else 'MISSED'}",
                  f"MiLe out-of-place peak extra {rows['mile'][1]:.3f}x (target <= 1.1x): "
                  f"{'met' if rows['mile'][1] <= 1.1 else 'MISSED'}"]
        if "original_mile" in rows:
            speedup = rows["original_mile"][0] / rows["mile_inplace"][0]
            checks.append(f"MiLe in-place {speedup:.1f}x faster than the original (target >= 4x): "
                          f"{'met' if speedup >= 4 else 'MISSED'}")
        print(f"TP={tp}: " + "; ".join(checks))


if __name__ == "__main__":
    main()
