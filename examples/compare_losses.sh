#!/usr/bin/env bash
# A small-scale reproduction of the paper's comparison: every loss x seed trained on the same data,
# seed-paired, with the same budget, then evaluated (lm-eval on a held-out next-line task, and the
# frequency-bucket analysis) and reported as mean ± sample std over seeds, with MiLe − CE.
# All of it is megatron-mile-compare; this script picks the settings. Rerunning it reuses every
# finished step and resumes an interrupted run.
#
#   bash examples/compare_losses.sh                                  # CPU: tiny preset on the demo data
#   PRESET=468M DATA=data/pile/blend.json TOKENIZER=data/pile/tokenizer.model \
#       bash examples/compare_losses.sh                              # GPUs: every visible GPU per run
#
# Environment (all optional):
#   LOSSES   (ce focal mile)         SEEDS (1234 1235 1236)        GAMMA (1.0, focal's and MiLe's)
#   PRESET   (tiny)                  ITERS (tiny: 300, else 2000)  per run, same for every run
#   LAYOUT   (CPU: tp, GPU: dp)      tp, pp or dp over NPROC processes; "tp focal=pp" sets one loss's
#   NPROC    (GPUs if any, else 2)   processes per run
#   DATA, TOKENIZER                  blend JSON and tokenizer (tiny: the demo data, built if missing;
#                                    else data/pile/blend.json, data/pile/tokenizer.model)
#   OUT      (runs/compare_<preset>_<iters>)
#   EXTRA_ARGS    more trainer flags         COMPARE_ARGS   more megatron-mile-compare flags
#                                            (e.g. "--tasks paper" for the paper's lm-eval suite)
#   PYTHON   (python)
set -euo pipefail
PYTHON=${PYTHON:-python}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
_fail() { echo "compare_losses.sh: error: $*" >&2; exit 2; }

LOSSES=${LOSSES:-ce focal mile}
SEEDS=${SEEDS:-1234 1235 1236}
GAMMA=${GAMMA:-1.0}
PRESET=${PRESET:-tiny}
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -gt 0 ]; then NPROC=${NPROC:-$GPUS}; LAYOUT=${LAYOUT:-dp}; else NPROC=${NPROC:-2}; LAYOUT=${LAYOUT:-tp}; fi

if [ "$PRESET" = tiny ]; then
    # 300 x 16 x 128 ≈ 0.6M tokens per run; a higher lr than the paper's 3e-4 (and a short
    # warm-up) so a model this small gets well past the unigram model in that budget.
    ITERS=${ITERS:-300}
    TRAIN=(--micro-batch-size 4 --global-batch-size 16 --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 30
           --eval-interval 50 --eval-iters 2 --save-interval 100)
else
    # The paper's recipe (peak lr 3e-4 cosine to 3e-5, bf16 on GPUs) at 64 x the preset's sequence
    # length per iteration, with a tenth of the run as warm-up.
    ITERS=${ITERS:-2000}
    [[ $ITERS =~ ^[0-9]+$ ]] && (( ITERS >= 10 && ITERS % 10 == 0 )) || \
        _fail "ITERS must be a multiple of 10, got '$ITERS'"
    TRAIN=(--micro-batch-size 8 --global-batch-size 64 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters $(( ITERS / 10 ))
           --eval-interval $(( ITERS / 10 )) --eval-iters 10 --save-interval $(( ITERS / 4 )))
    [ "$GPUS" -gt 0 ] && TRAIN+=(--bf16)
fi
OUT=${OUT:-runs/compare_${PRESET}_${ITERS}}

start=$(date +%s)
if [ -z "${DATA:-}" ] && [ "$PRESET" = tiny ]; then
    echo "[data] demo corpus, tokenizer and datasets in data/demo (built once)"
    # The last two lines of the prep script are the blend JSON and the tokenizer model.
    PREP=$(PYTHON="$PYTHON" bash examples/prepare_demo_data.sh data/demo)
    DATA=$(echo "$PREP" | tail -n 2 | head -n 1)
    TOKENIZER=$(echo "$PREP" | tail -n 1)
    echo "[data] done in $(( $(date +%s) - start )) s"
fi
DATA=${DATA:-data/pile/blend.json}
TOKENIZER=${TOKENIZER:-data/pile/tokenizer.model}

# One intra-op thread per process (torchrun's default for its ranks, and for the evaluation here):
# with more threads than free cores torch slows down badly (a tiny model's forward pass ran 9x
# slower with 2 threads than with 1 on a busy 2-core machine).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# shellcheck disable=SC2086  # LOSSES, SEEDS, LAYOUT and the *_ARGS are word lists
"$PYTHON" -m megatron_mile.compare --data-path "$DATA" --tokenizer-model "$TOKENIZER" --output-dir "$OUT" \
    --losses $LOSSES --seeds $SEEDS --gamma "$GAMMA" --nproc-per-node "$NPROC" --layout $LAYOUT ${COMPARE_ARGS:-} \
    -- --model-preset "$PRESET" --train-iters "$ITERS" --log-interval 10 "${TRAIN[@]}" ${EXTRA_ARGS:-}
echo "compare_losses.sh finished in $(( $(date +%s) - start )) s"
