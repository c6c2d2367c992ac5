"""Data pipeline: tokenizers, preprocessed-dataset blends and megatron-core pretraining datasets."""

from megatron_mile.data.blend import Blend, load_blend
from megatron_mile.data.datasets import PretrainingDatasets, build_pretraining_datasets
from megatron_mile.data.tokenizer import build_tokenizer

__all__ = ["Blend", "PretrainingDatasets", "build_pretraining_datasets", "build_tokenizer", "load_blend"]
