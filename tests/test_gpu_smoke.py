"""benchmarks/gpu_smoke.sh and the fused-SwiGLU fallback it reports, on a machine without a GPU.

The script's plan comes from ``--dry-run``: its steps' limits must fit 300 s, its Python entry
points must accept their arguments (parsed by the scripts' own parsers, nothing run) and its test
selection must collect the CUDA-relevant loss and multi-tensor tests. Its input checks and its time limit run for
real.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import stat
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_smoke.sh")
ENV = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": REPO, "PYTHONWARNINGS": "ignore"}

# Runs each script (a JSON list of argv lists) up to its argparse call, in one interpreter: prints,
# per script, argparse's exit status (0 when the arguments parse) and its error message.
PARSE_ONLY = """import argparse, contextlib, io, json, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_only(self, *args, **kwargs):
    parse(self, *args, **kwargs)
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_only
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv, err = argv, io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            runpy.run_path(argv[0], run_name="__main__")
        results.append((None, "ran past its argument parsing"))
    except SystemExit as exit:
        results.append((exit.code, err.getvalue().strip()))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def plan() -> dict[str, tuple[int, list[str]]]:
    proc = subprocess.run(["bash", SCRIPT, "--dry-run"], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    steps = {name: (int(limit), shlex.split(cmd)) for kind, name, limit, cmd in
             (line.split("\t") for line in proc.stdout.splitlines() if line.startswith("step\t"))}
    total = sum(limit for limit, _ in steps.values())
    assert proc.stdout.strip().splitlines()[-1] == f"total limit: {total} s"
    return steps


@pytest.fixture(scope="module")
def parsed(plan) -> dict[str, tuple[int | None, str]]:
    """Each Python script step's arguments, parsed by the script's own parser."""
    names = ["loss bench fp32", "loss bench bf16", "training"]
    argvs = [plan[name][1] for name in names]
    assert all(argv[0] == sys.executable for argv in argvs), argvs
    proc = subprocess.run([sys.executable, "-c", PARSE_ONLY, json.dumps([argv[1:] for argv in argvs])], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip(names, map(tuple, json.loads(proc.stdout.strip().splitlines()[-1]))))


def test_dry_run_plans_every_step_within_300_seconds(plan, parsed):
    assert list(plan) == ["install", "environment", "kernel tests", "loss bench fp32", "loss bench bf16", "training"]
    assert sum(limit for limit, _ in plan.values()) <= 300

    install = plan["install"][1]
    assert install[:4] == [sys.executable, "-m", "pip", "install"] and {"--no-index", "--no-deps"} <= set(install)
    environment = plan["environment"][1]
    compile(environment[environment.index("-c") + 1], "<environment step>", "exec")
    assert parsed["loss bench fp32"] == (0, "") and parsed["loss bench bf16"] == (0, "")

    tests = plan["kernel tests"][1]
    assert tests[:2] == ["env", "MEGATRON_MILE_TEST_DEVICE=cuda"]
    run = subprocess.run([*tests[2:], "--collect-only"], cwd=REPO, env={**ENV, "MEGATRON_MILE_TEST_DEVICE": "cuda"},
                         capture_output=True, text=True, timeout=300)
    collected = [line for line in run.stdout.splitlines() if "::" in line]
    for wanted in ("single_rank", "extreme", "gamma_zero", "no_host_sync", "guard_catches", "no_gradient",
                   "test_l2_norm_matches", "test_scale_in_place", "swiglu_matches_the_float64",
                   "rope_matches_the_float64"):
        assert any(wanted in test for test in collected), (wanted, run.stdout[-2000:])
    # CPU only: multi-rank gloo, CPU memory, and an assertion that no Transformer Engine or Apex is installed.
    cpu_only = ("tensor_parallel", "peak_extra", "installed_where", "at_tp2")
    assert not any(name in test for test in collected for name in cpu_only)


def test_dry_run_training_step_parses(plan, parsed):
    cmd = plan["training"][1]
    assert {"--preset", "--bf16", "--against-hf"} <= set(cmd) and cmd[cmd.index("--preset") + 1] == "468M"
    assert parsed["training"] == (0, "")


def test_missing_inputs_are_named_one_line_each_before_any_work(tmp_path):
    python = tmp_path / "python"  # a real interpreter that sees no site-packages: no megatron-core
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if not os.path.exists(os.path.join(d, "nvidia-smi")))
    data, wheels, out = tmp_path / "data", tmp_path / "wheels", tmp_path / "out"
    data.mkdir()
    wheels.mkdir()

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", SCRIPT, "--output-dir", str(out), "--data-dir", str(data), "--wheel-dir",
                               str(wheels)], env={**ENV, "PYTHON": str(python), "PATH": path}, capture_output=True,
                              text=True, timeout=60)

    proc = run()
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("gpu_smoke: ") for line in lines), proc.stderr
    assert "megatron.core zstandard not installed" in lines[0] and "`make gpu-wheels`" in lines[0]
    assert f"`bash examples/prepare_demo_data.sh {data}`" in lines[1]
    assert "nvidia-smi not found" in lines[2]
    assert "###" not in proc.stdout  # no step ran
    assert all(line in (out / "gpu_smoke.log").read_text() for line in lines)

    (wheels / "megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl").touch()
    for name in ("corpus.jsonl.zst", "tokenizer.model", "demo_text_manifest.json", "blend.json"):
        (data / name).touch()
    proc = run()
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [lines[2]]


