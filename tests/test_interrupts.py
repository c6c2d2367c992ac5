"""Stopping a run early: Ctrl-C, a preemption signal, a time limit (2 gloo ranks, the real trainer)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from dist_utils import run_ranks
from training_utils import losses, train, train_command, train_env

LONG = 400  # iterations: a run that is still going when the signal comes


class Running:
    """A training command started in its own process group, its stdout read as it comes."""

    def __init__(self, command: list[str]):
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=train_env(), start_new_session=True)
        self.stdout: list[str] = []
        self._reader = threading.Thread(target=lambda: self.stdout.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def wait_for_iteration(self, iteration: int, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        pattern = re.compile(r"iter (\d+)/")
        while self.proc.poll() is None and time.time() < deadline:
            if any((m := pattern.match(line)) and int(m.group(1)) >= iteration for line in list(self.stdout)):
                return
            time.sleep(0.05)
        raise AssertionError(f"no iteration {iteration}:\n{''.join(self.stdout)}{self.proc.stderr.read()}")

    def workers(self) -> list[int]:
        """torchrun's worker processes, in the order it started them (local rank order)."""
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            return sorted(int(pid) for pid in f.read().split())

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        stderr = self.proc.stderr.read()
        self.proc.wait(timeout)
        self._reader.join(timeout)
        return self.proc.returncode, stderr


def test_ctrl_c_prints_one_line_and_exits_130(demo, tmp_path):
    """Ctrl-C at a terminal signals the launcher's process group; torchrun forwards SIGINT to each
    worker (each runs in its own process group, detached from the terminal). Not a traceback from
    any of them."""
    save = str(tmp_path / "run")
    run = Running(train_command(demo, 2, save, "--save-interval", "2", iters=LONG, launcher="megatron_mile.launch"))
    run.wait_for_iteration(3)
    os.killpg(run.proc.pid, signal.SIGINT)
    code, stderr = run.finish()
    lines = [line for line in stderr.splitlines() if not line.startswith("INFO ")]
    assert code == 130 and len(lines) == 1, stderr
    match = re.fullmatch(rf"megatron-mile-train: interrupted at iteration (\d+); last checkpoint: iteration (\d+) "
                         rf"\(resume with --load {re.escape(save)}\)", lines[0])
    assert match, lines
    last = int(open(os.path.join(save, "latest_checkpointed_iteration.txt")).read())
    assert int(match.group(2)) == last and last >= 2 and int(match.group(1)) in (last, last + 1, last + 2)


@pytest.fixture(scope="module")
def uninterrupted(demo, tmp_path_factory):
    return train(demo, tmp_path_factory.mktemp("full"), "full", 2, "--tensor-model-parallel-size", "2", iters=20)


def test_preemption_signal_on_one_rank_saves_everywhere_and_resumes_exactly(demo, tmp_path, uninterrupted):
    """--exit-signal-handler: SIGTERM reaches one worker only; both finish the iteration, save the
    same checkpoint and exit 0, and the resumed run equals an uninterrupted one exactly."""
    save = str(tmp_path / "run")
    flags = ["--tensor-model-parallel-size", "2", "--exit-signal-handler"]
    run = Running(train_command(demo, 2, save, *flags, iters=20))
    run.wait_for_iteration(3)
    os.kill(run.workers()[0], signal.SIGTERM)
    code, stderr = run.finish()
    assert code == 0, stderr
    (exit_line,) = [line for line in run.stdout if line.startswith("exiting at iteration")]
    stopped = int(re.match(r"exiting at iteration (\d+): SIGTERM received \(--exit-signal-handler\)", exit_line)[1])
    assert 3 <= stopped < 20
    assert int(open(os.path.join(save, "latest_checkpointed_iteration.txt")).read()) == stopped

    resumed = train(demo, tmp_path, "resumed", 2, *flags, "--load", save, iters=20, save=save)
    assert [r["iteration"] for r in resumed] == list(range(1, 21))
    np.testing.assert_array_equal(losses(resumed), losses(uninterrupted))
    np.testing.assert_array_equal(losses(resumed, "grad_norm"), losses(uninterrupted, "grad_norm"))


def _reasons(rank: int, world_size: int) -> list[str | None]:
    """Rank 1 alone gets the signal, and rank 1's clock alone passes its time limit."""
    import torch

    from megatron_mile.interrupts import ExitConditions

    cpu = torch.device("cpu")
    exits = ExitConditions("SIGUSR1", None)
    before = exits.reason(cpu)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    # The same limit everywhere in a real run; here only rank 1's has passed.
    late = ExitConditions(None, 1e-9 if rank == 1 else 1e6)
    return [before, exits.reason(cpu), late.reason(cpu)]


def test_every_rank_stops_when_one_has_a_reason():
    for before, signalled, late in run_ranks(_reasons, 2):
        assert (before, signalled) == (None, "SIGUSR1 received (--exit-signal-handler)")
        assert late.startswith("--exit-duration-in-mins") and late.endswith("reached")
