#!/usr/bin/env bash
# One-GPU check and benchmark of megatron-mile, in about five minutes (300 s at most).
#
#   bash benchmarks/gpu_smoke.sh [--output-dir DIR] [--data-dir DIR] [--wheel-dir DIR] [--dry-run]
#
# Steps, each under its own time limit (they add up to 300 s); a failing step does not stop the next:
#   install      megatron-core and zstandard from the wheels in --wheel-dir into a temporary
#                folder, only when they are not installed already
#   environment  the GPU, the torch / CUDA / megatron-core versions, and a first compilation of
#                megatron-core's fused SwiGLU (torch.compile), which says whether training uses
#                the fused or the unfused activation
#   kernel tests tests/test_loss.py's single-rank cases on CUDA (fp32 and bf16 logits against
#                float64 references computed on the CPU, and a check that the loss never makes
#                the host wait for the GPU) and tests/test_multi_tensor.py's grad-norm and scaling
#                kernels (the same float64 and host-wait checks), and megatron-mile's SwiGLU and
#                RoPE against their float64 formulas
#   loss bench   benchmarks/loss_bench.py on CUDA with fp32, then bf16 logits (8192 x 32000):
#                time and peak memory of the CE, focal and MiLe losses as ratios to megatron-core's
#                cross-entropy
#   training     benchmarks/train_bench.py: the 468M preset in bf16 on one GPU, 20 iterations each
#                of Hugging Face's Llama and of megatron-mile with CE and with MiLe: tokens/s,
#                TFLOP/s and MFU
# It prints everything with each step's elapsed time, then a summary; DIR/gpu_smoke.log keeps the
# whole output and DIR/summary.md the summary (DIR: --output-dir, default runs/gpu_smoke). A step
# that reaches its limit is stopped together with every process it started. Exit status: 0 when
# every step passed, 1 when one failed, 2 when an input is missing.
#
# Needs: one NVIDIA GPU and nvidia-smi; Python 3 (PYTHON, default python3) with a CUDA build of
# torch, pytest, numpy, sentencepiece, tokenizers and transformers; megatron-core 0.16.1 and
# zstandard, installed or as wheels in --wheel-dir (default .whl; `make gpu-wheels` downloads them
# for Python 3.12); the demo data in --data-dir (default data/demo; built by
# `bash examples/prepare_demo_data.sh`). The inputs are checked before anything runs.
# --dry-run prints the steps, their commands and time limits, and runs nothing.
set -uo pipefail
PYTHON=${PYTHON:-python3}
OUTPUT_DIR=runs/gpu_smoke  # the defaults are relative to the repository, folders given as flags to
DATA_DIR=data/demo         # the current directory
WHEEL_DIR=.whl
DRY_RUN=0
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
folder() { [[ ${2:-} ]] || { echo "gpu_smoke: $1 needs a folder" >&2; exit 2; }; [[ $2 = /* ]] && echo "$2" || echo "$PWD/$2"; }
while (($#)); do
    case $1 in
        --output-dir) OUTPUT_DIR=$(folder "$@") || exit 2; shift 2 ;;
        --data-dir) DATA_DIR=$(folder "$@") || exit 2; shift 2 ;;
        --wheel-dir) WHEEL_DIR=$(folder "$@") || exit 2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_smoke: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2

export PYTHONUNBUFFERED=1
# Single-node collectives over the loopback interface: a VM's other interfaces may not route, and
# torchrun takes this address instead of resolving the machine's hostname.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
export PET_LOCAL_ADDR=${PET_LOCAL_ADDR:-127.0.0.1}
DEMO_FILES=(corpus.jsonl.zst tokenizer.model demo_text_manifest.json blend.json)
if ((DRY_RUN)); then
    WORK='<temporary folder>'
else
    WORK=$(mktemp -d) || exit 2
    trap 'rm -rf "$WORK"' EXIT
fi

# ----------------------------------------------------------------------------- the steps
NAMES=() LIMITS=() COMMANDS=()
add_step() {  # NAME LIMIT_S COMMAND...  (stored shell-quoted)
    local quoted
    printf -v quoted '%q ' "${@:3}"
    NAMES+=("$1") LIMITS+=("$2") COMMANDS+=("${quoted% }")
}
ENV_PROBE='import logging, torch, megatron.core; logging.basicConfig(level=logging.INFO, format="%(message)s"); '\
'print("torch", torch.__version__, "CUDA", torch.version.cuda, "megatron-core", megatron.core.__version__, '\
'torch.cuda.get_device_name()); from megatron_mile.model import fused_swiglu_compiles; '\
'fused_swiglu_compiles(torch.device("cuda"), torch.bfloat16)'
add_step install 20 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$WORK/site" "$WHEEL_DIR"/*.whl
add_step environment 40 "$PYTHON" -c "$ENV_PROBE"
add_step "kernel tests" 45 env MEGATRON_MILE_TEST_DEVICE=cuda "$PYTHON" -m pytest -q --tb=short -p no:cacheprovider \
    tests/test_loss.py tests/test_multi_tensor.py tests/test_swiglu.py tests/test_rope.py \
    -k "single_rank or extreme or gamma or host_sync or no_gradient or l2_norm or scale_ or float64_formula or float64_rotation"
add_step "loss bench fp32" 30 "$PYTHON" benchmarks/loss_bench.py --device cuda --rows 8192 --dtype fp32
add_step "loss bench bf16" 30 "$PYTHON" benchmarks/loss_bench.py --device cuda --rows 8192 --dtype bf16
add_step training 135 "$PYTHON" benchmarks/train_bench.py --preset 468M --bf16 --seq-length 1024 \
    --micro-batch-size 8 --global-batch-size 8 --iters 20 --log-interval 5 --rounds 1 \
    --data-dir "$DATA_DIR" --against-hf
TOTAL=0
for limit in "${LIMITS[@]}"; do TOTAL=$((TOTAL + limit)); done

if ((DRY_RUN)); then
    echo "gpu_smoke: dry run, nothing runs; output would go to $OUTPUT_DIR/gpu_smoke.log and $OUTPUT_DIR/summary.md"
    echo "environment: PYTHONUNBUFFERED=1 NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME" \
        "PET_LOCAL_ADDR=$PET_LOCAL_ADDR"
    echo "install runs only when megatron-core or zstandard is missing"
    for i in "${!NAMES[@]}"; do
        printf 'step\t%s\t%s\t%s\n' "${NAMES[$i]}" "${LIMITS[$i]}" "${COMMANDS[$i]}"
    done
    echo "total limit: $TOTAL s"
    exit 0
fi

# ----------------------------------------------------------------------------- inputs
mkdir -p "$OUTPUT_DIR" || exit 2
LOG=$OUTPUT_DIR/gpu_smoke.log
SUMMARY=$OUTPUT_DIR/summary.md
: > "$LOG"
say() { printf '%s\n' "$*" | tee -a "$LOG"; }

say "gpu_smoke: $(date -u '+%Y-%m-%d %H:%M:%S UTC')$(git rev-parse --short HEAD 2>/dev/null | sed 's/^/, commit /')"
missing=()
NEED_INSTALL=0
if ! absent=$("$PYTHON" -c 'import importlib.util as u, sys
print(*[m for m in sys.argv[1:] if u.find_spec(m.split(".")[0]) is None or u.find_spec(m) is None])' \
        megatron.core zstandard 2>&1); then
    missing+=("$PYTHON does not run (${absent##*$'\n'}): set PYTHON to a Python 3 with a CUDA build of torch")
elif [[ -n $absent ]]; then
    if compgen -G "$WHEEL_DIR/*.whl" > /dev/null; then
        NEED_INSTALL=1
    else
        missing+=("$absent not installed and no wheels in $WHEEL_DIR/: run \`make gpu-wheels\` (needs internet access) and bring $WHEEL_DIR/ along")
    fi
fi
for f in "${DEMO_FILES[@]}"; do
    if [[ ! -f $DATA_DIR/$f ]]; then
        missing+=("no demo data in $DATA_DIR/ ($f is missing): run \`bash examples/prepare_demo_data.sh $DATA_DIR\` and bring it along")
        break
    fi
done
if ! command -v nvidia-smi > /dev/null; then
    missing+=("nvidia-smi not found: this check needs an NVIDIA GPU and its driver")
elif ! gpu=$(timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1); then
    missing+=("nvidia-smi fails: $gpu")
else
    say "GPU: $gpu"
fi
if ((${#missing[@]})); then
    for m in "${missing[@]}"; do say "gpu_smoke: $m" >&2; done
    exit 2
fi

# ----------------------------------------------------------------------------- running
export PYTHONPATH=$REPO
((NEED_INSTALL)) && export PYTHONPATH=$WORK/site:$REPO

descendants() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null || cat /proc/"$1"/task/*/children 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}
stop_tree() {  # freeze the whole tree first, so that nothing escapes by forking or being re-parented
    local pids
    pids="$1 $(descendants "$1")"
    kill -STOP $pids 2>/dev/null
    pids="$pids $(for p in $pids; do descendants "$p"; done)"
    kill -KILL $pids 2>/dev/null
}
limited() {  # LIMIT_S COMMAND...: the command's exit status, or 124 once its tree is stopped at the limit
    local limit=$1
    shift
    "$@" &
    local pid=$! deadline=$((SECONDS + limit))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            printf '\n### time limit of %s s reached: stopping every process of this step\n' "$limit"
            stop_tree "$pid"
            wait "$pid" 2>/dev/null
            return 124
        fi
        sleep 0.2
    done
    wait "$pid"
}

RESULTS=() SPENT=()
for i in "${!NAMES[@]}"; do
    name=${NAMES[$i]} limit=${LIMITS[$i]}
    if [[ $name == install ]] && ((!NEED_INSTALL)); then
        RESULTS+=("not needed") SPENT+=(0)
        continue
    fi
    eval "cmd=(${COMMANDS[$i]})"
    say ""
    say "### $name (limit $limit s): ${cmd[*]}"
    start=$(date +%s%N)
    limited "$limit" "${cmd[@]}" 2>&1 | tee -a "$LOG" "$WORK/${name// /_}.out"
    rc=${PIPESTATUS[0]}
    tenths=$((($(date +%s%N) - start) / 100000000))
    seconds=$((tenths / 10)).$((tenths % 10))
    case $rc in
        0) result=ok ;;
        124) result="TIME LIMIT" ;;
        *) result="FAILED (exit $rc)" ;;
    esac
    RESULTS+=("$result") SPENT+=("$seconds")
    say "### $name: $result after $seconds s"