LIMITED = r"""
source <(sed -n '/^descendants() {/,/^}/p; /^stop_tree() {/,/^}/p; /^limited() {/,/^}/p' "$1")
limited 2 bash -c 'setsid sleep 600 & echo $! > "$0/escaped.pid"; python3 -c "import time; time.sleep(600)" & wait' "$2"
echo "exit $?"
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_step_over_its_limit_is_stopped_with_every_process_it_started(tmp_path):
    start = time.monotonic()
    proc = subprocess.run(["bash", "-c", LIMITED, "limited", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "exit 124", proc.stdout + proc.stderr
    assert time.monotonic() - start < 30
    escaped = int((tmp_path / "escaped.pid").read_text())  # started with setsid, as torchrun starts its workers
    time.sleep(0.5)
    assert not _alive(escaped)


# ---------------------------------------------------------------- fused SwiGLU: compiled, or not


@pytest.fixture
def compiler(monkeypatch):
    """Dynamo in front of a stand-in for Inductor's compile_fx (compiling for real takes minutes on CPU)."""
    import torch._dynamo
    import torch._inductor.compile_fx as compile_fx

    torch._dynamo.reset()
    yield lambda backend: monkeypatch.setattr(compile_fx, "compile_fx", backend)
    torch._dynamo.reset()


def test_fused_swiglu_falls_back_in_one_line_when_compilation_fails(compiler, caplog):
    from megatron_mile.model import fused_swiglu_compiles

    def broken(*args, **kwargs):
        raise RuntimeError("no working C compiler\nlong details")

    compiler(broken)
    with caplog.at_level(logging.INFO, logger="megatron_mile.model"):
        assert fused_swiglu_compiles(torch.device("cpu"), torch.float32) is False
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "SwiGLU: unfused (torch.compile failed: RuntimeError: no working C compiler)")]


def test_fused_swiglu_is_used_when_it_compiles_and_runs(compiler, caplog):
    from megatron_mile.model import fused_swiglu_compiles

    compiler(lambda graph, example_inputs, *args, **kwargs: graph.forward)
    with caplog.at_level(logging.INFO, logger="megatron_mile.model"):
        assert fused_swiglu_compiles(torch.device("cpu"), torch.float32) is True
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["SwiGLU: fused with torch.compile"]
