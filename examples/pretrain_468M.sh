#!/usr/bin/env bash
# 468M LLaMA (24 layers, hidden 1024, 16 heads, SwiGLU 4096) on 16 GPUs = 2 nodes x 8.
# Run once per node, like the paper's scripts:
#   bash examples/pretrain_468M.sh MASTER_ADDR NODE_RANK [MASTER_PORT]     # NODE_RANK 0 and 1
#   LOSS=ce bash examples/pretrain_468M.sh 10.0.0.1 0                      # the CE baseline
# Environment overrides (LOSS, GAMMA, DATA_PATH, TOKENIZER, SAVE, ...): see pretrain_common.sh.
#
# Layout: TP=1 PP=1 DP=16. 468M parameters with bf16 weights and the distributed optimizer
# (ZeRO-1, sharded over DP) take a few GB per GPU, so any model parallelism would only add
# communication; pure data parallelism is the fastest layout.
# Batch: the paper's ~1M tokens = 1024 sequences x 1024 tokens = 1,048,576 tokens per iteration,
#   run as micro-batch 8 x DP 16 = 128 sequences per step, 8 accumulation steps.
# Budget: 100e9 tokens / 1,048,576 = 95,367 iterations (~100.0B tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_PRESET=468M
SEQ_LENGTH=1024
GLOBAL_BATCH_SIZE=1024
NNODES=${NNODES:-2}
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-8}
source examples/pretrain_common.sh "$@"
