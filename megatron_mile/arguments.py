"""Command-line flags (Megatron-LM's names where the concept is the same) and their checks.

``build_parser`` is the single source of every default (``--help`` prints them), and
``validate`` runs before any process group or model exists, so a bad combination costs
nothing: it raises ``ConfigError`` with one line naming the flag. Megatron-LM flags that
only restate this project are handled by ``megatron_mile.megatron_lm_flags``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from megatron_mile import megatron_lm_flags
from megatron_mile.cli import ArgumentParser, DefaultsHelpFormatter
from megatron_mile.data.tokenizer import TOKENIZER_TYPE_HELP, tokenizer_type_argument
from megatron_mile.interrupts import EXIT_SIGNALS
from megatron_mile.model import PRESETS, VOCAB_PAD_MULTIPLE, ModelShape, resolve_shape
from megatron_mile.optim import fused_adam_available

DESCRIPTION = """\
Pretrain a LLaMA-style GPT model with the MiLe loss, focal loss or cross-entropy, on one machine
or many (run it under torchrun: one process per GPU, or per CPU rank).

  torchrun --nproc-per-node 8 -m megatron_mile.train --model-preset 468M \\
      --data-path data/pile/blend.json --tokenizer-model data/pile/tokenizer.model --train-iters 95367

Flags follow Megatron-LM's names. A bad flag or combination stops the run before any work,
with one line on stderr and exit code 2."""


class ConfigError(ValueError):
    """A bad flag or flag combination; the message is one line naming the flag."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model's shape: a preset and the flags that override it (the trainer's and the planner's)."""
    g = parser.add_argument_group("model", "with --load, the checkpoint's architecture is used (a flag that "
                                           "contradicts it is refused), and --seq-length defaults to the checkpoint's")
    g.add_argument("--model-preset", default="tiny", choices=list(PRESETS),
                   help="the paper's architectures, or a few-MB model for CPU runs")
    g.add_argument("--num-layers", type=int, help="(default: the preset's)")
    g.add_argument("--hidden-size", type=int, help="(default: the preset's)")
    g.add_argument("--num-attention-heads", type=int, help="(default: the preset's)")
    g.add_argument("--ffn-hidden-size", type=int, help="SwiGLU inner size (default: the preset's)")
    g.add_argument("--seq-length", type=int, help="tokens per sequence (default: the preset's)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=VOCAB_PAD_MULTIPLE,
                   help="pad the embedding and output rows to a multiple of this × tensor-parallel size")
    g.add_argument("--group-query-attention", action="store_true",
                   help="grouped-query attention: --num-query-groups key/value heads, each shared by "
                        "num-attention-heads / num-query-groups query heads")
    g.add_argument("--num-query-groups", type=int, default=1,
                   help="key/value heads with --group-query-attention (ignored without it, as in Megatron-LM); "
                        "must divide --num-attention-heads and be divisible by --tensor-model-parallel-size")
    g.add_argument("--rotary-base", type=int, help="RoPE base (theta) (default: the preset's)")
    g.add_argument("--norm-epsilon", type=float, help="RMSNorm epsilon (default: the preset's)")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="megatron-mile-train", description=DESCRIPTION, epilog=megatron_lm_flags.help_epilog(),
                       formatter_class=DefaultsHelpFormatter)

    add_model_arguments(p)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="ranks that split each layer's matrices")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="ranks that split the layers into stages")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int,
                   help="interleaved 1F1B with this many layers per model chunk (default: one chunk per stage)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="shard norms' and dropouts' activations along the sequence over the tensor-parallel ranks")
    g.add_argument("--use-distributed-optimizer", dest="use_distributed_optimizer", action="store_true",
                   default=None, help="shard the optimizer state over data-parallel ranks (ZeRO-1). Without "
                   "either flag: the distributed optimizer when DP > 1, the regular one at DP=1, and when "
                   "resuming optimizer state, the optimizer that saved it")
    g.add_argument("--no-distributed-optimizer", dest="use_distributed_optimizer", action="store_false",
                   default=None, help="keep the full optimizer state on every data-parallel rank")
    g.add_argument("--recompute-activations", action="store_true",
                   help="recompute every transformer layer in the backward pass instead of storing its activations")
    g.add_argument("--no-bias-swiglu-fusion", dest="bias_swiglu_fusion", action="store_false",
                   help="run SwiGLU as separate kernels (megatron_mile/swiglu.py; by default, on a GPU, "
                   "megatron-core's version fused with torch.compile, when it compiles there)")
    g.add_argument("--no-rope-fusion", dest="apply_rope_fusion", action="store_false",
                   help="apply RoPE with megatron-core's unfused operations instead of megatron_mile/rope.py's "
                   "in-place version (used without Transformer Engine)")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10,
                   help="how long a collective may wait before the run fails")

    g = p.add_argument_group("batch")
    g.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward pass on one rank")
    g.add_argument("--global-batch-size", type=int, default=8,
                   help="sequences per optimizer step, over all data-parallel ranks and micro-batches")

    g = p.add_argument_group("optimizer and schedule (defaults: the paper's recipe)")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=3e-5, help="learning rate at the end of the decay")
    g.add_argument("--lr-warmup-iters", type=int, default=2000, help="linear warm-up from 0 to --lr")
    g.add_argument("--lr-decay-iters", type=int, help="decay length, warm-up included (default: --train-iters)")
    g.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "linear", "constant"],
                   help="from --lr to --min-lr after the warm-up")
    g.add_argument("--train-iters", type=int, required=True, help="optimizer steps (one global batch each)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="decoupled (AdamW); not on norms")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam's first-moment decay")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="Adam's second-moment decay")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam's denominator epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="clip the global grad norm to this; 0: no clipping")
    g.add_argument("--bf16", action="store_true", help="bf16 weights and activations, fp32 main weights and grads")
    g.add_argument("--seed", type=int, default=1234, help="seeds the initial weights and the data order")
    g.add_argument("--max-skipped-iters", type=int, default=10,
                   help="stop after this many consecutive steps skipped for a non-finite loss or grad norm")

    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="mile", choices=["ce", "focal", "mile"],
                   help="MiLe: CE weighted by (sigma + entropy)^gamma; focal: by (1 - p_target)^gamma")
    g.add_argument("--mile-gamma", type=float, default=1.0, help="gamma of MiLe and of focal; 0 is plain CE")
    g.add_argument("--mile-sigma", type=float, default=1.0, help="sigma of MiLe")
    g.add_argument("--mile-alpha-mode", default="global", choices=["global", "legacy"],
                   help="global: normalise the weights over the micro-batch's tokens on all data-parallel "
                        "ranks; legacy: the original code's normalisation")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="the training target's smoothing epsilon")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", required=True,
                   help="Megatron-LM's '[weight] prefix ...' list, or one blend JSON (tools/make_blend.py)")
    g.add_argument("--split", default="969,30,1", help="train,validation,test proportions of every dataset")
    g.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece .model file or Hugging Face tokenizer directory")
    g.add_argument("--tokenizer-type", type=tokenizer_type_argument, help=TOKENIZER_TYPE_HELP)
    g.add_argument("--data-cache-path", help="where megatron-core caches its sample indexes "
                                             "(default: <save>/data_cache, or none without --save)")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", help="directory for checkpoints, metrics.jsonl and TensorBoard logs (default: none)")
    g.add_argument("--load", help="resume from the latest checkpoint in this directory (default: none)")
    g.add_argument("--save-interval", type=int, help="iterations between checkpoints (default: only at the end)")
    g.add_argument("--finetune", action="store_true",
                   help="load only the model weights of --load and start at iteration 0 with a fresh optimizer, "
                        "schedule, RNG and data position (e.g. from an imported Hugging Face model)")
    g.add_argument("--no-load-optim", action="store_true",
                   help="restore the model, schedule and data position, but start the optimizer state afresh")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="save distributed-optimizer state gathered per parameter, loadable at any TP/PP, "
                        "instead of per-rank shards that reload at the same TP/PP only")
    g.add_argument("--load-optional", action="store_true",
                   help="start from iteration 0 when --load holds no checkpoint (otherwise that is an error "
                        "unless --load is the --save directory)")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="a --load without a checkpoint is an error, even when it is the --save directory")
    g.add_argument("--overwrite", action="store_true",
                   help="remove the checkpoints, metrics file and TensorBoard events an earlier run left in --save "
                        "(and --metrics-file, --tensorboard-dir) before starting from scratch")
    g.add_argument("--exit-interval", type=int,
                   help="stop (and save) once the iteration is a multiple of this (default: never)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on --exit-signal, every rank finishes its iteration, saves a checkpoint and exits 0")
    g.add_argument("--exit-signal", default="SIGTERM", choices=list(EXIT_SIGNALS),
                   help="the signal --exit-signal-handler acts on")
    g.add_argument("--exit-duration-in-mins", type=float,
                   help="save and exit at the first iteration boundary this many minutes after the start "
                        "(default: no limit)")
    g.add_argument("--check-config", action="store_true",
                   help="check the flags at the world size in $WORLD_SIZE (default 1), the data and --save/--load, "
                        "print one line and exit: 0, or 2 with the error")

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=1000,
                   help="iterations between evaluations (overall and per-domain validation log-ppl)")
    g.add_argument("--eval-iters", type=int, default=10, help="batches per evaluation (and per domain)")
    g.add_argument("--log-interval", type=int, default=10, help="iterations between log lines")
    g.add_argument("--tensorboard-dir", help="(default: <save>/tensorboard, or none without --save)")
    g.add_argument("--wandb-project", help="log to this Weights & Biases project (default: no wandb)")
    g.add_argument("--wandb-exp-name", help="the wandb run's name (default: wandb's)")
    g.add_argument("--metrics-file", help="one JSON line per log and evaluation "
                                          "(default: <save>/metrics.jsonl, or none without --save)")
    megatron_lm_flags.add_to_parser(p)
    return p


