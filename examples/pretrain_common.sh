# Shared body of examples/pretrain_{468M,1.2B,6.7B}.sh: sourced, never run directly.
#
# The size script sets MODEL_PRESET, SEQ_LENGTH, GLOBAL_BATCH_SIZE, and the defaults of
# NNODES, TP, PP, MICRO_BATCH_SIZE (and optionally PARALLEL_ARGS), then sources this file
# with its own positional arguments:  MASTER_ADDR NODE_RANK [MASTER_PORT]
#
# Environment (all optional):
#   LOSS=ce|focal|mile (default mile)   GAMMA=1.0 (MiLe's and focal's gamma)
#   DATA_PATH   blend JSON or Megatron-LM "[weight] prefix ..." list (default data/pile/blend.json)
#   TOKENIZER   SentencePiece .model or HF tokenizer dir (default data/pile/tokenizer.model)
#   SAVE        checkpoints, metrics.jsonl, tensorboard/, logs/ (default runs/<preset>_<loss>_gamma<gamma>);
#               on a filesystem every node sees; a rerun resumes from its latest checkpoint (--save and
#               --load are both SAVE, which also works on the first run)
#   EXIT_SIGNAL (SIGTERM)   on it, every rank finishes its iteration, saves and exits 0 (preemption;
#               Megatron-LM's --exit-signal-handler); SIGUSR1/SIGUSR2 for `sbatch --signal=USR1@SECONDS`
#   EXIT_DURATION_IN_MINS   save and exit this many minutes after the start (below the job's time limit)
#   SHUTDOWN_TIMEOUT (600)  seconds torchrun waits for the workers after forwarding a signal (torch >= 2.12;
#               older torch waits 30 s), so that a preempted run can finish its checkpoint
#   TOKEN_BUDGET (default 100e9: the paper's ~100B tokens)   TRAIN_ITERS (default: from the budget)
#   NNODES, GPUS_PER_NODE (8), TP, PP, MICRO_BATCH_SIZE: override the layout
#   EVAL_INTERVAL (1000), EVAL_ITERS (2), SAVE_INTERVAL (1000), LOG_INTERVAL (10)
#   WANDB_PROJECT   also log to wandb     EXTRA_ARGS   more trainer flags, e.g. "--recompute-activations"
#   PYTHON (python)   DRY_RUN=1   check the trainer's configuration and print the command instead of running it
#
# The command is torchrun's, through `python -m megatron_mile.launch` (same arguments), which checks
# the trainer's configuration before any worker starts and leaves the trainer's one-line errors and
# Ctrl-C without torchrun's tracebacks.

_usage="usage: bash $(basename "$0") MASTER_ADDR NODE_RANK [MASTER_PORT]"
_fail() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

[ $# -ge 2 ] && [ $# -le 3 ] || _fail "expected 2 or 3 arguments; $_usage"
MASTER_ADDR=$1
NODE_RANK=$2
MASTER_PORT=${3:-29500}

PYTHON=${PYTHON:-python}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
LOSS=${LOSS:-mile}
GAMMA=${GAMMA:-1.0}
DATA_PATH=${DATA_PATH:-data/pile/blend.json}
TOKENIZER=${TOKENIZER:-data/pile/tokenizer.model}
SAVE=${SAVE:-runs/${MODEL_PRESET}_${LOSS}_gamma${GAMMA}}
TOKEN_BUDGET=${TOKEN_BUDGET:-100000000000}
EVAL_INTERVAL=${EVAL_INTERVAL:-1000}
EVAL_ITERS=${EVAL_ITERS:-2}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
LOG_INTERVAL=${LOG_INTERVAL:-10}
EXIT_SIGNAL=${EXIT_SIGNAL:-SIGTERM}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-600}

for _name in NODE_RANK MASTER_PORT NNODES GPUS_PER_NODE TP PP MICRO_BATCH_SIZE GLOBAL_BATCH_SIZE SEQ_LENGTH \
             TOKEN_BUDGET EVAL_INTERVAL EVAL_ITERS SAVE_INTERVAL LOG_INTERVAL SHUTDOWN_TIMEOUT; do
    [[ ${!_name} =~ ^[0-9]+$ ]] || _fail "$_name must be a non-negative integer, got '${!_name}'"
