"""checkpoint_conversion/convert_from_hf.py: a Hugging Face Llama → megatron-mile run → Hugging Face.

The Llama is built here with transformers: grouped-query attention (4 heads, 2 key/value
groups), RoPE base 500000, RMSNorm epsilon 1e-6 and a 1000-token vocabulary, with every
weight redrawn (matrices N(0, 0.1), norm scales in [0.5, 1.5]) so that attention is far from
uniform and a wrong q/k/v, gate/up, norm, RoPE base or epsilon changes the logits visibly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_fixtures import train_hf_tokenizer
from dist_utils import run_ranks
from training_utils import REPO, train, train_env

IMPORTER = os.path.join(REPO, "checkpoint_conversion", "convert_from_hf.py")
EXPORTER = os.path.join(REPO, "checkpoint_conversion", "convert_to_hf.py")
VOCAB = 1000
LLAMA = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB, max_position_embeddings=64, rope_theta=500000.0, rms_norm_eps=1e-6)


def save_llama(directory: str, max_shard_size: str = "5GB", **overrides) -> str:
    """A random LlamaForCausalLM with an HF tokenizer, saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA, "tie_word_embeddings": False, **overrides}))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    train_hf_tokenizer(directory)
    return directory


def run_tool(script: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, env=train_env(),
                          timeout=300)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf_import")
    hf = save_llama(str(root / "hf"))
    run = str(root / "run")
    done = run_tool(IMPORTER, hf, "--save", run)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"hf": hf, "run": run}