# The flags ``model_shape`` reads: a checkpoint's saved values of these are its architecture.
SHAPE_ARGS = ("model_preset", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
              "group_query_attention", "num_query_groups", "rotary_base", "norm_epsilon")


def _shape_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ModelShape fields the flags set; None leaves the preset's."""
    return dict(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
                ffn_hidden_size=args.ffn_hidden_size, seq_length=args.seq_length,
                num_query_groups=args.num_query_groups if args.group_query_attention else None,
                rotary_base=args.rotary_base, norm_epsilon=args.norm_epsilon)


def model_shape(args: argparse.Namespace) -> ModelShape:
    return resolve_shape(args.model_preset, **_shape_overrides(args))


def checkpoint_shape(saved_args: dict[str, Any]) -> ModelShape:
    """The architecture in a checkpoint's saved arguments (a flag newer than the checkpoint takes its default)."""
    parser = build_parser()
    return model_shape(argparse.Namespace(**{name: saved_args.get(name, parser.get_default(name))
                                             for name in SHAPE_ARGS}))


def adopt_checkpoint_architecture(args: argparse.Namespace, saved_args: dict[str, Any], source: str) -> None:
    """Take the model's architecture from the checkpoint that ``--load`` names.

    The weights fix every ModelShape field but the sequence length, so they are set from
    the checkpoint, and a flag that contradicts it (or a --model-preset other than the
    default that does) is refused. ``--seq-length`` is the checkpoint's unless given.
    Everything else (tokenizer, data, batch, schedule, loss, layout) is this run's own.
    """
    saved = checkpoint_shape(saved_args)
    given = _shape_overrides(args)
    default_preset = build_parser().get_default("model_preset")
    preset = resolve_shape(args.model_preset) if args.model_preset != default_preset else None
    for field, want in _architecture(saved).items():
        name = field.replace("_", "-")
        if given[field] is not None:
            value = given[field]
            stated = f"--{name} {value}"
        elif preset is not None:
            value = _architecture(preset)[field]
            stated = f"--model-preset {args.model_preset} ({name} {value})"
        else:
            continue
        if value != want:
            raise ConfigError(f"{stated} contradicts the checkpoint {source}, which has {name} {want}; "
                              "leave it out to use the checkpoint's")
    for name, value in shape_arguments(saved).items():
        if name != "seq_length" or args.seq_length is None:
            setattr(args, name, value)


