"""The launchers: the multi-node scripts (examples/pretrain_{468M,1.2B,6.7B}.sh) through
DRY_RUN=1, and the torchrun front end they run (megatron_mile.launch).

Each script must reproduce the paper's batch (about 1M tokens per step for 468M and 1.2B, 4M
for 6.7B) and budget (about 100B tokens) on its GPU count, and hand the trainer flags that pass
its own checks at that world size; a bad setting ends it in one line, before torchrun starts.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys

import pytest

from training_utils import demo_data_dir, read_records, train_command, train_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(REPO, "examples", script), *args], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, **env}, timeout=120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _flags(command: list[str]) -> dict[str, str]:
    """The value after each --flag (the last one wins, as with argparse)."""
    return {flag: value for flag, value in zip(command, command[1:]) if flag.startswith("--")}


@pytest.mark.parametrize("script,nodes,tokens_per_step,tp,sequence_parallel", [
    ("pretrain_468M.sh", 2, 1024 * 1024, 1, False),
    ("pretrain_1.2B.sh", 4, 1024 * 1024, 1, False),
    ("pretrain_6.7B.sh", 16, 2048 * 2048, 2, True),
])
def test_launcher_reproduces_the_papers_batch_and_budget(script, nodes, tokens_per_step, tp, sequence_parallel,
                                                         tmp_path, demo):
    from megatron_mile.arguments import parse_args, validate

    proc = _launch(script, "10.0.0.1", "1", "29600", LOSS="focal", GAMMA="2.0", SAVE=str(tmp_path),
                   DATA_PATH=demo["blend"], TOKENIZER=demo["tokenizer"])
    assert proc.returncode == 0, proc.stderr
    # The trainer's own check ran at the launcher's world size.
    assert f"megatron-mile-train: configuration OK at world size {8 * nodes}; no checkpoint in {tmp_path}; " \
           "starting from iteration 0" in proc.stderr
    command = shlex.split(proc.stdout)
    assert command[1:3] == ["-m", "megatron_mile.launch"]
    launcher = _flags(command[:command.index("megatron_mile.train")])
    assert (launcher["--nnodes"], launcher["--nproc-per-node"], launcher["--node-rank"]) == (str(nodes), "8", "1")
    assert (launcher["--master-addr"], launcher["--master-port"]) == ("10.0.0.1", "29600")

    trainer = parse_args(command[command.index("megatron_mile.train") + 1:])
    validate(trainer, world_size=8 * nodes)
    assert trainer.global_batch_size * trainer.seq_length == tokens_per_step
    assert trainer.train_iters * tokens_per_step == pytest.approx(100e9, rel=1e-4)
    assert (trainer.tensor_model_parallel_size, trainer.sequence_parallel) == (tp, sequence_parallel)
    assert (trainer.loss, trainer.mile_gamma, trainer.bf16) == ("focal", 2.0, True)
    # The paper's recipe.
    assert (trainer.lr, trainer.min_lr, trainer.lr_warmup_iters, trainer.weight_decay) == (3e-4, 3e-5, 2000, 0.1)
    assert (trainer.adam_beta1, trainer.adam_beta2, trainer.clip_grad) == (0.9, 0.95, 1.0)
    assert trainer.save == trainer.load == str(tmp_path)
    # Preemption: save at the next iteration boundary on SIGTERM, then exit.
    assert (trainer.exit_signal_handler, trainer.exit_signal) == (True, "SIGTERM")


@pytest.mark.parametrize("env,args,message", [
    ({"TP": "3"}, ["h", "0"], "16 GPUs are not divisible by TP 3 x PP 1"),
    ({"MICRO_BATCH_SIZE": "7"}, ["h", "0"], "GLOBAL_BATCH_SIZE 1024 is not divisible by MICRO_BATCH_SIZE 7 x DP 16"),
    ({"LOSS": "mse"}, ["h", "0"], "LOSS must be ce, focal or mile, got 'mse'"),
    ({}, ["h", "2"], "NODE_RANK 2 must be below NNODES 2"),
    ({}, ["h"], "expected 2 or 3 arguments"),
    ({"EXIT_SIGNAL": "SIGKILL"}, ["h", "0"], "EXIT_SIGNAL must be SIGTERM, SIGINT, SIGUSR1 or SIGUSR2"),
    # Found by the trainer's own check, at the launcher's world size, before torchrun starts.
    ({"EXTRA_ARGS": "--mile-gamma -1"}, ["h", "0"], "megatron-mile-train: error: --mile-gamma must be >= 0"),
    ({"DATA_PATH": "/no/such/blend.json"}, ["h", "0"], "megatron-mile-train: error: /no/such/blend.json: cannot read"),
])
def test_launcher_rejects_a_bad_setting_in_one_line(env, args, message, demo, tmp_path):
    env = {"DATA_PATH": demo["blend"], "TOKENIZER": demo["tokenizer"], "SAVE": str(tmp_path), **env}
    proc = _launch("pretrain_468M.sh", *args, **env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and not proc.stdout
    assert len(lines) == 1 and message in lines[0], lines
    assert lines[0].startswith(("pretrain_468M.sh: error: ", "megatron-mile-train: error: ")), lines


def test_slurm_variant_runs_the_size_launcher_on_every_node(tmp_path, demo):
    """With stand-ins for scontrol and srun (one task per node, as Slurm would start them)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                                  'for node in 0 1; do SLURM_NODEID=$node "$@" || exit; done\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DRY_RUN": "1", "PYTHON": sys.executable,
           "SLURM_SUBMIT_DIR": REPO, "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
           "DATA_PATH": demo["blend"], "TOKENIZER": demo["tokenizer"], "SAVE": str(tmp_path / "run")}
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", "slurm_pretrain.sbatch"), "468M"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = [_flags(shlex.split(line)) for line in proc.stdout.strip().splitlines()]
    assert [c["--node-rank"] for c in commands] == ["0", "1"]
    assert {(c["--nnodes"], c["--master-addr"], c["--master-port"]) for c in commands} == {("2", "gpu-a", "24242")}


