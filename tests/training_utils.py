"""Running the real trainer (torchrun, gloo, the tiny preset) from tests, and reading its metrics.

The ``demo`` fixture (conftest.py) builds the data once per test run; every test that trains
goes through ``train_command``, so all of them share the same small, fast configuration.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np

import data_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS = 5


def build_demo_data(root) -> dict[str, str]:
    """A two-domain Pile-style corpus, a 300-piece tokenizer (padded differently at TP=1 and 2),
    per-domain datasets and a blend with the domains' sampling weights."""
    corpus = data_fixtures.write(str(root / "corpus.jsonl.zst"), data_fixtures.jsonl_bytes(data_fixtures.documents(1500)))
    tokenizer = data_fixtures.train_sentencepiece(str(root / "tok.model"), vocab_size=300)
    prefix = str(root / "pile")
    subprocess.run([sys.executable, f"{REPO}/tools/preprocess_data.py", "--input", corpus, "--output-prefix", prefix,
                    "--tokenizer-model", tokenizer, "--split-by-domain", "meta.pile_set_name", "--append-eod",
                    "--quiet"], check=True)
    weights = root / "weights.json"
    weights.write_text(json.dumps({"train_domain_weights": {d: 1.0 for d in data_fixtures.DOMAINS},
                                   "eval_domain_weights": {d: 1.0 for d in data_fixtures.DOMAINS}}))
    blend = str(root / "blend.json")
    subprocess.run([sys.executable, f"{REPO}/tools/make_blend.py", "--manifest", f"{prefix}_text_manifest.json",
                    "--weights", str(weights), "--output", blend], check=True)
    return {"blend": blend, "tokenizer": tokenizer, "prefix": prefix}


def demo_data_dir(demo: dict[str, str], directory) -> str:
    """A copy of the test data under the names examples/prepare_demo_data.sh gives its outputs,
    so that the script finds every step done and the demo scripts run on it quickly."""
    shutil.copytree(os.path.dirname(demo["blend"]), directory)
    shutil.copy(demo["tokenizer"], os.path.join(directory, "tokenizer.model"))
    shutil.copy(demo["prefix"] + "_text_manifest.json", os.path.join(directory, "demo_text_manifest.json"))
    return str(directory)


def train_command(demo: dict[str, str], nproc: int, save: str, *extra: str, iters: int = ITERS,
                  launcher: str = "torch.distributed.run") -> list[str]:
    """torchrun (or ``launcher="megatron_mile.launch"``, which takes torchrun's arguments) with the trainer."""
    return [sys.executable, "-m", launcher, "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megatron_mile.train",
            "--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", str(iters), "--lr", "1e-3", "--lr-warmup-iters", "1", "--log-interval", "1",
            "--eval-interval", "1000", "--eval-iters", "1", "--seed", "11",
            "--data-path", demo["blend"], "--tokenizer-model", demo["tokenizer"], "--save", save, *extra]


def train_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def train(demo, tmp_path, name: str, nproc: int, *extra: str, iters: int = ITERS, save: str | None = None,
          ) -> list[dict]:
    """Train to completion (the run must succeed) and return its ``train`` metrics records."""
    save = save or str(tmp_path / name)
    proc = subprocess.run(train_command(demo, nproc, save, *extra, iters=iters), capture_output=True, text=True,
                          env=train_env(), timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return read_records(save, "train")


def read_records(save: str, kind: str) -> list[dict]:
    with open(os.path.join(save, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def losses(records: list[dict], key: str = "loss") -> np.ndarray:
    return np.array([r[key] for r in records])


def optim_settings(*flags: str, dp: int = 1):
    """The trainer's optimizer settings for these flags at this DP size (no checkpoint loaded),
    every other flag at its default."""
    from megatron_mile import optim
    from megatron_mile.arguments import parse_args

    args = parse_args(["--train-iters", "1", "--data-path", "unused", "--tokenizer-model", "unused", *flags])
    distributed, _ = optim.choose_distributed_optimizer(args.use_distributed_optimizer, dp, None)
    return optim.OptimSettings.from_args(args, use_distributed_optimizer=distributed)
