"""Every fenced code block of README.md runs, so the README cannot drift from the code.

Blocks run in the README's order, in one scratch directory that looks like a checkout (the
repository's files linked in) with ``data/demo`` holding the tests' small corpus, tokenizer
and blend, so a later block can use what an earlier one made (a trained run, a converted
model). ``bash`` blocks run under ``bash -euo pipefail`` with ``python`` and ``torchrun``
meaning this interpreter and its environment's console scripts on ``PATH``; ``python`` blocks run as scripts; ``json`` blocks must parse. A
block fails the test when it exits non-zero or prints a Python warning.

What cannot run here as written (a GPU, a cluster, a 468M model, the network) is changed
explicitly, by HTML comments right above the block, one directive each:

    <!-- readme-test: sub "OLD" "NEW" -->   replace text in the block (each OLD must occur)
    <!-- readme-test: env NAME=VALUE ... --> set environment variables (e.g. DRY_RUN=1)
    <!-- readme-test: stub COMMAND -->      a stand-in COMMAND on PATH that records its arguments
                                            and succeeds; the block must call it
    <!-- readme-test: setup "CODE" -->      python run before the block (its inputs)
    <!-- readme-test: text "WHY" -->        a block that is not a command (an output, a format);
                                            any language other than bash, python and json needs it

An unknown directive, a language without a way to run it, or a substitution that no longer
matches fails ``test_every_block_has_a_way_to_run``, without running anything.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from training_utils import demo_data_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
RUNNABLE = ("bash", "python", "json")
DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(\w[\w-]*)\s*(.*?)\s*-->")
WARNING = re.compile(r"\b\w*Warning: ")
# Not linked into the scratch checkout: outputs the blocks make themselves.
OUTPUTS = {".git", "data", "runs", "hf", "results", ".venv", ".pytest_cache", "__pycache__"}


@dataclass
class Block:
    line: int  # of the opening fence
    language: str
    code: str
    subs: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    stubs: list[str] = field(default_factory=list)
    setup: str = ""
    text: str | None = None

    @property
    def id(self) -> str:
        return f"README.md:{self.line}-{self.language}"

    def source(self) -> str:
        code = self.code
        for old, new in self.subs:
            code = code.replace(old, new)
        return code


def _apply(block: Block, name: str, argument: str) -> None:
    words = shlex.split(argument)
    if name == "sub" and len(words) == 2:
        block.subs.append((words[0], words[1]))
    elif name == "env" and words and all("=" in w for w in words):
        block.env.update(w.split("=", 1) for w in words)
    elif name == "stub" and words:
        block.stubs += words
    elif name == "setup" and len(words) == 1:
        block.setup += words[0] + "\n"
    elif name == "text" and len(words) == 1:
        block.text = words[0]
    else:
        raise ValueError(f"unknown readme-test directive: {name} {argument}")


def parse_readme(path: str = README) -> list[Block]:
    lines = open(path, encoding="utf-8").read().splitlines()
    blocks, pending, index = [], [], 0
    while index < len(lines):
        line = lines[index]
        if match := DIRECTIVE.fullmatch(line.strip()):
            pending.append((index + 1, match.group(1), match.group(2)))
        elif line.startswith("```"):
            start, language = index, line[3:].strip()
            index += 1
            while index < len(lines) and not lines[index].startswith("```"):
                index += 1
            block = Block(start + 1, language, "\n".join(lines[start + 1:index]) + "\n")
            for where, name, argument in pending:
                try:
                    _apply(block, name, argument)
                except ValueError as err:
                    raise ValueError(f"README.md:{where}: {err}") from None
            blocks.append(block)
            pending = []
        elif line.strip() and pending:
            raise ValueError(f"README.md:{pending[0][0]}: a readme-test directive must be right above a code block")
        index += 1
    return blocks


BLOCKS = parse_readme()


def test_every_block_has_a_way_to_run():
    problems = []
    for block in parse_readme():
        if block.language not in RUNNABLE and block.text is None:
            problems.append(f"{block.id}: no way to run a '{block.language}' block; mark it "
                            "<!-- readme-test: text \"why\" --> if it is not a command")
        problems += [f"{block.id}: sub {old!r} does not occur in the block" for old, _ in block.subs
                     if old not in block.code]
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def scratch(demo, tmp_path_factory) -> str:
    """A checkout-like directory: the repository's files linked in, the test data as data/demo."""
    root = tmp_path_factory.mktemp("readme")
    for name in os.listdir(REPO):
        if name not in OUTPUTS:
            os.symlink(os.path.join(REPO, name), root / name)
    demo_data_dir(demo, root / "data" / "demo")
    # `python` and `torchrun` are this interpreter (a link would lose its virtual environment).
    bin_dir = root / ".readme-bin"
    bin_dir.mkdir()
    for name, run in (("python", ""), ("torchrun", " -m torch.distributed.run")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}"{run} "$@"\n')
        (bin_dir / name).chmod(0o755)
    return str(root)


def _stub(directory: str, name: str, calls: str) -> None:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\n')
    os.chmod(path, 0o755)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.text is None], ids=lambda b: b.id)
def test_readme_block_runs(block: Block, scratch: str, tmp_path):
    if block.language == "json":
        json.loads(block.source())
        return
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    calls = str(tmp_path / "calls")
    for name in block.stubs:
        _stub(str(stubs), name, calls)
    # The console scripts (megatron-mile-*) sit beside the interpreter, as in an activated environment.
    path = [str(stubs), os.path.join(scratch, ".readme-bin"), os.path.dirname(sys.executable), os.environ["PATH"]]
    env = {**os.environ, "PATH": os.pathsep.join(path),
           "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           **block.env}
    env.pop("PYTHONWARNINGS", None)
    if block.language == "bash":
        command = ["bash", "-euo", "pipefail", "-c", block.source()]
    else:
        script = tmp_path / "block.py"
        script.write_text(block.setup + block.source())
        command = [sys.executable, str(script)]
    proc = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=900)
    report = f"{block.id} exited {proc.returncode}:\n{block.source()}\n--- stdout\n{proc.stdout[-3000:]}\n" \
             f"--- stderr\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0, report
    assert not [line for line in proc.stderr.splitlines() if WARNING.search(line)], report
    called = {line.split()[0] for line in open(calls)} if os.path.exists(calls) else set()
    assert set(block.stubs) <= called, f"{block.id}: stubbed but never called: {set(block.stubs) - called}"
