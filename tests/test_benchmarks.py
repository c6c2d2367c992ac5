"""The loss benchmark's CLI on a tiny problem, and how the training benchmark runs its cases
(the numbers themselves live in BENCHMARKS.md)."""

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


def _train_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_bench", os.path.join(REPO, "benchmarks", "train_bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gone(pid: int) -> bool:
    """Dead (or a zombie waiting for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_train_bench_timeout_kills_the_whole_process_group(tmp_path):
    bench = _train_bench()
    pid_file = tmp_path / "grandchild.pid"
    # A run that starts a grandchild (as torchrun starts its workers) and then hangs.
    script = ("import subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(600)")
    with pytest.raises(bench.RunFailed) as failed:
        bench.run_captured("hang", [sys.executable, "-c", script], dict(os.environ), timeout=5)
    assert str(failed.value).startswith("hang: timed out after 5 s") and str(failed.value).rstrip().endswith("started")
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(grandchild)


def test_train_bench_per_round_ratios_pair_each_run_with_its_baseline():
    bench = _train_bench()
    hf = [{"tokens_per_sec": t} for t in (4000.0, 3000.0, 5000.0)]
    runs = [{"tokens_per_sec": t} for t in (3600.0, 3300.0, 5000.0)]  # 0.9, 1.1 and 1.0 of the round's baseline
    assert bench.per_round_ratios(hf, runs) == "0.90-1.10 (median 1.00)"
    with pytest.raises(ValueError):
        bench.per_round_ratios(hf, runs[:2])


def test_train_bench_keeps_a_failing_runs_whole_output():
    bench = _train_bench()
    script = "import sys; print('first line'); print('x' * 10000); sys.exit(3)"
    with pytest.raises(bench.RunFailed) as failed:
        bench.run_captured("fails", [sys.executable, "-c", script], dict(os.environ), timeout=60)
    message = str(failed.value)
    assert message.startswith("fails: exit code 3") and "first line" in message and "x" * 10000 in message


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


def test_step_profile_times_and_profiles_the_trainer_against_hugging_face(demo, tmp_path):
    import re

    from training_utils import demo_data_dir

    data = demo_data_dir(demo, tmp_path / "demo")
    shape = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "176",
             "--seq-length", "32"]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "step_profile.py"), "--baseline-hf",
                           "--steps", "3", "--block", "2", "--warmup", "1", "--profile", "1", "--rows", "5",
                           "--data-dir", data, "--", *shape], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    medians = dict(re.findall(r"^(this|baseline)\b.*?median step ([0-9.]+) ms wall", proc.stdout, re.M))
    assert set(medians) == {"this", "baseline"}, proc.stdout
    assert "baseline (Hugging Face LlamaForCausalLM, SDPA, AdamW)" in proc.stdout
    ratio = float(re.search(r"^this / baseline step time: ([0-9.]+) wall", proc.stdout, re.M).group(1))
    assert ratio == pytest.approx(float(medians["this"]) / float(medians["baseline"]), rel=0.02)  # medians rounded
    assert "### this: 1 steps" in proc.stdout and "### baseline: 1 steps" in proc.stdout
    assert proc.stdout.count("by self CPU time:") == 2 and "aten::mm" in proc.stdout


def test_step_profile_baseline_runs_megatron_cores_glu(demo, tmp_path):
    from training_utils import demo_data_dir

    data = demo_data_dir(demo, tmp_path / "demo")
    shape = ["--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "176",
             "--seq-length", "32"]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "step_profile.py"),
                           "--baseline-megatron-core-glu", "--steps", "1", "--block", "1", "--warmup", "1",
                           "--profile", "1", "--rows", "1000", "--data-dir", data, "--", *shape],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "baseline (megatron-core's GLU)" in proc.stdout
    this, baseline = proc.stdout.split("### this: 1 steps")[1].split("### baseline: 1 steps")
    # megatron-mile's autograd function in one arm only; megatron-core's chunk -> silu -> mul in the other.
    assert "_SwiGLUFunction" in this and "_SwiGLUFunction" not in baseline
    assert "SiluBackward0" in baseline and "SiluBackward0" not in this