done
case "$LOSS" in ce|focal|mile) ;; *) _fail "LOSS must be ce, focal or mile, got '$LOSS'" ;; esac
case "$EXIT_SIGNAL" in
    SIGTERM|SIGINT) ;;
    # torchrun forwards neither, and would die of it: the workers get it straight from Slurm
    # (`sbatch --signal=USR1@600`), and this script, torchrun and tee ignore it.
    SIGUSR1|SIGUSR2) trap '' "${EXIT_SIGNAL#SIG}" ;;
    *) _fail "EXIT_SIGNAL must be SIGTERM, SIGINT, SIGUSR1 or SIGUSR2, got '$EXIT_SIGNAL'" ;;
esac
[ "$NODE_RANK" -lt "$NNODES" ] || _fail "NODE_RANK $NODE_RANK must be below NNODES $NNODES; $_usage"

WORLD_SIZE=$(( NNODES * GPUS_PER_NODE ))
(( WORLD_SIZE % (TP * PP) == 0 )) || _fail "$WORLD_SIZE GPUs are not divisible by TP $TP x PP $PP"
DP=$(( WORLD_SIZE / (TP * PP) ))
(( GLOBAL_BATCH_SIZE % (MICRO_BATCH_SIZE * DP) == 0 )) || \
    _fail "GLOBAL_BATCH_SIZE $GLOBAL_BATCH_SIZE is not divisible by MICRO_BATCH_SIZE $MICRO_BATCH_SIZE x DP $DP"
# Iterations from the token budget: budget / (global batch x sequence length), rounded down.
TOKENS_PER_ITER=$(( GLOBAL_BATCH_SIZE * SEQ_LENGTH ))
TRAIN_ITERS=${TRAIN_ITERS:-$(( TOKEN_BUDGET / TOKENS_PER_ITER ))}
[[ $TRAIN_ITERS =~ ^[0-9]+$ ]] && (( TRAIN_ITERS > 2000 )) || \
    _fail "TRAIN_ITERS must exceed the 2000 warm-up iterations, got '$TRAIN_ITERS'"

LAUNCH=("$PYTHON" -m megatron_mile.launch
    --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
TRAIN_ARGS=(-m megatron_mile.train
    --model-preset "$MODEL_PRESET" --seq-length "$SEQ_LENGTH"
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" ${PARALLEL_ARGS:-}
    --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE" --train-iters "$TRAIN_ITERS"
    # The paper's recipe: Adam (0.9, 0.95), wd 0.1, peak lr 3e-4, cosine with 2000 warm-up steps, clip 1.0, bf16.
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000
    --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 --bf16
    --loss "$LOSS" --mile-gamma "$GAMMA"
    --data-path "$DATA_PATH" --tokenizer-model "$TOKENIZER"
    --save "$SAVE" --load "$SAVE" --save-interval "$SAVE_INTERVAL"
    --exit-signal-handler --exit-signal "$EXIT_SIGNAL"
    ${EXIT_DURATION_IN_MINS:+--exit-duration-in-mins "$EXIT_DURATION_IN_MINS"}
    --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" --log-interval "$LOG_INTERVAL"
    ${WANDB_PROJECT:+--wandb-project "$WANDB_PROJECT" --wandb-exp-name "$(basename "$SAVE")"}
    ${EXTRA_ARGS:-})

# The trainer's own checks at this world size (a real launch makes them in megatron_mile.launch).
[ -z "${DRY_RUN:-}" ] || \
    WORLD_SIZE=$WORLD_SIZE "$PYTHON" -m megatron_mile.train --check-config "${TRAIN_ARGS[@]:2}" >&2
echo "$MODEL_PRESET: $WORLD_SIZE GPUs = TP $TP x PP $PP x DP $DP | global batch $GLOBAL_BATCH_SIZE x $SEQ_LENGTH" \
     "= $TOKENS_PER_ITER tokens | $TRAIN_ITERS iterations = $(( TRAIN_ITERS * TOKENS_PER_ITER )) tokens" \
     "| loss $LOSS gamma $GAMMA | node $NODE_RANK/$NNODES -> $SAVE" >&2
if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${LAUNCH[@]}" "${TRAIN_ARGS[@]}"
    echo
    exit 0
fi

# megatron-core overlaps TP/SP communication with compute only with one CUDA work queue.
export CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT
mkdir -p "$SAVE/logs"
# Ctrl-C, and Slurm's SIGTERM (preemption, time limit), reach every process here. torchrun forwards
# them to the workers, which stop (and, with --exit-signal-handler, save) before they exit; this
# script waits for torchrun rather than dying first, and tee keeps the log open to the last line.
trap ':' INT TERM
"${LAUNCH[@]}" "${TRAIN_ARGS[@]}" 2>&1 | (trap '' INT TERM; exec tee -a "$SAVE/logs/node${NODE_RANK}.log")
