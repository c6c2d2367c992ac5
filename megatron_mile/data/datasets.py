"""Train/valid/test and per-domain validation datasets, built by megatron-core's blended builder.

megatron-core builds (and caches) the sample indices on rank 0 first while the other ranks wait,
then every rank loads them; shuffling is deterministic in ``seed``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_mile.data.blend import Blend
from megatron_mile.data.errors import DataError


class _NoCacheNotice(logging.Filter):
    """megatron-core warns once per blended dataset built without a cache path; a choice, not a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "because path_to_cache is None" not in record.getMessage()


logging.getLogger("megatron.core.datasets.blended_dataset").addFilter(_NoCacheNotice())


@dataclass
class PretrainingDatasets:
    train: Optional[object]
    valid: Optional[object]
    test: Optional[object]
    domain_valid: dict[str, object] = field(default_factory=dict)


_SPLIT_NAMES = ("train", "valid", "test")


def _check_splits_have_documents(prefixes: list[str], split_matrix: list, split: str) -> None:
    for prefix in prefixes:
        documents = len(IndexedDataset(prefix).document_indices) - 1
        for name, bounds in zip(_SPLIT_NAMES, split_matrix):
            # The same rounding megatron-core uses to cut documents into splits.
            if bounds is not None and round(bounds[1] * documents) <= round(bounds[0] * documents):
                raise DataError(f"{prefix}: the {name} split of --split {split} holds none of its {documents} "
                                f"documents; give that split a larger share or the domain more data")


def _build(tokenizer, seq_length: int, seed: int, sizes: list[int], path_to_cache: Optional[str],
           is_built_on_rank: Callable[[], bool], **blend_args) -> list[Optional[object]]:
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        path_to_cache=path_to_cache,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        **blend_args,
    )
    if config.split_matrix is not None:
        # A split nobody asked for is not built: megatron-core would otherwise build it, and a
        # requested split without documents makes GPTDataset loop forever looking for tokens.
        config.split_matrix = [bounds if size else None for bounds, size in zip(config.split_matrix, sizes)]
        _check_splits_have_documents(blend_args["blend"][0], config.split_matrix, config.split)
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank, config).build()
    return [ds if size else None for ds, size in zip(datasets, sizes)]


def build_pretraining_datasets(blend: Blend, tokenizer, seq_length: int, seed: int, train_samples: int,
                               valid_samples: int, test_samples: int, split: str = "969,30,1",
                               path_to_cache: Optional[str] = None,
                               is_built_on_rank: Optional[Callable[[], bool]] = None,
                               domain_valid_samples: Optional[int] = None) -> PretrainingDatasets:
    """Datasets of ``seq_length`` (+1) token samples; a split with 0 samples is None.

    When eval and train share prefixes, ``split`` carves the held-out documents and the eval weights
    are applied to the valid split only (train and test use the train weights). Separate eval
    prefixes are used whole for valid and test. ``domain_valid`` has one dataset per blend domain of
    ``domain_valid_samples`` (default ``valid_samples``) samples from that domain's validation data.
    Call it on every rank; pass ``is_built_on_rank`` (megatron-style, e.g. TP rank 0) when only some
    ranks need the data.
    """
    built_on = is_built_on_rank or (lambda: True)
    if not torch.distributed.is_initialized():
        # megatron-core's BlendedDataset asks torch.distributed for the rank whenever a cache path
        # is set; without a process group GPTDataset falls back to caching beside the data.
        path_to_cache = None
    common = dict(tokenizer=tokenizer, seq_length=seq_length, seed=seed, path_to_cache=path_to_cache,
                  is_built_on_rank=built_on)
    train_blend = (blend.train_prefixes, blend.train_weights)
    eval_blend = (blend.eval_prefixes, blend.eval_weights)
    shared = blend.eval_prefixes == blend.train_prefixes
    if shared and blend.eval_weights == blend.train_weights:
        train, valid, test = _build(sizes=[train_samples, valid_samples, test_samples], blend=train_blend,
                                    split=split, **common)
    elif shared:
        train, _, test = _build(sizes=[train_samples, 0, test_samples], blend=train_blend, split=split, **common)
        _, valid, _ = _build(sizes=[0, valid_samples, 0], blend=eval_blend, split=split, **common)
    else:
        train, valid, test = _build(sizes=[train_samples, valid_samples, test_samples],
                                    blend_per_split=[train_blend, eval_blend, eval_blend], **common)

    n_domain = valid_samples if domain_valid_samples is None else domain_valid_samples
    domain_valid = {}
    if n_domain:
        train_set = set(blend.train_prefixes)
        for domain, prefix in sorted(blend.domains.items()):
            if prefix in train_set:  # held-out split of training data
                args = dict(blend=([prefix], None), split=split)
            else:  # separate validation data, used whole
                args = dict(blend_per_split=[None, ([prefix], None), None])
            domain_valid[domain] = _build(sizes=[0, n_domain, 0], **args, **common)[1]
    return PretrainingDatasets(train, valid, test, domain_valid)
