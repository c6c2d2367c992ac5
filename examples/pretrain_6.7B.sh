#!/usr/bin/env bash
# 6.7B LLaMA (32 layers, hidden 4096, 32 heads, SwiGLU 11008) on 128 GPUs = 16 nodes x 8.
# Run once per node, like the paper's scripts:
#   bash examples/pretrain_6.7B.sh MASTER_ADDR NODE_RANK [MASTER_PORT]     # NODE_RANK 0..15
# Environment overrides (LOSS, GAMMA, DATA_PATH, TOKENIZER, SAVE, ...): see pretrain_common.sh.
#
# Layout: TP=2 PP=1 DP=64, with sequence parallelism and the distributed optimizer.
#   megatron-mile-plan ranks TP=1 PP=1 DP=128 first (micro-batch 1-4, ~6% faster by its estimate):
#   a full replica (13 GB bf16 weights + 27 GB fp32 grads) leaves room for micro-batch 1 even
#   without Transformer Engine, but only just (71 of 72 usable GiB: megatron-core's local attention
#   keeps the s x s scores). TP=2 with --sequence-parallel is kept for headroom (28 GiB per GPU with
#   TE's flash attention, 52 GiB without TE); its collectives stay inside a node on NVLink. The
#   fp32 Adam state (~80 GB in all) is sharded over the 64 DP ranks. TP=2 keeps DP large, which
#   beats deeper TP (more TP communication) and PP (a pipeline bubble). On 40 GB cards this fits
#   with TE; without TE use PP=2 (DP=32, 32 micro-batches per step, a ~3% bubble) or
#   EXTRA_ARGS=--recompute-activations. PARALLEL_ARGS= turns sequence
#   parallelism off. Checkpoints keep the optimizer state dp_reshardable (no gather over 64
#   ranks); to resume at another TP/PP, pass --no-load-optim, or save with
#   EXTRA_ARGS=--dist-ckpt-optim-fully-reshardable (needs TE's FusedAdam: pip install .[gpu]).
# Batch: the paper's ~4M tokens = 2048 sequences x 2048 tokens = 4,194,304 tokens per iteration,
#   run as micro-batch 2 x DP 64 = 128 sequences per step, 16 accumulation steps.
# Budget: 100e9 tokens / 4,194,304 = 23,841 iterations (~100.0B tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_PRESET=6.7B
SEQ_LENGTH=2048
GLOBAL_BATCH_SIZE=2048
NNODES=${NNODES:-16}
TP=${TP:-2}
PP=${PP:-1}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-2}
PARALLEL_ARGS=${PARALLEL_ARGS---sequence-parallel}
source examples/pretrain_common.sh "$@"