def test_launch_checks_the_configuration_before_starting_any_worker(demo, tmp_path):
    """At torchrun's world size (3 ranks: 4 heads do not split over TP 3), in one line."""
    command = train_command(demo, 3, str(tmp_path / "run"), "--tensor-model-parallel-size", "3",
                            launcher="megatron_mile.launch")
    proc = subprocess.run(command, capture_output=True, text=True, env=train_env(), timeout=120)
    assert proc.returncode == 2 and not os.path.exists(tmp_path / "run")
    assert proc.stderr.splitlines() == ["megatron-mile-train: error: --num-attention-heads 4 is not divisible by "
                                        "--tensor-model-parallel-size 3"]


def test_launch_leaves_a_workers_one_line_error_alone(demo, tmp_path):
    """An error only the workers can find (here, a checkpoint that its pointer names but that is
    gone) is the trainer's one line and exit 2, without torchrun's ChildFailedError report."""
    run = str(tmp_path / "run")
    os.makedirs(run)
    with open(os.path.join(run, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("2\n")
    proc = subprocess.run(train_command(demo, 1, run, "--load", run, iters=3, launcher="megatron_mile.launch"),
                          capture_output=True, text=True, env=train_env(), timeout=600)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("INFO ")]
    assert proc.returncode == 2
    assert errors == [f"megatron-mile-train: error: {run}/latest_checkpointed_iteration.txt names iteration 2 but "
                      f"{run}/iter_0000002 is missing"], proc.stderr


def test_cpu_demo_checks_first_scales_its_warm_up_and_never_deletes_blindly(demo, tmp_path):
    """A bad setting stops the demo before anything is touched; a short run (below the default
    warm-up of 30) works; a rerun replaces the earlier run's outputs and nothing else."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    env = {**os.environ, "PYTHON": sys.executable, "DATA_DIR": demo_data_dir(demo, tmp_path / "data"),
           "RUN_DIR": str(run), "MASTER_PORT": str(_free_port())}
    script = ["bash", os.path.join(REPO, "examples", "pretrain_tiny_cpu.sh")]
    bad = subprocess.run(script, capture_output=True, text=True, env={**env, "TRAIN_ITERS": "3O"}, timeout=60)
    assert bad.returncode == 2 and bad.stderr == "pretrain_tiny_cpu.sh: error: TRAIN_ITERS must be a positive " \
                                                 "integer, got '3O'\n"
    (run / "metrics.jsonl").write_text('{"type": "train", "iteration": 7}\n')  # an earlier run's
    done = subprocess.run(script, capture_output=True, text=True, env={**env, "TRAIN_ITERS": "3"}, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--overwrite: removed metrics.jsonl" in done.stdout
    assert [r["iteration"] for r in read_records(str(run), "train")] == [3]
    assert (run / "notes.txt").read_text() == "mine" and (run / "curves.png").is_file()