def _hf_model(hf_dir: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def test_round_trip_is_bit_identical(imported, tmp_path):
    from safetensors.torch import load_file

    from megatron_mile.arguments import checkpoint_shape
    from megatron_mile.checkpointing import find_checkpoint, holds_weights_only, saved_arguments
    from megatron_mile.metrics import flops_per_token
    from megatron_mile.model import count_parameters

    assert not os.path.exists(imported["run"] + ".tmp")
    assert holds_weights_only(imported["run"])  # so a plain --load, too, starts from the weights alone
    saved = saved_arguments(find_checkpoint(imported["run"]))
    assert saved["tokenizer_model"] == os.path.join(imported["run"], "tokenizer")
    shape = checkpoint_shape(saved)
    assert (shape.query_groups, shape.rotary_base, shape.norm_epsilon, shape.seq_length) == (2, 500000, 1e-6, 64)

    out = str(tmp_path / "hf")
    done = run_tool(EXPORTER, "--load", imported["run"], "--output", out)
    assert done.returncode == 0, done.stderr[-3000:]
    original = load_file(os.path.join(imported["hf"], "model.safetensors"))
    exported = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert {k: config[k] for k in ("num_key_value_heads", "rope_theta", "rms_norm_eps", "vocab_size",
                                   "max_position_embeddings", "tie_word_embeddings")} == \
        {"num_key_value_heads": 2, "rope_theta": 500000.0, "rms_norm_eps": 1e-6, "vocab_size": VOCAB,
         "max_position_embeddings": 64, "tie_word_embeddings": False}

    # Parameter count and model FLOPs against HF's own count (untied, so every tensor is distinct).
    hf_params = sum(t.numel() for t in original.values())
    assert count_parameters(shape, VOCAB) == hf_params
    h, layers = shape.hidden_size, shape.num_layers
    matmul_params = hf_params - VOCAB * h - (2 * layers + 1) * h  # less the embedding gather and the norms
    assert flops_per_token(shape, VOCAB) == 6 * matmul_params + 12 * layers * shape.seq_length * h


def _megatron_logits(rank: int, world_size: int, run: str, sequences: list[list[int]]) -> dict[str, list]:
    """The imported checkpoint loaded the trainer's way at TP=2, then at PP=2; full logits on the last rank."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

    from megatron_mile import checkpointing, runtime
    from megatron_mile.arguments import checkpoint_shape
    from megatron_mile.model import build_model_chunks, build_transformer_config

    path = checkpointing.find_checkpoint(run)
    shape = checkpoint_shape(checkpointing.saved_arguments(path))
    vocab = dist_checkpointing.load_common_state_dict(path)["vocab_size"]
    out: dict[str, list] = {}
    for layout, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2)}.items():
        runtime.initialize(tp, pp)
        model = build_model_chunks(build_transformer_config(shape, tp=tp, pp=pp), vocab, shape.seq_length, 0,
                                   torch.device("cpu"), rotary_base=shape.rotary_base)[0]
        checkpointing.load_model_weights(path, [model], vocab)
        model.eval()
        out[layout] = []
        with torch.no_grad():
            for seq in sequences:
                tokens, positions = torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0)
                if pp == 2 and rank == 0:
                    dist.send(model(tokens, positions, None).contiguous(), dst=1)
                    continue
                if pp == 2:
                    hidden = torch.empty(len(seq), 1, shape.hidden_size)
                    dist.recv(hidden, src=0)
                    model.set_input_tensor(hidden)
                logits = tensor_parallel.gather_from_tensor_model_parallel_region(model(tokens, positions, None))
                out[layout].append(logits[0, :, :vocab].numpy())
        parallel_state.destroy_model_parallel()
    runtime.shutdown()
    return out


def test_imported_model_gives_hf_logits_at_tp2_and_pp2(imported):
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, VOCAB, size=n).tolist() for n in (64, 9)]
    got = run_ranks(_megatron_logits, 2, imported["run"], sequences)[-1]
    model = _hf_model(imported["hf"])
    with torch.no_grad():
        for index, seq in enumerate(sequences):
            want = model(torch.tensor([seq])).logits[0].numpy()
            assert want.std(axis=0).mean() > 0.1  # attention and positions matter
            for layout, logits in got.items():
                np.testing.assert_allclose(logits[index], want, atol=1e-4, rtol=1e-4, err_msg=layout)


def test_finetune_starts_from_the_imported_weights_at_tp2(demo, imported, tmp_path):
    """Three --finetune steps at TP=2 on other data, with no architecture flag repeated: the
    first step's CE is HF's on the same batch (the trainer's 300-token tokenizer limits the
    softmax to those columns)."""
    from megatron_mile.data import build_pretraining_datasets, build_tokenizer, load_blend

    save = str(tmp_path / "ft")
    records = train(demo, tmp_path, "ft", 2, "--load", imported["run"], "--finetune",
                    "--tensor-model-parallel-size", "2", iters=3, save=save)
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert records[0]["consumed_tokens"] == 4 * 32  # the data position starts at 0

    tokenizer = build_tokenizer(demo["tokenizer"])
    data = build_pretraining_datasets(load_blend([demo["blend"]]), tokenizer, 32, 11, train_samples=12,
                                      valid_samples=4, test_samples=0).train
    batch = {key: torch.tensor(np.stack([data[i][key] for i in range(4)])) for key in ("tokens", "labels", "loss_mask")}
    with torch.no_grad():
        logits = _hf_model(imported["hf"])(batch["tokens"]).logits[..., : tokenizer.vocab_size]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
    # The trainer logs the mean over its two micro-batches (2 samples each) of their masked means.
    mask = batch["loss_mask"].float()
    per_micro_batch = [(ce[i:i + 2] * mask[i:i + 2]).sum() / mask[i:i + 2].sum() for i in (0, 2)]
    assert records[0]["ce"] == pytest.approx(float(sum(per_micro_batch) / 2), rel=1e-5)


def test_tied_embeddings_import_as_a_copy(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    hf = save_llama(str(tmp_path / "hf"), num_hidden_layers=1, tie_word_embeddings=True)
    run = str(tmp_path / "run")
    done = run_tool(IMPORTER, hf, "--save", run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("tie_word_embeddings") == 1
    flat = str(tmp_path / "flat.pt")
    dcp_to_torch_save(os.path.join(run, "iter_0000000"), flat)
    state = torch.load(flat, weights_only=False)
    embedding, output = state["embedding.word_embeddings.weight"], state["output_layer.weight"]
    assert torch.equal(output, embedding) and embedding[:VOCAB].abs().sum() > 0


def _config(**changes) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(**LLAMA).to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    return {**config, **changes}


@pytest.mark.parametrize("changes,field", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}, "rope_type"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": None}, "rope_type"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.5}}, "rope_theta"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"model_type": "mistral"}, "model_type"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"head_dim": 32}, "head_dim"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_unsupported_llama_is_refused_naming_the_field(changes, field):
    sys.path.insert(0, REPO)
    from checkpoint_conversion.llama_mapping import UnsupportedLlama, shape_from_hf_config

    shape, tied = shape_from_hf_config(_config(), "config.json")
    assert (shape.num_query_groups, shape.rotary_base, tied) == (2, 500000, False)
    with pytest.raises(UnsupportedLlama, match=field):
        shape_from_hf_config(_config(**changes), "config.json")


def test_weight_shapes_that_contradict_the_config_are_refused(imported):
    sys.path.insert(0, REPO)
    from safetensors.torch import load_file

    from checkpoint_conversion.llama_mapping import UnsupportedLlama, load_hf_tensors, shape_from_hf_config, tensor_map

    with open(os.path.join(imported["hf"], "config.json")) as f:
        shape, _ = shape_from_hf_config(json.load(f), "config.json")
    tensors = load_file(os.path.join(imported["hf"], "model.safetensors"))
    params = {pair.megatron[0]: torch.zeros_like(pair.fuse([tensors[name] for name in pair.hf]))
              for pair in tensor_map(shape)}
    wrong = {**tensors, "model.layers.1.self_attn.k_proj.weight": torch.zeros(64, 64)}  # as if 4 key/value heads
    with pytest.raises(UnsupportedLlama, match=r"model.layers.1.self_attn.k_proj.weight: shape \(64, 64\), "
                                               r"but config.json implies \(32, 64\)"):
        load_hf_tensors(wrong.__getitem__, shape, params)


def test_sharded_safetensors_are_read(tmp_path):
    """A model.safetensors.index.json with several shards gives the same tensors as one file."""
    import contextlib

    sys.path.insert(0, REPO)
    from safetensors.torch import load_file

    from checkpoint_conversion.convert_from_hf import tensor_reader, weight_files
    from checkpoint_conversion.llama_mapping import load_hf_tensors, shape_from_hf_config, tensor_map, to_hf_state_dict

    hf = save_llama(str(tmp_path / "hf"), max_shard_size="100KB")
    files = weight_files(hf)
    assert len(set(files.values())) > 1 and os.path.isfile(os.path.join(hf, "model.safetensors.index.json"))
    with open(os.path.join(hf, "config.json")) as f:
        shape, _ = shape_from_hf_config(json.load(f), "config.json")
    tensors = {}
    for file in set(files.values()):
        tensors.update(load_file(file))
    params = {pair.megatron[0]: torch.zeros_like(pair.fuse([tensors[name] for name in pair.hf]))
              for pair in tensor_map(shape)}
    with contextlib.ExitStack() as stack:
        load_hf_tensors(tensor_reader(files, False, stack), shape, params)
    back = to_hf_state_dict(params, shape)
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_bad_input_is_refused_in_one_line(imported, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, REPO)
    from safetensors.torch import load_file, save_file

    from checkpoint_conversion import convert_from_hf

    biased = tmp_path / "biased"
    biased.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (biased / name).write_bytes(open(os.path.join(imported["hf"], name), "rb").read())
    tensors = load_file(os.path.join(imported["hf"], "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(biased / "model.safetensors"))
    out = str(tmp_path / "out")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # main() hides GPUs; restored after the test
    for argv, message in [([str(tmp_path / "missing"), "--save", out], "is not a directory"),
                          ([imported["hf"], "--save", imported["run"]], "exists (pass --overwrite"),
                          ([str(tmp_path), "--save", out], "no config.json"),
                          ([str(biased), "--save", out], "unexpected tensor model.layers.0.self_attn.q_proj.bias")]:
        assert convert_from_hf.main(argv) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp")


def test_trainer_refuses_flags_that_contradict_the_checkpoint(imported, monkeypatch, capsys):
    from megatron_mile import train

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    argv = ["--train-iters", "10", "--lr-warmup-iters", "1", "--data-path", "x", "--tokenizer-model", __file__,
            "--load", imported["run"]]
    for flags, message in [(["--rotary-base", "10000"], "--rotary-base 10000 contradicts the checkpoint"),
                           (["--model-preset", "468M"], "--model-preset 468M (num-layers 24) contradicts")]:
        with pytest.raises(SystemExit) as exit_info:
            train.main(argv + flags)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
