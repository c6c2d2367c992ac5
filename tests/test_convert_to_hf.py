"""checkpoint_conversion/convert_to_hf.py: a TP=2 checkpoint → HF Llama with megatron's logits.

The checkpoint comes from the real trainer (torchrun, 2 ranks, TP=2) on a corpus and a
SentencePiece model built here. A few steps at a large constant lr move every weight well
away from its N(0, 0.01) init, so attention is far from uniform and a wrong q/k/v, gate/up
or RoPE mapping would change the logits visibly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_fixtures import documents, jsonl_bytes, train_hf_tokenizer, train_sentencepiece, write
from dist_utils import run_ranks
from megatron_mile.data.preprocess import PreprocessConfig, preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERTER = os.path.join(REPO, "checkpoint_conversion", "convert_to_hf.py")
VOCAB = 300  # padded to 512 at TP=2 (384 with --make-vocab-size-divisible-by 64): the converter must use
             # the saved padding


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def converted(request, tmp_path_factory) -> dict[str, str]:
    """A TP=2 run (fp32, or --bf16 with sequence parallelism) converted with --dtype auto."""
    root = tmp_path_factory.mktemp("convert")
    tokenizer = train_sentencepiece(str(root / "sp.model"), vocab_size=VOCAB)
    corpus = write(str(root / "corpus.jsonl"), jsonl_bytes(documents(400)))
    preprocess(PreprocessConfig(inputs=[corpus], output_prefix=str(root / "data"), tokenizer_model=tokenizer,
                                append_eod=True, quiet=True))
    save = str(root / "run")
    train = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29731",
             "-m", "megatron_mile.train", "--model-preset", "tiny", "--tensor-model-parallel-size", "2",
             "--data-path", str(root / "data_text_document"), "--tokenizer-model", tokenizer,
             "--train-iters", "4", "--lr", "0.02", "--min-lr", "0.02", "--lr-warmup-iters", "1",
             "--lr-decay-style", "constant", "--micro-batch-size", "2", "--global-batch-size", "4",
             "--eval-interval", "100", "--log-interval", "4", "--save", save]
    if request.param == "bfloat16":
        train += ["--bf16", "--sequence-parallel", "--make-vocab-size-divisible-by", "64"]
    done = subprocess.run(train, capture_output=True, text=True, env=_env(), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    out = str(root / "hf")
    done = subprocess.run([sys.executable, CONVERTER, "--load", save, "--output", out],
                          capture_output=True, text=True, env=_env(), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"save": save, "hf": out, "tokenizer": tokenizer, "dtype": request.param}


def _megatron_logits(rank: int, world_size: int, save: str, dtype: str, sequences: list[list[int]],
                     ) -> list[np.ndarray]:
    """Reference: the same checkpoint loaded into a megatron-core model at TP=1, on one rank."""
    from megatron.core import dist_checkpointing

    from megatron_mile import runtime
    from megatron_mile.checkpointing import checkpoint_dir, latest_iteration
    from megatron_mile.model import PRESETS, build_model_chunks, build_transformer_config

    runtime.initialize(1, 1)
    path = checkpoint_dir(save, latest_iteration(save))
    common = dist_checkpointing.load_common_state_dict(path)
    shape = PRESETS["tiny"]
    # 300 padded to a multiple of 128 × TP=2, or of 64 × TP=2 in the bf16 run.
    rows = {"float32": 512, "bfloat16": 384}[dtype]
    assert dist_checkpointing.load_tensors_metadata(path)["embedding.word_embeddings.weight"].global_shape[0] == rows
    model = build_model_chunks(build_transformer_config(shape), rows, shape.seq_length, 0, torch.device("cpu"),
                               vocab_divisible_by=1)[0]
    model.load_state_dict(dist_checkpointing.load({"model0": model.sharded_state_dict()}, path)["model0"])
    model.eval()
    out = []
    with torch.no_grad():
        for seq in sequences:
            tokens = torch.tensor([seq])
            positions = torch.arange(len(seq)).unsqueeze(0)
            logits = model(tokens, positions, None)
            out.append(logits[0, :, : common["vocab_size"]].float().numpy())
    runtime.shutdown()
    return out


def test_hf_logits_match_megatron(converted):
    from transformers import AutoTokenizer, LlamaForCausalLM

    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, VOCAB, size=n).tolist() for n in (128, 37, 5)]
    reference = run_ranks(_megatron_logits, 1, converted["save"], converted["dtype"], sequences)[0]

    # Loaded in float32 either way: a bf16 export holds the checkpoint's bf16 values exactly,
    # and the megatron reference computes in float32 from those same values.
    model = LlamaForCausalLM.from_pretrained(converted["hf"], dtype=torch.float32).eval()
    assert model.config.vocab_size == VOCAB and not model.config.tie_word_embeddings
    with open(os.path.join(converted["hf"], "config.json")) as f:
        assert json.load(f)["torch_dtype"] == converted["dtype"]
    with torch.no_grad():
        for seq, want in zip(sequences, reference):
            got = model(torch.tensor([seq])).logits[0].numpy()
            assert got.shape == want.shape
            # Trained away from init: logits vary across positions, so attention matters.
            assert want.std(axis=0).mean() > 0.05
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=converted["tokenizer"])
    tokenizer = AutoTokenizer.from_pretrained(converted["hf"])
    for text in ("Document 7: alpha beta", "  indented line é\n"):
        assert tokenizer(text)["input_ids"] == sp.encode(text)  # no BOS: training never adds one


def test_bad_input_is_one_line(tmp_path, converted):
    cases = [
        (["--load", str(tmp_path / "missing"), "--output", str(tmp_path / "o")], "is not a directory"),
        (["--load", str(tmp_path), "--output", str(tmp_path / "o")], "no latest_checkpointed_iteration.txt"),
        (["--load", converted["save"], "--output", converted["hf"]], "exists"),
        (["--load", converted["save"], "--iteration", "3", "--output", str(tmp_path / "o")],
         "no complete checkpoint"),
    ]
    for argv, message in cases:
        done = subprocess.run([sys.executable, CONVERTER, *argv], capture_output=True, text=True, env=_env())
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], done.stderr
    assert not os.path.exists(tmp_path / "o")


def test_tokenizer_export_hf_directory(tmp_path):
    """An HF tokenizer directory is copied with a loadable config and gives the training ids."""
    sys.path.insert(0, REPO)
    from checkpoint_conversion import hf_tokenizer
    from transformers import AutoTokenizer

    source = train_hf_tokenizer(str(tmp_path / "src"))  # its config spells eos as {"content": ...}
    out = tmp_path / "out"
    out.mkdir()
    assert hf_tokenizer.export_tokenizer(source, None, str(out), 128) == (0, 1)
    hf_tokenizer.verify(source, None, str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.eos_token == "</s>" and tokenizer.model_max_length == 128


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 8], ids=["one_file", "sharded"])
def test_weights_get_the_modes_of_the_umask(tmp_path, max_shard_bytes):
    """Readable by the group on a shared filesystem when the umask says so (safetensors alone gives 0600)."""
    sys.path.insert(0, REPO)
    from checkpoint_conversion.convert_to_hf import write_safetensors

    previous = os.umask(0o027)
    try:
        write_safetensors({"a": torch.zeros(4), "b": torch.ones(4)}, str(tmp_path), max_shard_bytes)
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert len(modes) == (1 if max_shard_bytes > 8 else 3) and set(modes.values()) == {0o640}, modes
