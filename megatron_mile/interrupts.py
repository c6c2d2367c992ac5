"""Stopping a run early: Ctrl-C, preemption signals and time limits.

**Ctrl-C** (SIGINT) stops at once. Every rank stops where it is; the first rank prints one
line, e.g. ``interrupted at iteration 13; last checkpoint: iteration 10 (resume with --load
runs/x)``, and the process exits with 130. torchrun forwards SIGINT to every worker, but they
stop at slightly different moments, so a rank can find its peer gone from a collective before
its own SIGINT arrives; errors raised after an interrupt are consequences of it and stay quiet.

**Preemption and time limits** (Megatron-LM's ``--exit-signal-handler``, ``--exit-signal`` and
``--exit-duration-in-mins``) stop at an iteration boundary with a checkpoint. The signal handler
only records the signal. A signal reaches the ranks at different moments (or only some of
them), and every rank reads its own clock, so at the end of each iteration one MAX all-reduce
of the two flags makes the decision common: every rank saves the same checkpoint and exits 0.
With neither option on, nothing is checked or communicated.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist

# Megatron-LM's --exit-signal choices.
EXIT_SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT, "SIGUSR1": signal.SIGUSR1,
                "SIGUSR2": signal.SIGUSR2}
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT

# --exit-duration-in-mins counts from here: the trainer's start, as near as it can know it.
STARTED = time.monotonic()

_interrupted = False
_trainer_pid: int | None = None
_describe: Callable[[], str] | None = None


class Interrupted(Exception):
    """Ctrl-C stopped the run; the message is the one line to print."""


def _on_interrupt(signum, frame) -> None:
    global _interrupted
    if os.getpid() != _trainer_pid:  # a forked helper (a checkpoint writer): the trainer reports
        os._exit(INTERRUPTED_EXIT_CODE)
    _interrupted = True
    raise KeyboardInterrupt


def catch_interrupts() -> None:
    """SIGINT raises KeyboardInterrupt as usual, and is remembered (see ``interrupted``)."""
    global _trainer_pid
    _trainer_pid = os.getpid()
    signal.signal(signal.SIGINT, _on_interrupt)


def interrupted() -> bool:
    """True once this process received SIGINT: later errors are its consequences."""
    return _interrupted


def describe_interrupt_with(describe: Callable[[], str]) -> None:
    """Where the run stands, as ``interrupt_message`` words it, for an interrupt that surfaces as
    another error: a peer that stopped first can break this rank's collective, and this rank's
    SIGINT then lands while that error is being handled."""
    global _describe
    _describe = describe


def exit_quietly_on_interrupt(prog: str) -> Callable[[Callable], Callable]:
    """Decorate an entry point: Ctrl-C ends it with ``Interrupted``'s one line (from rank 0) and 130.

    Any error after an interrupt is taken as its consequence and ends the same way, silently.
    """

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def wrapper(*args, **kwargs):
            catch_interrupts()
            try:
                return main(*args, **kwargs)
            except Interrupted as err:
                _exit_interrupted(f"{prog}: {err}")
            except BaseException:
                if interrupted():
                    _exit_interrupted(f"{prog}: {_describe()}" if _describe else None)
                raise

        return wrapper

    return decorate


def _exit_interrupted(message: str | None) -> None:
    if message and os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter teardown: it would wait on, or warn about, a process group left mid-collective.
    # It would also have stopped the helpers multiprocessing started (the checkpoint writer's).
    for child in multiprocessing.active_children():
        child.terminate()
    os._exit(INTERRUPTED_EXIT_CODE)


def interrupt_message(iteration: int | None, save: str | None, last_checkpoint: int | None) -> str:
    """The one line printed on Ctrl-C. ``iteration`` is None when start-up was interrupted."""
    where = "interrupted during start-up" if iteration is None else f"interrupted at iteration {iteration}"
    if not save:
        return f"{where}; nothing saved (no --save)"
    if last_checkpoint is None:
        return f"{where}; no checkpoint in {save} yet"
    return f"{where}; last checkpoint: iteration {last_checkpoint} (resume with --load {save})"


class ExitConditions:
    """``--exit-signal-handler`` / ``--exit-signal`` and ``--exit-duration-in-mins``, agreed by every rank."""

    def __init__(self, exit_signal: str | None, duration_mins: float | None):
        self.exit_signal = exit_signal
        self.duration_mins = duration_mins
        self._received = False
        if exit_signal:
            signal.signal(EXIT_SIGNALS[exit_signal], self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._received = True

    @property
    def active(self) -> bool:
        return bool(self.exit_signal or self.duration_mins)

    def reason(self, device: torch.device) -> str | None:
        """Collective when active: why every rank stops now, or None to go on."""
        if not self.active:
            return None
        over_time = bool(self.duration_mins) and (time.monotonic() - STARTED) / 60 > self.duration_mins
        flags = torch.tensor([float(self._received), float(over_time)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        received, over_time = (bool(flag) for flag in flags.tolist())
        if received:
            return f"{self.exit_signal} received (--exit-signal-handler)"
        if over_time:
            return f"--exit-duration-in-mins {self.duration_mins:g} reached"
        return None
