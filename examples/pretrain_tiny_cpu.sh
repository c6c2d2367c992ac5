#!/usr/bin/env bash
# The whole pipeline on a laptop-class CPU in a few minutes (what `make demo` runs):
# demo corpus + tokenizer + per-domain datasets, then MiLe pretraining of the `tiny` preset
# on 2 gloo ranks with tensor parallelism 2, periodic per-domain evaluation, checkpoints,
# and a PNG of the curves. Output: runs/tiny_cpu. A rerun replaces the previous demo run
# there (the trainer's --overwrite: its checkpoints, metrics and TensorBoard events); RESUME=1
# continues it from its last checkpoint instead (e.g. after Ctrl-C).
#
#   bash examples/pretrain_tiny_cpu.sh            # PYTHON=.venv/bin/python to pick the interpreter
#   LAYOUT=pp bash examples/pretrain_tiny_cpu.sh  # pipeline parallelism 2 instead of TP=2
#   TRAIN_ITERS=20 bash examples/pretrain_tiny_cpu.sh   # a shorter run (warm-up: a tenth of it)
set -euo pipefail
PYTHON=${PYTHON:-python}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
_fail() { echo "pretrain_tiny_cpu.sh: error: $*" >&2; exit 2; }

DATA_DIR=${DATA_DIR:-data/demo}
RUN_DIR=${RUN_DIR:-runs/tiny_cpu}
MASTER_PORT=${MASTER_PORT:-29517}
LOSS=${LOSS:-mile}
GAMMA=${GAMMA:-1.0}
TRAIN_ITERS=${TRAIN_ITERS:-300}
[[ $TRAIN_ITERS =~ ^[1-9][0-9]*$ ]] || _fail "TRAIN_ITERS must be a positive integer, got '$TRAIN_ITERS'"
case "${LAYOUT:-tp}" in
    tp) PARALLEL=(--tensor-model-parallel-size 2) ;;
    pp) PARALLEL=(--pipeline-model-parallel-size 2) ;;
    *) _fail "LAYOUT must be tp or pp, got '${LAYOUT}'" ;;
esac
case "${RESUME:-0}" in
    0) START=(--overwrite) ;;
    1) START=(--load "$RUN_DIR") ;;
    *) _fail "RESUME must be 0 or 1, got '${RESUME}'" ;;
esac

start=$(date +%s)
# The last two lines of the prep script are the blend JSON and the tokenizer model.
PREP=$(PYTHON="$PYTHON" bash examples/prepare_demo_data.sh "$DATA_DIR")
BLEND=$(echo "$PREP" | tail -n 2 | head -n 1)
TOKENIZER=$(echo "$PREP" | tail -n 1)

# One intra-op thread per rank: 2 ranks on 2 cores.
export OMP_NUM_THREADS=1
# 300 iterations × 16 sequences × 128 tokens ≈ 0.6M tokens; a higher lr than the paper's 3e-4
# (and a warm-up of a tenth of the run) so a model this small visibly learns in that budget.
# megatron_mile.launch is torchrun that checks the configuration before starting the workers.
"$PYTHON" -m megatron_mile.launch --nproc-per-node 2 --master-addr 127.0.0.1 --master-port "$MASTER_PORT" \
    -m megatron_mile.train \
    --model-preset tiny "${PARALLEL[@]}" \
    --data-path "$BLEND" --tokenizer-model "$TOKENIZER" \
    --loss "$LOSS" --mile-gamma "$GAMMA" \
    --micro-batch-size 4 --global-batch-size 16 \
    --train-iters "$TRAIN_ITERS" --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters $(( TRAIN_ITERS / 10 )) \
    --log-interval $(( TRAIN_ITERS < 10 ? TRAIN_ITERS : 10 )) --eval-interval 50 --eval-iters 2 \
    --save "$RUN_DIR" "${START[@]}" --save-interval 100

PNG=$("$PYTHON" tools/plot_logs.py "$RUN_DIR" --output "$RUN_DIR/curves.png")
echo "demo finished in $(( $(date +%s) - start )) s"
echo "checkpoints and metrics: $RUN_DIR (metrics.jsonl, tensorboard/)"
echo "curves: $PNG"
