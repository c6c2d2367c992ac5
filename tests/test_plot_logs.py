"""tools/plot_logs.py: several runs into one PNG, resumed-run duplicates, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = [sys.executable, os.path.join(REPO, "tools", "plot_logs.py")]


def _write_run(directory, shift: float) -> None:
    os.makedirs(directory)
    lines = []
    for it in (10, 20, 10, 20, 30):  # a resume from iteration 10 re-logs 20
        lines.append({"type": "train", "iteration": it, "consumed_tokens": it * 1024, "loss": 5 - it / 10 + shift,
                      "ce": 5 - it / 10, "entropy": 4.0, "alpha": 1.0, "lr": 1e-4, "grad_norm": 1.0,
                      "tokens_per_sec": 1e3})
        if it % 20 == 0:
            domains = {"ArXiv": 4.0 - it / 100 + shift, "Github": 3.0 - it / 100}
            lines.append({"type": "eval", "iteration": it, "eval_loss": 3.5, "domains": domains,
                          "domain_avg": 3.5, "domain_worst": 4.0})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_compare_runs(tmp_path):
    _write_run(tmp_path / "ce", 0.0)
    _write_run(tmp_path / "mile", 0.3)
    out = tmp_path / "cmp.png"
    done = subprocess.run(TOOL + [str(tmp_path / "ce"), str(tmp_path / "mile" / "metrics.jsonl"), "-o", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left

    sys.path.insert(0, os.path.join(REPO, "tools"))
    from plot_logs import default_label, read_run

    run = read_run(str(tmp_path / "ce"), default_label(str(tmp_path / "ce")))
    assert run.label == "ce" and [r["iteration"] for r in run.train] == [10, 20, 30]


def test_bad_input_one_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"type": "train", "iteration": 1, "loss": 1}\n{"type": "tr\n')
    (tmp_path / "noiter.jsonl").write_text('{"type": "eval", "eval_loss": 1}\n')
    cases = [(str(tmp_path / "missing"), "missing: no such file"),
             (str(tmp_path / "empty.jsonl"), "empty.jsonl: empty"),
             (str(tmp_path / "broken.jsonl"), "broken.jsonl:2: not JSON"),
             (str(tmp_path / "noiter.jsonl"), "noiter.jsonl:1: eval record without an integer 'iteration'")]
    for path, message in cases:
        done = subprocess.run(TOOL + [path], capture_output=True, text=True)
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], done.stderr
