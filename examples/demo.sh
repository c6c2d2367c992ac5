#!/usr/bin/env bash
# What `make demo` runs: the paper's comparison end to end on a 2-core CPU. Three `tiny` models
# (CE, focal and MiLe, gamma 1) trained with the same seed, data and tokens, two at TP=2 and focal
# at PP=2, each on 2 gloo ranks; then each is converted to Hugging Face, scored by lm-eval on a
# held-out next-line task and by the frequency-bucket analysis, and compared in one table
# (runs/demo/comparison.md) and one picture (runs/demo/compare.png).
# A rerun reuses every finished step; an interrupted one resumes where it stopped.
#
#   bash examples/demo.sh          # PYTHON=.venv/bin/python to pick the interpreter
set -euo pipefail
SEEDS=1234 LAYOUT="tp focal=pp" NPROC=2 OUT=${OUT:-runs/demo} exec bash "$(dirname "$0")/compare_losses.sh"
