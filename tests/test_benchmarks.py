"""The loss benchmark's CLI on a tiny problem (the numbers themselves live in BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_BENCH = os.path.join(REPO, "benchmarks", "loss_bench.py")
sys.path.insert(0, os.path.dirname(LOSS_BENCH))

import loss_bench  # noqa: E402


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, LOSS_BENCH, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_loss_bench_reports_every_case_for_bf16_logits():
    proc = _run("--rows", "64", "--vocab", "512", "--repeats", "1", "--tp", "1", "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "64 x 512 bf16 logits" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "case" not in line]
    assert [row.split("|")[1].strip() for row in rows] == [
        "megatron_ce", "ce_inplace", "ce", "focal_inplace", "focal", "mile_inplace", "mile", "original_mile"]
    assert " 1.00x |" in rows[0]  # the baseline's ratio to itself


def test_loss_bench_without_cuda_refuses_device_cuda():
    proc = _run("--device", "cuda")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("--device cuda: no CUDA device on this machine")


def _rank_1_dies(rank, tp, store, mode, cases, args, results):
    """Rank 1 joins the process group and dies (as an out-of-memory kill would); rank 0 runs the
    benchmark's own worker, which then waits for rank 1 in a collective."""
    if rank == 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=tp)
        os._exit(3)
    loss_bench._worker(rank, tp, store, mode, cases, args, results)


def test_loss_bench_fails_within_seconds_when_a_rank_dies():
    args = argparse.Namespace(rows=64, vocab=512, repeats=1, device="cpu", dtype="fp32")
    start = time.monotonic()
    with pytest.raises(loss_bench.WorkerFailed, match="rank 1 of the TP=2 time run exited with code 3"):
        loss_bench.spawn(2, "time", ["megatron_ce"], args, target=_rank_1_dies)
    # rank 0 alone would wait for gloo's 30-minute timeout
    assert time.monotonic() - start < 120
