"""Data pipeline: tokenizers, preprocessed-dataset blends and megatron-core pretraining datasets.

Exports resolve lazily, so tools that only stream JSONL (e.g. tools/train_tokenizer.py) start
without importing megatron-core.
"""

import importlib

_EXPORTS = {
    "Blend": "megatron_mile.data.blend",
    "load_blend": "megatron_mile.data.blend",
    "PretrainingDatasets": "megatron_mile.data.datasets",
    "build_pretraining_datasets": "megatron_mile.data.datasets",
    "build_tokenizer": "megatron_mile.data.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
