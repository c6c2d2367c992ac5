"""Megatron-LM flags with no flag of their own here: accepted when they restate this project, else refused.

A Megatron-LM Llama pretraining script passes many flags that only describe what every
megatron-mile model already is (``--swiglu``, ``--normalization RMSNorm``, ...). ``FLAGS``
is the one table of them: each entry says what this project does, and either accepts the
flag silently (with the value it must have, if it takes one) or refuses it with the reason.
Megatron-LM flags that mean something here (``--make-vocab-size-divisible-by``,
``--data-cache-path``, ``--tokenizer-type``, ...) are ordinary flags in
``megatron_mile.arguments``; anything in neither place is an unrecognized argument.

``add_to_parser`` registers the table (hidden from ``--help``, summarised in its epilog) and
``check`` turns what was passed into a ``ConfigError``-style one-line message.
"""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

from megatron_mile.model import INIT_STD, ModelShape

SWITCH = object()  # the flag takes no value
ANY = object()  # any value is accepted


@dataclass(frozen=True)
class Restated:
    """Accepted silently: the flag restates this project (with ``value``, when it takes one)."""

    flag: str
    means: str  # what this project does
    value: Any = SWITCH  # SWITCH, ANY, the one value, or a function of the model shape giving it
    parse: Callable[[str], Any] = str
    shown: str = ""  # how --help spells a value computed from the model shape

    @property
    def takes_value(self) -> bool:
        return self.value is not SWITCH

    def expected(self, shape: ModelShape) -> Any:
        return self.value(shape) if callable(self.value) else self.value


@dataclass(frozen=True)
class Refused:
    """Refused whatever its value, with the reason and what to do instead."""

    flag: str
    why: str
    takes_value: bool = True