def shape_arguments(shape: ModelShape) -> dict[str, Any]:
    """The flags that give ``shape`` on top of any preset (the inverse of ``model_shape``)."""
    grouped = shape.query_groups != shape.num_attention_heads
    return dict(num_layers=shape.num_layers, hidden_size=shape.hidden_size,
                num_attention_heads=shape.num_attention_heads, ffn_hidden_size=shape.ffn_hidden_size,
                seq_length=shape.seq_length, group_query_attention=grouped,
                num_query_groups=shape.query_groups if grouped else build_parser().get_default("num_query_groups"),
                rotary_base=shape.rotary_base, norm_epsilon=shape.norm_epsilon)


def _architecture(shape: ModelShape) -> dict[str, Any]:
    """The fields a checkpoint's weights fix (all but the sequence length); multi-head attention
    counts as one query group per head."""
    fixed = dataclasses.asdict(dataclasses.replace(shape, num_query_groups=shape.query_groups))
    del fixed["seq_length"]
    return fixed


def checked_model_shape(args: argparse.Namespace) -> ModelShape:
    """``model_shape`` after the checks that need no layout: positive sizes, heads dividing hidden,
    query groups dividing heads."""
    _positive(args, "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
              "num_query_groups", "rotary_base", "norm_epsilon")
    shape = model_shape(args)
    if shape.hidden_size % shape.num_attention_heads:
        raise ConfigError(f"--hidden-size {shape.hidden_size} is not divisible by "
                          f"--num-attention-heads {shape.num_attention_heads}")
    if shape.num_attention_heads % shape.query_groups:
        raise ConfigError(f"--num-attention-heads {shape.num_attention_heads} is not divisible by "
                          f"--num-query-groups {shape.query_groups}")
    return shape


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")


