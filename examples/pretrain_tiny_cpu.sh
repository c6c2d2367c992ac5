#!/usr/bin/env bash
# The whole pipeline on a laptop-class CPU in a few minutes (what `make demo` runs):
# demo corpus + tokenizer + per-domain datasets, then MiLe pretraining of the `tiny` preset
# on 2 gloo ranks with tensor parallelism 2, periodic per-domain evaluation, checkpoints,
# and a PNG of the curves. Output: runs/tiny_cpu (replaced on every run).
#
#   bash examples/pretrain_tiny_cpu.sh            # PYTHON=.venv/bin/python to pick the interpreter
#   LAYOUT=pp bash examples/pretrain_tiny_cpu.sh  # pipeline parallelism 2 instead of TP=2
set -euo pipefail
PYTHON=${PYTHON:-python}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

DATA_DIR=${DATA_DIR:-data/demo}
RUN_DIR=${RUN_DIR:-runs/tiny_cpu}
MASTER_PORT=${MASTER_PORT:-29517}
LOSS=${LOSS:-mile}
GAMMA=${GAMMA:-1.0}
TRAIN_ITERS=${TRAIN_ITERS:-300}
case "${LAYOUT:-tp}" in
    tp) PARALLEL=(--tensor-model-parallel-size 2) ;;
    pp) PARALLEL=(--pipeline-model-parallel-size 2) ;;
    *) echo "pretrain_tiny_cpu.sh: LAYOUT must be tp or pp, got '${LAYOUT}'" >&2; exit 2 ;;
esac

start=$(date +%s)
# The last two lines of the prep script are the blend JSON and the tokenizer model.
PREP=$(PYTHON="$PYTHON" bash examples/prepare_demo_data.sh "$DATA_DIR")
BLEND=$(echo "$PREP" | tail -n 2 | head -n 1)
TOKENIZER=$(echo "$PREP" | tail -n 1)

rm -rf "$RUN_DIR"
# One intra-op thread per rank: 2 ranks on 2 cores. Apex/TE "not installed" warnings are noise on CPU.
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
# 300 iterations × 16 sequences × 128 tokens ≈ 0.6M tokens; a higher lr than the paper's 3e-4
# (and a short warm-up) so a model this small visibly learns in that budget.
"$PYTHON" -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 --master-port "$MASTER_PORT" \
    -m megatron_mile.train \
    --model-preset tiny "${PARALLEL[@]}" \
    --data-path "$BLEND" --tokenizer-model "$TOKENIZER" \
    --loss "$LOSS" --mile-gamma "$GAMMA" \
    --micro-batch-size 4 --global-batch-size 16 \
    --train-iters "$TRAIN_ITERS" --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 30 \
    --log-interval 10 --eval-interval 50 --eval-iters 2 \
    --save "$RUN_DIR" --save-interval 100

PNG=$("$PYTHON" tools/plot_logs.py "$RUN_DIR" --output "$RUN_DIR/curves.png")
echo "demo finished in $(( $(date +%s) - start )) s"
echo "checkpoints and metrics: $RUN_DIR (metrics.jsonl, tensorboard/)"
echo "curves: $PNG"
