#!/usr/bin/env bash
# The GPU checks, in one script for one call on a lent GPU (the device image has Python 3.12
# and torch but no megatron-core). Prepare on the CPU machine first:
#
#   make gpu-wheels                          # megatron-core 0.16.1 + zstandard cp312 wheels -> .whl/
#   bash examples/prepare_demo_data.sh       # the demo corpus and tokenizer -> data/demo/
#
# then run `bash benchmarks/gpu_session.sh` there, carrying `.whl` and `data/demo`.
# It prints, in order: the card; the loss tests on CUDA (fp32 and bf16 logits against the
# CPU float64 reference); the loss benchmark on CUDA in fp32 and bf16; the training benchmark
# of the 468M preset on one GPU in bf16 (tokens/s and MFU, MiLe against CE).
# Each step has its own time limit (540 s in all, under the 600 s a device call allows), and a
# failing step does not stop the later ones.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONWARNINGS=ignore
status=0
step() {
    local limit=$1; shift
    echo; echo "### $*"
    timeout "$limit" "$@" || { echo "### exit $? from: $*"; status=1; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PYTHON" -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)'
MEGATRON_MILE_TEST_DEVICE=cuda step 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_loss.py \
    -k "single_rank or extreme or gamma"
step 90 "$PYTHON" benchmarks/loss_bench.py --device cuda --rows 16384 --dtype fp32
step 90 "$PYTHON" benchmarks/loss_bench.py --device cuda --rows 16384 --dtype bf16
step 240 "$PYTHON" benchmarks/train_bench.py --preset 468M --bf16 --seq-length 1024 --micro-batch-size 8 \
    --global-batch-size 8 --iters 30 --rounds 1 --data-dir data/demo
exit $status
