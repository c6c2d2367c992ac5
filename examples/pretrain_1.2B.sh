#!/usr/bin/env bash
# 1.2B LLaMA (16 layers, hidden 2048, 8 heads, SwiGLU 8192) on 32 GPUs = 4 nodes x 8.
# Run once per node, like the paper's scripts:
#   bash examples/pretrain_1.2B.sh MASTER_ADDR NODE_RANK [MASTER_PORT]     # NODE_RANK 0..3
# Environment overrides (LOSS, GAMMA, DATA_PATH, TOKENIZER, SAVE, ...): see pretrain_common.sh.
#
# Layout: TP=1 PP=1 DP=32. bf16 weights + fp32 grads are ~7 GB and the distributed optimizer
# shards the fp32 Adam state (~14 GB in all) over 32 ranks, so an 80 GB GPU holds a full replica
# with room for micro-batch 8 at 1024 tokens. 40 GB cards hold it too (megatron-mile-plan: 18 GiB
# per GPU with TE's flash attention, 24 GiB without TE); TP=2 would only add communication.
# Batch: the paper's ~1M tokens = 1024 sequences x 1024 tokens = 1,048,576 tokens per iteration,
#   run as micro-batch 8 x DP 32 = 256 sequences per step, 4 accumulation steps.
# Budget: 100e9 tokens / 1,048,576 = 95,367 iterations (~100.0B tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_PRESET=1.2B
SEQ_LENGTH=1024
GLOBAL_BATCH_SIZE=1024
NNODES=${NNODES:-4}
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-8}
source examples/pretrain_common.sh "$@"
