"""Command-line flags (Megatron-LM's names where the concept is the same) and their checks.

``validate`` runs before any process group or model exists, so a bad combination costs
nothing: it raises ``ConfigError`` with one line naming the flag.
"""

from __future__ import annotations

import argparse
import os

from megatron_mile.model import PRESETS, ModelShape, resolve_shape
from megatron_mile.optim import fused_adam_available


class ConfigError(ValueError):
    """A bad flag or flag combination; the message is one line naming the flag."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-mile-train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group("model")
    g.add_argument("--model-preset", default="tiny", choices=list(PRESETS))
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--ffn-hidden-size", type=int)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", dest="use_distributed_optimizer", action="store_true",
                   default=None, help="shard optimizer state over DP (ZeRO-1). Without either flag: the "
                   "distributed optimizer when DP > 1, the regular one at DP=1, and when resuming optimizer "
                   "state, the optimizer that saved it")
    g.add_argument("--no-distributed-optimizer", dest="use_distributed_optimizer", action="store_false",
                   default=None, help="megatron-core's regular optimizer, with full optimizer state on every DP rank")
    g.add_argument("--recompute-activations", action="store_true")

    g = p.add_argument_group("batch and length")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=8)
    g.add_argument("--seq-length", type=int, help="defaults to the preset's")

    g = p.add_argument_group("optimizer and schedule (defaults: the paper's recipe)")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=3e-5)
    g.add_argument("--lr-warmup-iters", type=int, default=2000)
    g.add_argument("--lr-decay-iters", type=int, help="defaults to --train-iters")
    g.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true", help="bf16 weights and activations, fp32 main weights and grads")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--max-skipped-iters", type=int, default=10,
                   help="stop after this many consecutive non-finite iterations")

    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="mile", choices=["ce", "focal", "mile"])
    g.add_argument("--mile-gamma", type=float, default=1.0, help="gamma for MiLe, and for focal")
    g.add_argument("--mile-sigma", type=float, default=1.0)
    g.add_argument("--mile-alpha-mode", default="global", choices=["global", "legacy"])
    g.add_argument("--label-smoothing", type=float, default=0.0)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", required=True,
                   help="Megatron-LM's '[weight] prefix ...' list, or one blend JSON (tools/make_blend.py)")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece .model file or Hugging Face tokenizer directory")
    g.add_argument("--tokenizer-type", choices=["sentencepiece", "huggingface"],
                   help="inferred from --tokenizer-model when omitted")
    g.add_argument("--data-cache-path", help="sample-index cache; defaults to <save>/data_cache")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save")
    g.add_argument("--load")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--no-load-optim", action="store_true",
                   help="restore the model, schedule and data position, but start the optimizer state afresh")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="save distributed-optimizer state gathered per parameter, loadable at any TP/PP "
                        "(default: dp_reshardable, no gather, reloads at the same TP/PP)")
    g.add_argument("--exit-interval", type=int, help="stop (and save) once the iteration is a multiple of this")

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=10, help="batches per evaluation (and per domain)")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir", help="defaults to <save>/tensorboard")
    g.add_argument("--wandb-project")
    g.add_argument("--wandb-exp-name")
    g.add_argument("--metrics-file", help="defaults to <save>/metrics.jsonl")
    return p


def model_shape(args: argparse.Namespace) -> ModelShape:
    return resolve_shape(args.model_preset, num_layers=args.num_layers, hidden_size=args.hidden_size,
                         num_attention_heads=args.num_attention_heads, ffn_hidden_size=args.ffn_hidden_size,
                         seq_length=args.seq_length)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")


def validate(args: argparse.Namespace, world_size: int) -> None:
    """Check every flag combination that would otherwise fail deep inside a run."""
    _positive(args, "tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
              "global_batch_size", "train_iters", "num_layers", "hidden_size", "num_attention_heads",
              "ffn_hidden_size", "seq_length", "log_interval", "eval_interval", "save_interval", "exit_interval",
              "num_layers_per_virtual_pipeline_stage")
    shape = model_shape(args)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} "
                          f"× --pipeline-model-parallel-size {pp}")
    dp = world_size // (tp * pp)
    if shape.num_attention_heads % tp:
        raise ConfigError(f"--num-attention-heads {shape.num_attention_heads} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    if shape.hidden_size % shape.num_attention_heads:
        raise ConfigError(f"--hidden-size {shape.hidden_size} is not divisible by "
                          f"--num-attention-heads {shape.num_attention_heads}")
    if shape.ffn_hidden_size % tp:
        raise ConfigError(f"--ffn-hidden-size {shape.ffn_hidden_size} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    per_vp = args.num_layers_per_virtual_pipeline_stage
    if per_vp is not None:
        if shape.num_layers % (pp * per_vp):
            raise ConfigError(f"--num-layers {shape.num_layers} is not divisible by --pipeline-model-parallel-size "
                              f"{pp} × --num-layers-per-virtual-pipeline-stage {per_vp}")
    elif shape.num_layers % pp:
        raise ConfigError(f"--num-layers {shape.num_layers} is not divisible by "
                          f"--pipeline-model-parallel-size {pp}")
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                          f"--micro-batch-size {args.micro_batch_size} × data-parallel size {dp}")
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
    if args.load and not os.path.isdir(args.load):
        raise ConfigError(f"--load: {args.load} is not a directory")
    if args.save_interval and not args.save:
        raise ConfigError("--save-interval needs --save")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)
