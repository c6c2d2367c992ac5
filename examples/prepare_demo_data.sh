#!/usr/bin/env bash
# Build the demo data end to end into $1 (default data/demo): a Pile-format corpus made from the
# Python installation, a 4096-piece SentencePiece BPE tokenizer, per-domain megatron-core datasets
# and a blend JSON. Deterministic; each step is skipped when its output already exists.
# Prints the blend JSON path and the tokenizer model path (last two lines).
set -euo pipefail
PYTHON=${PYTHON:-python}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT=${1:-data/demo}
mkdir -p "$OUT"

CORPUS="$OUT/corpus.jsonl.zst"
TOKENIZER="$OUT/tokenizer"
PREFIX="$OUT/demo"
MANIFEST="${PREFIX}_text_manifest.json"
BLEND="$OUT/blend.json"

[ -f "$CORPUS" ] || "$PYTHON" "$ROOT/tools/make_demo_corpus.py" --output "$CORPUS" >&2
[ -f "$TOKENIZER.model" ] || "$PYTHON" "$ROOT/tools/train_tokenizer.py" \
    --input "$CORPUS" --model-prefix "$TOKENIZER" --vocab-size 4096 --threads 2 >&2
[ -f "$MANIFEST" ] || "$PYTHON" "$ROOT/tools/preprocess_data.py" \
    --input "$CORPUS" --output-prefix "$PREFIX" --tokenizer-model "$TOKENIZER.model" \
    --split-by-domain meta.pile_set_name --append-eod --workers 2 --quiet >&2
[ -f "$BLEND" ] || "$PYTHON" "$ROOT/tools/make_blend.py" \
    --manifest "$MANIFEST" --weights demo --output "$BLEND" >&2

echo "$BLEND"
echo "$TOKENIZER.model"
