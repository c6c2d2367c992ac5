"""How megatron-mile-train reports a failure: one line from the rank that failed, printed once.

The torchrun runs use pipeline parallelism (PP=2), where the last stage is the only rank that
writes metrics and sees the loss, so a failure there is a failure of one rank.
"""

from __future__ import annotations

import subprocess

import pytest

import data_fixtures
from training_utils import REPO, train_command, train_env

PP2 = ["--pipeline-model-parallel-size", "2", "--train-iters", "2"]


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode != 0
    assert f'File "{REPO}/megatron_mile' not in proc.stderr, proc.stderr[-3000:]  # no traceback of ours
    return [line for line in proc.stderr.splitlines() if line.startswith("megatron-mile-train: error:")]


def test_error_on_the_last_pipeline_stage_only_is_printed_by_that_stage(demo, tmp_path):
    # Only the last stage opens the metrics file; the first stage goes on into the pipeline
    # schedule and fails when its peer leaves, which it must not report.
    (tmp_path / "metrics_dir").mkdir()
    proc = subprocess.run(train_command(demo, 2, str(tmp_path / "run"), *PP2, "--metrics-file",
                                        str(tmp_path / "metrics_dir")),
                          capture_output=True, text=True, env=train_env(), timeout=600)
    assert _errors(proc) == [f"megatron-mile-train: error: --metrics-file {tmp_path / 'metrics_dir'}: cannot write "
                             "there (Is a directory)"]


def test_error_on_every_rank_is_printed_once(demo, tmp_path):
    # Data preprocessed with a larger tokenizer than --tokenizer-model: every rank reads the
    # same batch at DP=1 and refuses it. (Before, only the loss on the last stage saw it.)
    smaller = data_fixtures.train_sentencepiece(str(tmp_path / "small.model"), vocab_size=295)
    proc = subprocess.run(train_command(demo, 2, str(tmp_path / "run"), *PP2, "--seq-length", "128",
                                        "--global-batch-size", "8", "--tokenizer-model", smaller),
                          capture_output=True, text=True, env=train_env(), timeout=600)
    errors = _errors(proc)
    assert len(errors) == 1 and "but --tokenizer-model has 295 tokens" in errors[0], proc.stderr[-3000:]


def test_unexpected_errors_keep_their_traceback(demo, monkeypatch):
    """A bare ValueError is a bug, not a message: it propagates (and Python prints its traceback)."""
    from megatron_mile import train, training
    from megatron_mile.data.errors import DataError

    base = ["--train-iters", "10", "--lr-warmup-iters", "1", "--data-path", demo["blend"],
            "--tokenizer-model", demo["tokenizer"]]
    monkeypatch.setenv("WORLD_SIZE", "1")

    def fails_with(error):
        def pretrain(args):
            raise error
        return pretrain

    monkeypatch.setattr(training, "pretrain", fails_with(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        train.main(base)
    monkeypatch.setattr(training, "pretrain", fails_with(DataError("x: bad data\nsecond line")))
    with pytest.raises(SystemExit) as exit_info:
        train.main(base)
    assert exit_info.value.code == 2
