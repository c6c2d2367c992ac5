"""The run directory is never clobbered, and a resumed run's metrics never mix two runs.

The start decisions are checked on fake run directories (only the files the decision reads);
three short runs of the real trainer check resume-in-place, TensorBoard's view of it, and
--overwrite.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from training_utils import read_records, train, train_command, train_env

from megatron_mile.arguments import parse_args
from megatron_mile.checkpointing import POINTER, CheckpointError
from megatron_mile.metrics import truncate_records
from megatron_mile.run_dir import plan_start


def _args(*flags: str):
    return parse_args(["--train-iters", "10", "--data-path", "x", "--tokenizer-model", "x", *flags])


def _checkpointed(root, iteration: int) -> str:
    os.makedirs(root / f"iter_{iteration:07d}")
    (root / POINTER).write_text(f"{iteration}\n")
    return str(root)


def test_save_and_load_the_same_new_directory_is_a_first_run(tmp_path):
    run = str(tmp_path / "new")
    plan = plan_start(_args("--save", run, "--load", run))
    assert (plan.resume, plan.load, plan.iteration) == (True, None, 0)
    assert plan.notice == f"no checkpoint in {run}; starting from iteration 0"


def test_save_and_load_the_same_directory_resumes_its_latest_checkpoint(tmp_path):
    run = _checkpointed(tmp_path, 20)
    plan = plan_start(_args("--save", run, "--load", run + "/"))
    assert (plan.resume, plan.load, plan.iteration, plan.notice) == (True, run + "/", 20, None)


def test_a_fresh_start_in_a_directory_with_checkpoints_is_refused(tmp_path):
    run = _checkpointed(tmp_path, 20)
    with pytest.raises(CheckpointError) as err:
        plan_start(_args("--save", run))
    assert str(err.value) == (f"--save {run} already holds checkpoints (latest: iteration 20); resume with --load "
                              f"{run}, or pass a new --save directory or --overwrite")
    # Loading another run does not make it safe to write over this one either.
    other = _checkpointed(tmp_path / "other", 5)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        plan_start(_args("--save", run, "--load", other))
    assert plan_start(_args("--save", run, "--overwrite")).overwrite


@pytest.mark.parametrize("name", ["metrics.jsonl", "tensorboard/events.out.tfevents.1.host"])
def test_a_fresh_start_on_an_earlier_runs_metrics_is_refused(tmp_path, name):
    """A run that never reached its first checkpoint still left metrics that a new run would extend."""
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text('{"type": "train", "iteration": 1}\n')
    with pytest.raises(CheckpointError, match="already hold an earlier run's metrics; resume with --load"):
        plan_start(_args("--save", str(tmp_path)))
    assert plan_start(_args("--save", str(tmp_path), "--load", str(tmp_path))).iteration == 0
    # Empty leftovers (e.g. a TensorBoard directory without events) are no earlier run.
    (tmp_path / name).unlink()
    plan_start(_args("--save", str(tmp_path)))


def test_load_without_a_checkpoint_is_an_error_unless_optional(tmp_path):
    typo = str(tmp_path / "runs" / "tyop")
    with pytest.raises(CheckpointError) as err:
        plan_start(_args("--save", str(tmp_path / "b"), "--load", typo))
    assert str(err.value) == f"no checkpoint in {typo}; check --load, or pass --load-optional to start from iteration 0"
    plan = plan_start(_args("--save", str(tmp_path / "b"), "--load", typo, "--load-optional"))
    assert (plan.load, plan.iteration, plan.notice) == (None, 0, f"no checkpoint in {typo}; starting from iteration 0")


def test_megatron_lm_exit_on_missing_checkpoint(tmp_path):
    run = str(tmp_path / "new")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*new \(--exit-on-missing-checkpoint\)"):
        plan_start(_args("--save", run, "--load", run, "--exit-on-missing-checkpoint"))


def test_overwrite_and_resume_of_the_same_directory_contradict(tmp_path):
    with pytest.raises(CheckpointError, match="--overwrite would remove the checkpoints that --load"):
        plan_start(_args("--save", str(tmp_path), "--load", str(tmp_path), "--overwrite"))


def test_truncate_records_keeps_the_resumed_iterations_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"type": "train", "iteration": i} for i in range(1, 6)] + [{"type": "eval", "iteration": 4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"type": "train", "itera')  # cut by a kill
    assert truncate_records(str(path), 3) == 4
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert truncate_records(str(path), 3) == 0


def _scalars(tensorboard_dir: str, tag: str) -> dict[int, float]:
    """Step -> value as TensorBoard shows it (purged steps hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(tensorboard_dir, purge_orphaned_data=True)
    accumulator.Reload()
    steps = [(event.step, event.value) for event in accumulator.Scalars(tag)]
    assert len(steps) == len({step for step, _ in steps}), steps
    return dict(steps)


def test_resume_in_place_drops_the_metrics_past_the_checkpoint(demo, tmp_path):
    """--save X --load X from the first run on; a run killed after logging iteration 3 with its last
    checkpoint at 2 resumes at 2, and metrics.jsonl and TensorBoard show each iteration once."""
    run = str(tmp_path / "run")
    train(demo, tmp_path, "first", 1, "--load", run, "--save-interval", "2", iters=3, save=run)
    # As if killed after logging iteration 3, before its checkpoint was complete.
    os.rename(os.path.join(run, "iter_0000003"), os.path.join(run, "iter_0000003.tmp"))
    with open(os.path.join(run, POINTER), "w") as f:
        f.write("2\n")
    first = {r["iteration"]: r["loss"] for r in read_records(run, "train")}

    # The same command again, without --load.
    proc = subprocess.run(train_command(demo, 1, run, "--save-interval", "2", iters=4, launcher="megatron_mile.launch"),
                          capture_output=True, text=True, env=train_env(), timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"megatron-mile-train: error: --save {run} already holds checkpoints (latest: "
                                        f"iteration 2); resume with --load {run}, or pass a new --save directory or "
                                        "--overwrite"]

    records = train(demo, tmp_path, "resumed", 1, "--load", run, "--save-interval", "2", iters=4, save=run)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records[:2]] == [first[1], first[2]]
    assert _scalars(os.path.join(run, "tensorboard"), "train/loss") == {r["iteration"]: pytest.approx(r["loss"])
                                                                         for r in records}
    # Checkpoints, metrics and events are as readable as any file the umask lets through.
    umask = os.umask(0)
    os.umask(umask)
    modes = {os.path.relpath(os.path.join(parent, name), run): os.stat(os.path.join(parent, name)).st_mode & 0o777
             for parent, _, names in os.walk(run) for name in names}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_overwrite_removes_exactly_the_earlier_runs_outputs(demo, tmp_path):
    run = tmp_path / "run"
    train(demo, tmp_path, "earlier", 1, "--save-interval", "1", iters=2, save=str(run))
    (run / "notes.txt").write_text("mine")
    assert (run / "data_cache").is_dir()
    proc = subprocess.run(train_command(demo, 1, str(run), "--overwrite", iters=3), capture_output=True, text=True,
                          env=train_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"--overwrite: removed iter_0000001, iter_0000002, {POINTER}, metrics.jsonl, 1 TensorBoard event "
            f"file(s) from {run}") in proc.stdout
    assert [r["iteration"] for r in read_records(str(run), "train")] == [1, 2, 3]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("iter_")) == ["iter_0000003"]
    assert (run / "notes.txt").read_text() == "mine" and (run / "data_cache").is_dir()
