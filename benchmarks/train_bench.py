"""Training throughput of MiLe against cross-entropy, measured in the same run.

    python benchmarks/train_bench.py                                   # CPU: tiny model, demo data
    python benchmarks/train_bench.py --preset 468M --bf16 --seq-length 1024 \\
        --micro-batch-size 8 --global-batch-size 8 --iters 30          # one GPU: tokens/s and MFU

Each case is a real ``megatron_mile.train`` run (torchrun, one process) on the demo corpus,
built on the first call by ``examples/prepare_demo_data.sh``. The cases alternate
(CE, MiLe, CE, MiLe, ...) so that drift on a shared machine hits both alike; the number kept
for each run is the median tokens/s over its logging windows after the first (warm-up), and
each loss's figure is the median over its rounds. MiLe is reported as a ratio to CE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prepare_demo(data_dir: str) -> tuple[str, str]:
    out = subprocess.run(["bash", os.path.join(REPO, "examples", "prepare_demo_data.sh"), data_dir],
                         env={**os.environ, "PYTHON": sys.executable}, check=True, capture_output=True, text=True)
    blend, tokenizer = out.stdout.strip().splitlines()[-2:]
    return blend, tokenizer


def run_once(args: argparse.Namespace, loss: str, blend: str, tokenizer: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as save:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               "-m", "megatron_mile.train", "--model-preset", args.preset, "--loss", loss,
               "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
               "--global-batch-size", str(args.global_batch_size), "--train-iters", str(args.iters),
               "--lr-warmup-iters", "1", "--log-interval", str(args.log_interval), "--eval-interval", str(10 * args.iters),
               "--data-path", blend, "--tokenizer-model", tokenizer, "--metrics-file", f"{save}/metrics.jsonl",
               "--tensorboard-dir", f"{save}/tb"]
        if args.bf16:
            cmd.append("--bf16")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"train_bench: {loss} run failed:\n{proc.stderr[-3000:]}")
        with open(f"{save}/metrics.jsonl") as f:
            windows = [r for r in map(json.loads, f) if r["type"] == "train"][1:]
    if not windows:
        sys.exit("train_bench: --iters must cover at least two --log-interval windows")
    result = {"tokens_per_sec": statistics.median(w["tokens_per_sec"] for w in windows)}
    if "mfu" in windows[0]:
        result["mfu"] = statistics.median(w["mfu"] for w in windows)
        result["tflops_per_gpu"] = statistics.median(w["tflops_per_gpu"] for w in windows)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--data-dir", default=os.path.join(REPO, "data", "demo"))
    args = p.parse_args()

    blend, tokenizer = prepare_demo(args.data_dir)
    runs: dict[str, list[dict[str, float]]] = {"ce": [], "mile": []}
    for _ in range(args.rounds):
        for loss in runs:
            runs[loss].append(run_once(args, loss, blend, tokenizer))

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads)"
    print(f"device: {device}")
    print(f"config: preset {args.preset}, seq {args.seq_length}, micro-batch {args.micro_batch_size}, "
          f"global batch {args.global_batch_size}, {args.iters} iters x {args.rounds} rounds"
          f"{', bf16' if args.bf16 else ''}")
    print("| loss | tokens/s (median) | ratio to CE | MFU |")
    print("|---|---|---|---|")
    ce_tps = statistics.median(r["tokens_per_sec"] for r in runs["ce"])
    for loss, results in runs.items():
        tps = statistics.median(r["tokens_per_sec"] for r in results)
        mfu = f"{100 * statistics.median(r['mfu'] for r in results):.1f}%" if "mfu" in results[0] else "n/a"
        print(f"| {loss} | {tps:,.0f} | {tps / ce_tps:.3f}x | {mfu} |")


if __name__ == "__main__":
    main()
