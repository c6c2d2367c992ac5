#!/usr/bin/env python
"""Convert a megatron-mile checkpoint (any TP/PP/VP layout) into a Hugging Face Llama directory.

  python checkpoint_conversion/convert_to_hf.py --load runs/468M_mile --output hf/468M_mile
  lm_eval --model hf --model_args pretrained=hf/468M_mile --tasks hellaswag --batch_size 16

--load is a --save directory (its latest complete checkpoint, or --iteration N) or one
iter_NNNNNNN directory. The model is rebuilt at TP=1 PP=1 in this one process (gloo,
world of 1, on the CPU) and megatron-core dist_checkpointing reshards the saved tensors
into it; the optimizer state is not read. Output: config.json, safetensors weights (true
vocabulary rows only) and the run's tokenizer, written to OUTPUT.tmp and renamed at the end.

From Python: ``convert_checkpoint(checkpoint_dir, output)`` (what megatron-mile-eval calls).
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
DEFAULT_DTYPE = "auto"
DEFAULT_MAX_SHARD_SIZE_GB = 5.0


class ConversionError(ValueError):
    """Bad input for the conversion; the message is one line."""


def build_parser() -> argparse.ArgumentParser:
    from megatron_mile.cli import ArgumentParser
    from megatron_mile.data.tokenizer import TOKENIZER_TYPE_HELP, tokenizer_type_argument

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="the run's --save directory, or one iter_NNNNNNN directory")
    p.add_argument("--iteration", type=int, help="default: latest_checkpointed_iteration.txt")
    p.add_argument("--output", required=True, help="Hugging Face model directory to create")
    p.add_argument("--tokenizer-model", help="default: the run's --tokenizer-model (SentencePiece file or HF dir)")
    p.add_argument("--tokenizer-type", type=tokenizer_type_argument,
                   help=TOKENIZER_TYPE_HELP.replace("(default: inferred", "(default: the run's, or inferred"))
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPES,
                   help="auto: bfloat16 for --bf16 runs, else float32")
    p.add_argument("--max-shard-size-gb", type=float, default=DEFAULT_MAX_SHARD_SIZE_GB, help="safetensors shard size")
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
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_mile import runtime
    from megatron_mile.arguments import checkpoint_shape
    from megatron_mile.checkpointing import saved_vocab_rows
    from megatron_mile.model import build_model_chunks, build_transformer_config

    runtime.initialize_world_of_one()
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as err:  # torch.load / pickle raise many types on a damaged file
        raise ConversionError(f"{path}: unreadable checkpoint ({str(err).splitlines()[0]})") from None
    if not all(k in common for k in ("args", "vocab_size", "layout")):
        raise ConversionError(f"{path}: not a megatron-mile checkpoint (no args/vocab_size/layout)")
    run_args, vocab_size = common["args"], common["vocab_size"]
    shape = checkpoint_shape(run_args)
    # The saved embedding holds the vocabulary padded as the run padded it (its TP and
    # --make-vocab-size-divisible-by); rebuild with exactly that many rows.
    saved_rows = saved_vocab_rows(path)
    config = build_transformer_config(shape)
    model = build_model_chunks(config, saved_rows, shape.seq_length, seed=0, device=torch.device("cpu"),
                               vocab_divisible_by=1, rotary_base=shape.rotary_base)[0]
    try:
        loaded = dist_checkpointing.load({"model0": model.sharded_state_dict()}, path,
                                         strict=StrictHandling.RAISE_UNEXPECTED)
    # dist_checkpointing raises CheckpointingException, KeyError, RuntimeError…, and torch's
    # CheckpointException (a missing or damaged shard file) derives from BaseException.
    except (Exception, CheckpointException) as err:
        if isinstance(err, CheckpointException):  # the first rank's failure says what is wrong
            err = next(iter(err.failures.values()))[0]
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
    umask = os.umask(0)
    os.umask(umask)

    def save(shard: dict, filename: str) -> None:
        save_file(shard, os.path.join(out_dir, filename), metadata=metadata)
        # safetensors creates its files with mode 0600; give them the mode of any other file
        # written here (the umask's), so that a group sharing the filesystem can read them.
        os.chmod(os.path.join(out_dir, filename), 0o666 & ~umask)

    if len(shards) == 1:
        save(shards[0], "model.safetensors")
        return
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save(shard, filename)
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def convert_checkpoint(checkpoint: str, output: str, *, tokenizer_model: str | None = None,
                       tokenizer_type: str | None = None, dtype: str = DEFAULT_DTYPE,
                       max_shard_size_gb: float = DEFAULT_MAX_SHARD_SIZE_GB, overwrite: bool = False) -> None:
    """Write the Hugging Face Llama directory ``output`` for one ``iter_NNNNNNN`` checkpoint.

    Starts and ends a one-process ``torch.distributed`` world of its own, so no other process
    group may be active in the caller. ``tokenizer_model``/``tokenizer_type`` default to the
    run's. Bad input raises ``ValueError`` (``ConversionError``, ``TokenizerExportError``) with
    one line; ``output`` appears only when complete.
    """
    import torch

    from checkpoint_conversion import hf_tokenizer
    from checkpoint_conversion.llama_mapping import LlamaShape, hf_config, to_hf_state_dict
    from checkpoint_conversion.staging import staged_directory
    from megatron_mile import runtime

    if os.path.exists(output) and not overwrite:
        raise ConversionError(f"--output: {output} exists (pass --overwrite to replace it)")
    try:
        state, run_args, vocab_size, shape = load_full_state(checkpoint)
    finally:
        runtime.shutdown()
    llama = LlamaShape.of(shape, vocab_size)
    dtype_name = dtype if dtype != "auto" else ("bfloat16" if run_args.get("bf16") else "float32")
    torch_dtype = getattr(torch, dtype_name)
    tensors = {k: v.to(torch_dtype) for k, v in to_hf_state_dict(state, llama).items()}
    tokenizer_path = tokenizer_model or run_args["tokenizer_model"]
    tokenizer_type = tokenizer_type or (None if tokenizer_model else run_args.get("tokenizer_type"))

    with staged_directory(output) as staging:
        bos, eos = hf_tokenizer.export_tokenizer(tokenizer_path, tokenizer_type, staging, shape.seq_length)
        hf_tokenizer.verify(tokenizer_path, tokenizer_type, staging)
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(hf_config(llama, torch_dtype, bos, eos), f, indent=2)
        write_safetensors(tensors, staging, int(max_shard_size_gb * 2**30))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Conversion is a one-process CPU job, even on a GPU node where training may be running.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        path = resolve_checkpoint(args.load, args.iteration)
        convert_checkpoint(path, args.output, tokenizer_model=args.tokenizer_model,
                           tokenizer_type=args.tokenizer_type, dtype=args.dtype,
                           max_shard_size_gb=args.max_shard_size_gb, overwrite=args.overwrite)
    except ValueError as err:  # ConversionError, TokenizerExportError, an unreadable tokenizer
        print(f"convert_to_hf: error: {err}", file=sys.stderr)
        return 1
    print(f"converted {path} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
