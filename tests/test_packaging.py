"""A non-editable install runs the demo's steps from another directory, without the checkout.

The package is installed with pip (no dependencies, no network) into a fresh target
directory that is the only thing on PYTHONPATH; every step runs as ``python -m`` from an
empty working directory, exactly as the README tells users of an installed package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_installed_package_runs_the_demo_steps_from_any_directory(tmp_path):
    # pip builds in the source tree (build/, *.egg-info): give it a copy of the checkout's sources.
    source = tmp_path / "source"
    local = {".git", ".venv", "data", "runs", "hf", "build", ".pytest_cache", ".whl"}

    def ignore(directory: str, names: list[str]) -> set[str]:
        top = local if os.path.samefile(directory, REPO) else set()
        return {n for n in names if n in top or n == "__pycache__" or n.endswith(".egg-info")}

    shutil.copytree(REPO, source, ignore=ignore)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(source)], check=True, capture_output=True, text=True)
    shutil.rmtree(source)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def run(*argv: str) -> str:
        done = subprocess.run([sys.executable, *argv], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{argv}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    imported = run("-c", "import megatron_mile.data.tokenizer as m, megatron_mile.tools as t; print(m.__file__, "
                         "t.__file__)").split()
    assert all(path.startswith(str(site)) for path in imported), imported
    run("-m", "megatron_mile.tools.make_demo_corpus", "--output", "d/corpus.jsonl.zst", "--max-domain-mb", "0.2")
    run("-m", "megatron_mile.tools.train_tokenizer", "--input", "d/corpus.jsonl.zst", "--model-prefix", "d/tok",
        "--vocab-size", "400", "--threads", "1")
    run("-m", "megatron_mile.tools.preprocess_data", "--input", "d/corpus.jsonl.zst", "--output-prefix", "d/demo",
        "--tokenizer-model", "d/tok.model", "--split-by-domain", "meta.pile_set_name", "--append-eod", "--quiet")
    # The demo's sampling weights ship with the package, by name.
    run("-m", "megatron_mile.tools.make_blend", "--manifest", "d/demo_text_manifest.json", "--weights", "demo",
        "--output", "d/blend.json")
    run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "megatron_mile.train",
        "--train-iters", "2", "--lr-warmup-iters", "1", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--eval-interval", "2", "--eval-iters", "1", "--split", "80,20,0",
        "--data-path", "d/blend.json", "--tokenizer-model", "d/tok.model", "--save", "runs/demo")
    assert run("-m", "megatron_mile.tools.plot_logs", "runs/demo").strip() == str(work / "runs" / "demo" /
                                                                                    "curves.png")
    assert os.path.getsize(work / "runs" / "demo" / "curves.png") > 0