def virtual_pipeline_stages(args: argparse.Namespace) -> int | None:
    """Model chunks per pipeline stage under interleaving; None for plain 1F1B (one chunk)."""
    per_chunk = args.num_layers_per_virtual_pipeline_stage
    if per_chunk is None:
        return None
    stages = model_shape(args).num_layers // (args.pipeline_model_parallel_size * per_chunk)
    return stages if stages > 1 else None


def validate(args: argparse.Namespace, world_size: int) -> None:
    """Check every flag combination that would otherwise fail deep inside a run."""
    _positive(args, "tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
              "global_batch_size", "train_iters", "log_interval", "eval_interval", "save_interval", "exit_interval",
              "num_layers_per_virtual_pipeline_stage", "make_vocab_size_divisible_by", "distributed_timeout_minutes",
              "exit_duration_in_mins")
    shape = checked_model_shape(args)
    refusal = megatron_lm_flags.check(args.megatron_lm_flags, shape)
    if refusal:
        raise ConfigError(refusal)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} "
                          f"× --pipeline-model-parallel-size {pp}")
    dp = world_size // (tp * pp)
    if shape.num_attention_heads % tp:
        raise ConfigError(f"--num-attention-heads {shape.num_attention_heads} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    if args.group_query_attention and shape.query_groups % tp:
        raise ConfigError(f"--num-query-groups {shape.query_groups} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    if shape.ffn_hidden_size % tp:
        raise ConfigError(f"--ffn-hidden-size {shape.ffn_hidden_size} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    per_vp = args.num_layers_per_virtual_pipeline_stage
    if per_vp is not None:
        if pp == 1:
            raise ConfigError(f"--num-layers-per-virtual-pipeline-stage {per_vp} needs "
                              "--pipeline-model-parallel-size > 1 (it splits each pipeline stage into chunks)")
        if shape.num_layers % (pp * per_vp):
            raise ConfigError(f"--num-layers {shape.num_layers} is not divisible by --pipeline-model-parallel-size "
                              f"{pp} × --num-layers-per-virtual-pipeline-stage {per_vp}")
    elif shape.num_layers % pp:
        raise ConfigError(f"--num-layers {shape.num_layers} is not divisible by "
                          f"--pipeline-model-parallel-size {pp}")
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                          f"--micro-batch-size {args.micro_batch_size} × data-parallel size {dp}")
    microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    if virtual_pipeline_stages(args) and microbatches % pp:
        # megatron-core's interleaved schedule runs micro-batches in groups of PP.
        raise ConfigError(f"--num-layers-per-virtual-pipeline-stage {per_vp}: the interleaved schedule needs the "
                          f"micro-batches per step ({microbatches} = --global-batch-size {args.global_batch_size} / "
                          f"(--micro-batch-size {args.micro_batch_size} × data-parallel size {dp})) to be a "
                          f"multiple of --pipeline-model-parallel-size {pp}")
    if args.sequence_parallel and tp > 1 and shape.seq_length % tp:
        raise ConfigError(f"--seq-length {shape.seq_length} is not divisible by --tensor-model-parallel-size {tp} "
                          "(needed by --sequence-parallel)")
    decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters >= decay_iters:
        raise ConfigError(f"--lr-warmup-iters {args.lr_warmup_iters} must be smaller than the decay length "
                          f"{decay_iters} (--lr-decay-iters, default --train-iters)")
    distributed = args.use_distributed_optimizer if args.use_distributed_optimizer is not None else dp > 1
    if args.dist_ckpt_optim_fully_reshardable and distributed and not fused_adam_available():
        raise ConfigError("--dist-ckpt-optim-fully-reshardable needs apex or Transformer Engine: megatron-core "
                          "0.16.1 cannot reload that format into torch's Adam")
    if args.mile_gamma < 0:
        raise ConfigError(f"--mile-gamma must be >= 0, got {args.mile_gamma}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise ConfigError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if not os.path.exists(args.tokenizer_model):
        raise ConfigError(f"--tokenizer-model: {args.tokenizer_model} does not exist")
    if args.finetune and not args.load:
        raise ConfigError("--finetune needs --load (the checkpoint whose model weights to start from)")
    if args.save_interval and not args.save:
        raise ConfigError("--save-interval needs --save")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)
