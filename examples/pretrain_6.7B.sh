#!/usr/bin/env bash
# 6.7B LLaMA (32 layers, hidden 4096, 32 heads, SwiGLU 11008) on 128 GPUs = 16 nodes x 8.
# Run once per node, like the paper's scripts:
#   bash examples/pretrain_6.7B.sh MASTER_ADDR NODE_RANK [MASTER_PORT]     # NODE_RANK 0..15
# Environment overrides (LOSS, GAMMA, DATA_PATH, TOKENIZER, SAVE, ...): see pretrain_common.sh.
#
# Layout: TP=2 PP=1 DP=64, with sequence parallelism and the distributed optimizer.
#   A full replica (13 GB bf16 weights + grads, plus activations at 2048 tokens) is too tight on
#   one GPU; TP=2 halves weights, grads and (with --sequence-parallel) activations, and its
#   all-reduces stay inside a node on NVLink. The fp32 Adam state (~80 GB in all) is sharded over
#   the 64 DP ranks. TP=2 keeps DP large, which beats deeper TP (smaller, less efficient GEMMs)
#   and PP (a pipeline bubble). On 40 GB cards use PP=2 (DP=32, 32 micro-batches per step, a
#   ~3% bubble) or EXTRA_ARGS=--recompute-activations. PARALLEL_ARGS= turns sequence
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
