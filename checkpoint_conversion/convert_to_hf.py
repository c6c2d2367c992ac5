#!/usr/bin/env python
"""Convert a megatron-mile checkpoint (any TP/PP/VP layout) into a Hugging Face Llama directory.

  python checkpoint_conversion/convert_to_hf.py --load runs/468M_mile --output hf/468M_mile
  lm_eval --model hf --model_args pretrained=hf/468M_mile --tasks hellaswag --batch_size 16

--load is a --save directory (its latest complete checkpoint, or --iteration N) or one
iter_NNNNNNN directory. The model is rebuilt at TP=1 PP=1 in this one process (gloo,
world of 1, on the CPU) and megatron-core dist_checkpointing reshards the saved tensors
into it; the optimizer state is not read. Output: config.json, safetensors weights (true
vocabulary rows only) and the run's tokenizer, written to OUTPUT.tmp and renamed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", module=r"megatron\.core")  # Apex/TE fallbacks are irrelevant here
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint")

DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConversionError(ValueError):
    """Bad input for the conversion; the message is one line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="the run's --save directory, or one iter_NNNNNNN directory")
    p.add_argument("--iteration", type=int, help="default: latest_checkpointed_iteration.txt")
    p.add_argument("--output", required=True, help="Hugging Face model directory to create")
    p.add_argument("--tokenizer-model", help="default: the run's --tokenizer-model (SentencePiece file or HF dir)")
    p.add_argument("--tokenizer-type", choices=["sentencepiece", "huggingface"])
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 for --bf16 runs, else float32")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0, help="safetensors shard size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def resolve_checkpoint(load: str, iteration: int | None) -> str:
    from megatron_mile.checkpointing import POINTER, CheckpointError, checkpoint_dir, latest_iteration

    if not os.path.isdir(load):
        raise ConversionError(f"--load: {load} is not a directory")
    if os.path.isfile(os.path.join(load, "metadata.json")):  # already an iter_NNNNNNN directory
        if iteration is not None:
            raise ConversionError("--iteration needs --load to be the run's --save directory")
        return load
    try:
        iteration = latest_iteration(load) if iteration is None else iteration
    except CheckpointError as err:
        raise ConversionError(str(err)) from None
    if iteration is None:
        raise ConversionError(f"--load: {load} has no {POINTER} and no checkpoint metadata")
    path = checkpoint_dir(load, iteration)
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise ConversionError(f"--load: no complete checkpoint at {path}")
    return path


def load_full_state(path: str):
    """Rebuild the run's model at TP=1 PP=1 and load the checkpoint into it.

    Returns the model state dict, the run's args dict, the true vocab size and the model shape.
    """
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_mile import runtime
    from megatron_mile.arguments import checkpoint_shape
    from megatron_mile.model import build_model_chunks, build_transformer_config, padded_vocab_size

    runtime.initialize_world_of_one()
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as err:  # torch.load / pickle raise many types on a damaged file
        raise ConversionError(f"{path}: unreadable checkpoint ({str(err).splitlines()[0]})") from None
    if not all(k in common for k in ("args", "vocab_size", "layout")):
        raise ConversionError(f"{path}: not a megatron-mile checkpoint (no args/vocab_size/layout)")
    run_args, vocab_size = common["args"], common["vocab_size"]
    shape = checkpoint_shape(run_args)
    # The saved embedding holds the vocab padded for the saved TP; rebuild with that row count.
    saved_rows = padded_vocab_size(vocab_size, common["layout"]["tp"])
    config = build_transformer_config(shape)
    model = build_model_chunks(config, saved_rows, shape.seq_length, seed=0, device=torch.device("cpu"),
                               rotary_base=shape.rotary_base)[0]
    try:
        loaded = dist_checkpointing.load({"model0": model.sharded_state_dict()}, path,
                                         strict=StrictHandling.RAISE_UNEXPECTED)
    except Exception as err:  # dist_checkpointing raises CheckpointingException, KeyError, RuntimeError…
        raise ConversionError(f"{path}: cannot load the model ({str(err).splitlines()[0]})") from None
    model.load_state_dict(loaded["model0"])
    state = {k: v.detach() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return state, run_args, vocab_size, shape


def write_safetensors(tensors: dict, out_dir: str, max_shard_bytes: int) -> None:
    """One file when it fits, else HF's sharded layout with model.safetensors.index.json."""
    from safetensors.torch import save_file

    shards: list[dict] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, filename), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def convert(args: argparse.Namespace) -> str:
    import torch

    from checkpoint_conversion import hf_tokenizer
    from checkpoint_conversion.llama_mapping import LlamaShape, hf_config, to_hf_state_dict
    from checkpoint_conversion.staging import staged_directory

    path = resolve_checkpoint(args.load, args.iteration)
    if os.path.exists(args.output) and not args.overwrite:
        raise ConversionError(f"--output: {args.output} exists (pass --overwrite to replace it)")
    state, run_args, vocab_size, shape = load_full_state(path)
    llama = LlamaShape.of(shape, vocab_size)
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if run_args.get("bf16") else "float32")
    dtype = getattr(torch, dtype_name)
    tensors = {k: v.to(dtype) for k, v in to_hf_state_dict(state, llama).items()}
    tokenizer_path = args.tokenizer_model or run_args["tokenizer_model"]
    tokenizer_type = args.tokenizer_type or (None if args.tokenizer_model else run_args.get("tokenizer_type"))

    with staged_directory(args.output) as staging:
        bos, eos = hf_tokenizer.export_tokenizer(tokenizer_path, tokenizer_type, staging, shape.seq_length)
        hf_tokenizer.verify(tokenizer_path, tokenizer_type, staging)
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(hf_config(llama, dtype, bos, eos), f, indent=2)
        write_safetensors(tensors, staging, int(args.max_shard_size_gb * 2**30))
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Conversion is a one-process CPU job, even on a GPU node where training may be running.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        path = convert(args)
    except ValueError as err:  # ConversionError, TokenizerExportError, an unreadable tokenizer
        print(f"convert_to_hf: error: {err}", file=sys.stderr)
        return 1
    finally:
        runtime = sys.modules.get("megatron_mile.runtime")
        if runtime is not None:  # only once loading started
            runtime.shutdown()
    print(f"converted {path} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
