#!/usr/bin/env python
"""Import a Hugging Face Llama (a LlamaForCausalLM directory) as a megatron-mile run directory.

  python checkpoint_conversion/convert_from_hf.py hf/Llama-3.2-1B --save runs/llama_1b
  torchrun --nproc-per-node 2 -m megatron_mile.train --load runs/llama_1b --finetune \\
      --tensor-model-parallel-size 2 --tokenizer-model runs/llama_1b/tokenizer ...

The model is built at TP=1 PP=1 in this one process (gloo, world of one, on the CPU), its
parameters are filled tensor by tensor from the safetensors files (one file, or shards
listed in model.safetensors.index.json) and saved with megatron-core dist_checkpointing as
a weights-only checkpoint at iteration 0, which the trainer loads at any TP/PP/VP.

The run's saved arguments carry the architecture from config.json (layers, hidden, heads,
FFN, --group-query-attention/--num-query-groups, --rotary-base, --norm-epsilon, and
max_position_embeddings as --seq-length), so --load needs none of those flags again. The
tokenizer files are copied into SAVE/tokenizer (or --tokenizer-model is recorded instead).
Tied embeddings are imported as an output layer that starts as a copy of the embedding.
Everything is written to SAVE.tmp and renamed when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", module=r"megatron\.core")  # Apex/TE fallbacks are irrelevant here
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint")

log = logging.getLogger("convert_from_hf")

EMBEDDING = "model.embed_tokens.weight"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# HF recomputes these buffers from the config; older exports saved them.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class HFImportError(ValueError):
    """Bad input for the import; the message is one line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="Hugging Face model directory: config.json, safetensors weights, tokenizer")
    p.add_argument("--save", required=True, help="megatron-mile run directory to create (the trainer's --load)")
    p.add_argument("--tokenizer-model",
                   help="record this tokenizer (SentencePiece file or HF directory) instead of copying HF_DIR's")
    p.add_argument("--tokenizer-type", choices=["sentencepiece", "huggingface"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save")
    return p


def read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise HFImportError(f"{hf_dir}: no config.json (not a Hugging Face model directory)") from None
    except json.JSONDecodeError as err:
        raise HFImportError(f"{path}: not valid JSON ({err})") from None


def open_safetensors(file: str, stack: contextlib.ExitStack):
    from safetensors import safe_open

    try:
        return stack.enter_context(safe_open(file, framework="pt"))
    except Exception as err:  # safetensors raises its own error types on damaged files
        raise HFImportError(f"{file}: not a readable safetensors file ({str(err).splitlines()[0]})") from None


def weight_files(hf_dir: str) -> dict[str, str]:
    """HF tensor name → the safetensors file that holds it."""
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFImportError(f"{index}: no weight_map")
        files = {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
        for file in set(files.values()):
            if not os.path.isfile(file):
                raise HFImportError(f"{index}: lists {os.path.basename(file)}, which is missing")
        return files
    single = os.path.join(hf_dir, SINGLE)
    if not os.path.isfile(single):
        raise HFImportError(f"{hf_dir}: no {SINGLE} or {INDEX} (only safetensors weights are read)")
    with contextlib.ExitStack() as stack:
        return dict.fromkeys(open_safetensors(single, stack).keys(), single)


def tensor_reader(files: dict[str, str], tied: bool, stack: contextlib.ExitStack):
    """``read(name)`` over the safetensors files; with tied embeddings lm_head reads the embedding."""
    handles = {file: open_safetensors(file, stack) for file in set(files.values())}

    def read(name: str):
        if tied and name == "lm_head.weight":
            name = EMBEDDING
        return handles[files[name]].get_tensor(name)

    return read


def check_tensor_names(files: dict[str, str], used: set[str], tied: bool, hf_dir: str) -> None:
    """Every tensor the model needs is there, and nothing else is (a weight we would drop).
    A tied checkpoint may or may not store lm_head.weight."""
    missing = sorted(used - set(files) - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise HFImportError(f"{hf_dir}: missing tensor {missing[0]} ({len(missing)} missing)")
    unexpected = sorted(n for n in set(files) - used if not n.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise HFImportError(f"{files[unexpected[0]]}: unexpected tensor {unexpected[0]} "
                            "(not part of a plain Llama)")


def stage_tokenizer(args: argparse.Namespace, staging: str, vocab_size: int) -> tuple[str, str | None]:
    """Copy HF_DIR's tokenizer into the run (or take --tokenizer-model); returns the path and type to record."""
    from checkpoint_conversion.hf_tokenizer import HF_TOKENIZER_FILES
    from megatron_mile.data.tokenizer import build_tokenizer

    if args.tokenizer_model:
        if not os.path.exists(args.tokenizer_model):
            raise HFImportError(f"--tokenizer-model: {args.tokenizer_model} does not exist")
        source, recorded, kind = args.tokenizer_model, os.path.abspath(args.tokenizer_model), args.tokenizer_type
    else:
        if not os.path.isfile(os.path.join(args.hf_dir, "tokenizer.json")):
            raise HFImportError(f"{args.hf_dir}: no tokenizer.json; pass --tokenizer-model")
        os.makedirs(os.path.join(staging, "tokenizer"))
        for name in HF_TOKENIZER_FILES:
            if os.path.isfile(os.path.join(args.hf_dir, name)):
                shutil.copy(os.path.join(args.hf_dir, name), os.path.join(staging, "tokenizer", name))
        source, kind = os.path.join(staging, "tokenizer"), "huggingface"
        recorded = os.path.join(os.path.abspath(args.save), "tokenizer")
    tokens = build_tokenizer(source, kind).vocab_size
    if tokens > vocab_size:
        raise HFImportError(f"the tokenizer {source} has {tokens} tokens, more than config.json's "
                            f"vocab_size {vocab_size}")
    return recorded, kind


def convert(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from checkpoint_conversion.llama_mapping import load_hf_tensors, shape_from_hf_config, tensor_map
    from checkpoint_conversion.staging import staged_directory
    from megatron_mile import checkpointing, runtime
    from megatron_mile.arguments import shape_arguments
    from megatron_mile.model import build_model_chunks, build_transformer_config

    if not os.path.isdir(args.hf_dir):
        raise HFImportError(f"{args.hf_dir} is not a directory")
    if os.path.exists(args.save) and not args.overwrite:
        raise HFImportError(f"--save: {args.save} exists (pass --overwrite to replace it)")
    llama, tied = shape_from_hf_config(read_config(args.hf_dir), os.path.join(args.hf_dir, "config.json"))
    files = weight_files(args.hf_dir)
    pairs = tensor_map(llama)
    check_tensor_names(files, {name for pair in pairs for name in pair.hf}, tied, args.hf_dir)

    with staged_directory(args.save) as staging:
        tokenizer_model, tokenizer_type = stage_tokenizer(args, staging, llama.vocab_size)
        with contextlib.ExitStack() as stack:
            read = tensor_reader(files, tied, stack)
            # bf16 weights stay bf16 (and export back as bf16); anything else is held in fp32.
            bf16 = open_safetensors(files[EMBEDDING], stack).get_slice(EMBEDDING).get_dtype() == "BF16"
            shape = llama.model_shape()
            runtime.initialize_world_of_one()
            config = build_transformer_config(shape, bf16=bf16)
            model = build_model_chunks(config, llama.vocab_size, shape.seq_length, seed=0,
                                       device=torch.device("cpu"), rotary_base=shape.rotary_base)[0]
            if tied:
                log.info("tie_word_embeddings: the output layer starts as a copy of the input embedding "
                         "(megatron-mile trains them untied)")
            load_hf_tensors(read, llama, dict(model.named_parameters()),
                            tqdm(pairs, desc="tensors", unit="tensor", file=sys.stderr))
        run_args = {**shape_arguments(shape), "tokenizer_model": tokenizer_model, "tokenizer_type": tokenizer_type,
                    "bf16": bf16}
        log.info("saving the megatron-mile checkpoint")
        checkpointing.save_model_weights(staging, [model], llama.vocab_size, run_args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A one-process CPU job, even on a GPU node where training may be running.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # config validation notes are not ours to print
        convert(args)
    except ValueError as err:  # HFImportError, UnsupportedLlama, an unreadable tokenizer
        print(f"convert_from_hf: error: {err}", file=sys.stderr)
        return 1
    finally:
        runtime = sys.modules.get("megatron_mile.runtime")
        if runtime is not None:
            runtime.shutdown()
    print(f"imported {args.hf_dir} -> {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