FLAGS: tuple[Restated | Refused, ...] = (
    # The LLaMA architecture of every preset.
    Restated("--use-mcore-models", "the model is megatron-core's GPTModel"),
    Restated("--swiglu", "the MLP is SwiGLU"),
    Restated("--normalization", "the norms are RMSNorm", "RMSNorm"),
    Restated("--position-embedding-type", "positions are RoPE", "rope"),
    Restated("--use-rotary-position-embeddings", "positions are RoPE"),
    Restated("--no-position-embedding", "there is no learned position table (RoPE)"),
    Restated("--rotary-percent", "RoPE rotates every head dimension", 1.0, float),
    Restated("--max-position-embeddings", "positions run up to --seq-length",
             lambda shape: shape.seq_length, int, shown="<--seq-length>"),
    Restated("--kv-channels", "the head dimension is --hidden-size / --num-attention-heads",
             lambda shape: shape.hidden_size // shape.num_attention_heads, int, shown="<hidden / heads>"),
    Restated("--untie-embeddings-and-output-weights",
             "input and output embeddings are untied, as in the paper"),
    Restated("--disable-bias-linear", "linear layers have no biases"),
    Restated("--attention-dropout", "there is no dropout", 0.0, float),
    Restated("--hidden-dropout", "there is no dropout", 0.0, float),
    Restated("--init-method-std", f"weights start from N(0, {INIT_STD}), the paper's initializer_range",
             INIT_STD, float),
    Refused("--apply-layernorm-1p", "RMSNorm weights are used as they are, not as 1 + w", takes_value=False),
    # Precision, kernels and runtime, which this project chooses itself.
    Refused("--fp16", "fp16 needs loss scaling, which this trainer does not do; use --bf16",
            takes_value=False),
    Refused("--grad-reduce-in-bf16", "gradients are reduced in fp32", takes_value=False),
    Restated("--attention-softmax-in-fp32", "the attention softmax runs in fp32 (megatron-core's default)"),
    Restated("--no-masked-softmax-fusion",
             "the fused softmax is a kernel choice with the same math, made by what is installed"),
    Restated("--no-gradient-accumulation-fusion", "gradient-accumulation fusion is always off"),
    Restated("--transformer-impl", "Transformer Engine's layers are used whenever TE and CUDA are present",
             "transformer_engine"),
    Restated("--overlap-grad-reduce", "the grad reduce always overlaps the backward pass"),
    Refused("--overlap-param-gather", "the distributed optimizer gathers parameters right after its step; "
            "drop the flag", takes_value=False),
    Restated("--distributed-backend", "the backend follows the machine: NCCL with CUDA, gloo without", "nccl"),
    Restated("--context-parallel-size", "there is no context parallelism", 1, int),
    Restated("--optimizer", "the optimizer is Adam(W)", "adam"),
    Refused("--cross-entropy-loss-fusion", "the loss is this project's vocab-parallel loss (--loss)",
            takes_value=False),
    Refused("--calculate-per-token-loss", "the loss is a mean over each micro-batch's tokens (see --loss)",
            takes_value=False),
    # Checkpoints, data and logging.
    Restated("--ckpt-format", "checkpoints are megatron-core dist_checkpointing (torch_dist)", "torch_dist"),
    Restated("--log-throughput", "tokens/s, TFLOP/s and MFU are always logged"),
    Restated("--no-create-attention-mask-in-dataloader", "the causal mask is never built by the data loader"),
    Restated("--num-workers", "samples are read in the training process (no DataLoader workers)", ANY),
    Refused("--mock-data", "there is no mock-data mode; pass --data-path", takes_value=False),
    Refused("--vocab-size", "the vocabulary comes from --tokenizer-model"),
    Refused("--vocab-file", "GPT-2 vocab/merges files are not read; pass a Hugging Face tokenizer directory "
            "as --tokenizer-model"),
    Refused("--merge-file", "GPT-2 vocab/merges files are not read; pass a Hugging Face tokenizer directory "
            "as --tokenizer-model"),
    # Sample-based schedules: this trainer counts iterations (one global batch each).
    Refused("--train-samples", "use --train-iters (samples / --global-batch-size)"),
    Refused("--lr-decay-samples", "use --lr-decay-iters (samples / --global-batch-size)"),
    Refused("--lr-warmup-samples", "use --lr-warmup-iters (samples / --global-batch-size)"),
    Refused("--lr-warmup-fraction", "use --lr-warmup-iters"),
    Refused("--rampup-batch-size", "the global batch size is constant"),
)

DEST = "megatron_lm_flags"  # {flag: value given, or None for a switch}


class _Record(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        getattr(namespace, DEST)[option_string] = values


def add_to_parser(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(**{DEST: {}})
    for entry in FLAGS:
        parser.add_argument(entry.flag, action=_Record, nargs=None if entry.takes_value else 0, dest=DEST,
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def check(given: dict[str, Any], shape: ModelShape) -> str | None:
    """The one-line refusal for the first flag that contradicts this project, or None."""
    by_flag = {entry.flag: entry for entry in FLAGS}
    for flag, raw in given.items():
        entry = by_flag[flag]
        if isinstance(entry, Refused):
            return f"{flag} is not supported: {entry.why}"
        expected = entry.expected(shape)
        if expected is SWITCH or expected is ANY:
            continue
        try:
            value = entry.parse(raw)
        except ValueError:
            return f"{flag} {raw}: not a valid value ({entry.means})"
        if value != expected:
            return f"{flag} {raw} contradicts this project: {entry.means} ({flag} {expected})"
    return None


def help_epilog() -> str:
    """The table for ``--help``: what is accepted silently and what is refused."""
    def spelled(entry: Restated) -> str:
        if entry.value is SWITCH:
            return entry.flag
        return f"{entry.flag} {entry.shown or ('N' if entry.value is ANY else entry.value)}"

    accepted = ", ".join(spelled(e) for e in FLAGS if isinstance(e, Restated))
    refused = ", ".join(e.flag for e in FLAGS if isinstance(e, Refused))
    return "\n\n".join(textwrap.fill(text, width=100, break_on_hyphens=False) for text in (
        f"Megatron-LM flags that restate this project are accepted: {accepted}.",
        f"Megatron-LM flags refused with the reason: {refused}."))
