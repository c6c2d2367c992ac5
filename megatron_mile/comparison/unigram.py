"""The unigram model's validation cross-entropy: the number a language model must get below.

A model that has only learnt token frequencies predicts every position with the training
distribution. Its probabilities come from the training counts of the frequency analysis
(``megatron-mile-buckets`` counts them and caches them beside the data), smoothed with one
extra occurrence of every token per dataset and mixed with the blend's training weights:

    p(t) = Σ_d w_d (c_d(t) + 1) / (N_d + V)

Its cross-entropy on a validation set is ``-Σ_t n(t) log p(t) / Σ_t n(t)`` over the counts
``n`` of that set's tokens: per domain, the domain's validation split (all of it), and for
the blend, the domains' values weighted like the trainer's blended validation set.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from megatron_mile.evaluation import frequency
from megatron_mile.evaluation.bucket_analysis import training_counts


def cross_entropy(log_p: np.ndarray, counts: np.ndarray) -> float:
    """Mean of ``-log p`` over tokens occurring ``counts`` times (float64)."""
    counts = np.asarray(counts, dtype=np.float64)
    return float(-(counts * log_p).sum() / counts.sum())


def unigram_log_probs(train_counts: np.ndarray, weights: Optional[Sequence[float]]) -> np.ndarray:
    """``log p(t)`` of the add-one unigram model of ``train_counts`` ``[datasets, V]``, mixed by ``weights``."""
    return np.log(frequency.blend_frequencies(np.asarray(train_counts, dtype=np.float64) + 1.0, weights))


def validation_cross_entropy(data_path: str | Sequence[str], tokenizer_model: str, split: str,
                             counts_cache_dir: Optional[str] = None) -> dict[str, float]:
    """``{"valid_logppl": blend, "valid_logppl/<domain>": ...}`` of the unigram model."""
    from megatron_mile.data import build_tokenizer, load_blend

    blend = load_blend(data_path)
    vocab_size = build_tokenizer(tokenizer_model).vocab_size
    training = set(blend.train_prefixes)
    shared = blend.eval_prefixes == blend.train_prefixes  # as the trainer's datasets decide
    train_spans = [frequency.dataset_span(p, frequency.split_bounds(split, 0) if shared else (0.0, 1.0))
                   for p in blend.train_prefixes]
    log_p = unigram_log_probs(training_counts(train_spans, vocab_size, frequency.file_digest(tokenizer_model),
                                              counts_cache_dir), blend.train_weights)

    def valid_counts(prefix: str) -> np.ndarray:
        # A dataset that also feeds training is held out by the split; separate eval data is used whole.
        span = frequency.dataset_span(prefix, frequency.split_bounds(split, 1) if prefix in training else (0.0, 1.0))
        return frequency.count_range(prefix + ".bin", span.dtype, span.first_token, span.end_token,
                                     vocab_size)[:vocab_size]

    prefixes = dict.fromkeys(blend.eval_prefixes + list(blend.domains.values()))
    counts = {prefix: valid_counts(prefix) for prefix in prefixes}
    weights = blend.eval_weights or [float(counts[p].sum()) for p in blend.eval_prefixes]  # None: by size
    result = {"valid_logppl": float(np.average([cross_entropy(log_p, counts[p]) for p in blend.eval_prefixes],
                                               weights=weights))}
    result.update({f"valid_logppl/{domain}": cross_entropy(log_p, counts[prefix])
                   for domain, prefix in sorted(blend.domains.items())})
    return result
