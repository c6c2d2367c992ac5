"""The loss benchmark's CLI on a tiny problem (the numbers themselves live in BENCHMARKS.md)."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_BENCH = os.path.join(REPO, "benchmarks", "loss_bench.py")


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