done

# ----------------------------------------------------------------------------- summary
lines() {  # STEP_NAME REGEX: the matching lines of that step's output
    grep -h -E "$2" "$WORK/${1// /_}.out" 2>/dev/null
}
{
    echo "## gpu_smoke summary"
    echo
    echo "GPU: $gpu"
    lines environment '^torch |SwiGLU: '
    echo
    echo "| step | result | seconds | limit s |"
    echo "|---|---|---|---|"
    for i in "${!NAMES[@]}"; do
        echo "| ${NAMES[$i]} | ${RESULTS[$i]} | ${SPENT[$i]} | ${LIMITS[$i]} |"
    done
    echo
    echo "kernel tests: $(lines 'kernel tests' '^[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s' | tail -1)"
    for dtype in fp32 bf16; do
        echo
        lines "loss bench $dtype" '^[0-9]+ x [0-9]+ |^\| |^TP=1: '
    done
    echo
    lines training '^(device|config): |^\||SwiGLU: '
} > "$WORK/summary.md"
cp "$WORK/summary.md" "$SUMMARY.tmp" && mv "$SUMMARY.tmp" "$SUMMARY"
say ""
tee -a "$LOG" < "$SUMMARY"
for result in "${RESULTS[@]}"; do
    [[ $result == ok || $result == "not needed" ]] || exit 1
done
