"""The token-frequency-bucket analysis: training counts → vocabulary buckets → per-bucket scores per model.

``analyze_buckets(models, data_path, tokenizer_model, ...)`` returns the content of ``buckets.json``::

    {"buckets": {"high": {"ids": n, "share": s}, "medium": ..., "low": ..., "unseen": ...},
     "runs": {label: {"overall": {"ppl": x, "tokens": n},
                      "high": {"ppl": x, "tokens": n, "entropy": h}, "medium": ..., "low": ..., "unseen": ...,
                      "domains": {domain: {...the same...}}}}}

Steps, in this order, so bad input fails in one line before any work:

1. check every input: the models (``sources.resolve_sources``; a run's saved args, vocabulary and
   layout; an HF directory's config and tokenizer), the blend, the tokenizer against the data (the
   first ids of every dataset) and the layout;
2. count the training tokens (``frequency``; cached beside the data, shared over the ranks of a
   torchrun job) and bucket the vocabulary;
3. build the validation sets exactly as the trainer does (``build_pretraining_datasets``: the
   blended ``valid`` set for ``overall`` and ``domain_valid`` per domain) and score every model on
   their first samples (``token_scoring``).

Sample counts: ``--max-tokens // seq_length`` samples per validation set, but no more than one pass
over the validation split (the blend: all its datasets' splits together; the domains: the smallest
domain's split, so every domain is scored on the same number of tokens).

The settings a run was trained with are the defaults: ``split`` (the counts must be of what the
model saw, so a run trained with another split is refused), ``seed`` (the validation samples'
order) and ``seq_length``. Without runs, the trainer's defaults apply and the sequence length is the
first HF model's ``max_position_embeddings``.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from megatron_mile.evaluation import frequency
from megatron_mile.evaluation.sources import RUN, Source, SourceError, resolve_sources

DEFAULT_CUTOFFS = (0.80, 0.95)
DEFAULT_MAX_TOKENS = 1 << 20
DEFAULT_MICRO_BATCH_SIZE = 4


class BucketsError(ValueError):
    """Bad input for the analysis; the message is one line naming the file, model or setting."""


@dataclass(frozen=True)
class _Model:
    source: Source
    max_seq_length: int
    run_args: Optional[dict] = None  # RUN: the trainer's saved arguments


def _trainer_default(name: str) -> Any:
    from megatron_mile.arguments import build_parser

    return build_parser().get_default(name)


# --------------------------------------------------------------------------- checks


def _check_positive(**values: Optional[int]) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise BucketsError(f"--{name.replace('_', '-')} must be positive, got {value}")


def check_cutoffs(cutoffs: Sequence[float]) -> tuple[float, float]:
    if len(cutoffs) != 2 or not 0.0 < cutoffs[0] < cutoffs[1] < 1.0:
        raise BucketsError(f"--cutoffs: need two shares 0 < high < high+medium < 1, got "
                           f"{','.join(str(c) for c in cutoffs)}")
    return float(cutoffs[0]), float(cutoffs[1])


def _inspect_run(source: Source, vocab_size: int, tp: int, pp: int) -> _Model:
    from megatron.core import dist_checkpointing

    from megatron_mile.arguments import checkpoint_shape

    try:
        common = dist_checkpointing.load_common_state_dict(source.checkpoint)
    except Exception as err:  # torch.load / pickle raise many types on a damaged file
        raise BucketsError(f"{source.checkpoint}: unreadable checkpoint ({str(err).splitlines()[0]})") from None
    if not all(k in common for k in ("args", "vocab_size", "layout")):
        raise BucketsError(f"{source.checkpoint}: not a megatron-mile checkpoint (no args/vocab_size/layout)")
    if common["vocab_size"] != vocab_size:
        raise BucketsError(f"{source.path}: trained with a {common['vocab_size']}-token vocabulary, but "
                           f"--tokenizer-model has {vocab_size} tokens")
    args = common["args"]
    shape = checkpoint_shape(args)
    for what, value, divisor, flag in (("heads", shape.num_attention_heads, tp, "--tensor-model-parallel-size"),
                                       ("query groups", shape.query_groups, tp, "--tensor-model-parallel-size"),
                                       ("FFN size", shape.ffn_hidden_size, tp, "--tensor-model-parallel-size"),
                                       ("layers", shape.num_layers, pp, "--pipeline-model-parallel-size")):
        if value % divisor:
            raise BucketsError(f"{source.path}: {value} {what} do not divide by {flag} {divisor}")
    return _Model(source, shape.seq_length, args)


def _inspect_hf(source: Source, tokenizer) -> _Model:
    try:
        with open(os.path.join(source.path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        rows, positions = int(config["vocab_size"]), int(config["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BucketsError(f"{source.path}/config.json: not a causal LM config ({err})") from None
    if rows < tokenizer.vocab_size:
        raise BucketsError(f"{source.path}: the model has {rows} vocabulary rows, fewer than the "
                           f"{tokenizer.vocab_size} tokens of --tokenizer-model")
    tokenizer_file = os.path.join(source.path, "tokenizer.json")
    if os.path.isfile(tokenizer_file):
        from tokenizers import Tokenizer

        theirs = {i: piece for piece, i in Tokenizer.from_file(tokenizer_file).get_vocab(with_added_tokens=True).items()}
        ours = {i: piece for piece, i in tokenizer.vocab.items()}
        differ = next((i for i in sorted(set(theirs) | set(ours)) if theirs.get(i) != ours.get(i)), None)
        if differ is not None:
            raise BucketsError(f"{source.path}: its tokenizer does not match --tokenizer-model (token {differ} is "
                               f"{theirs.get(differ)!r} there and {ours.get(differ)!r} in --tokenizer-model)")
    return _Model(source, positions)


def _check_data_matches_tokenizer(prefixes: Sequence[str], vocab_size: int) -> None:
    """The first chunk of every dataset must hold only ids of the tokenizer (counting checks them all)."""
    for prefix in prefixes:
        span = frequency.dataset_span(prefix)
        first = frequency.count_range(prefix + ".bin", span.dtype, 0,
                                       min(span.end_token, frequency.CHUNK_TOKENS), vocab_size)
        frequency.check_in_vocabulary(span, first, vocab_size)


def _agreed_split(models: Sequence[_Model], split: Optional[str]) -> str:
    trained = {m.source.label: m.run_args.get("split") for m in models if m.run_args is not None}
    if split is not None:
        other = {label: s for label, s in trained.items() if s != split}
        if other:
            label, theirs = next(iter(other.items()))
            raise BucketsError(f"--split {split}: {label} was trained with --split {theirs}; the counts must be of "
                               "the data the model saw")
        return split
    if len(set(trained.values())) > 1:
        listed = ", ".join(f"{label}: {s}" for label, s in trained.items())
        raise BucketsError(f"the runs were trained with different --split values ({listed})")
    return next(iter(trained.values())) if trained else _trainer_default("split")


# --------------------------------------------------------------------------- distributed start-up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_runtime(tp: int, pp: int, seed: int):
    """``runtime.initialize`` at the scoring layout, and the function that undoes what this call started.

    A process without ``torch.distributed`` (and not under torchrun) gets a world of one on a free port.
    """
    import torch.distributed as dist

    from megatron_mile import runtime

    if dist.is_initialized():
        return runtime.initialize(tp, pp, seed=seed), lambda: None
    saved = dict(os.environ)
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))

    def stop() -> None:
        runtime.shutdown()
        os.environ.clear()
        os.environ.update(saved)

    return runtime.initialize(tp, pp, seed=seed), stop


# --------------------------------------------------------------------------- counting


def training_counts(spans: Sequence[frequency.Span], vocab_size: int, tokenizer_digest: str,
                    cache_dir: Optional[str] = None, workers: int = 1,
                    log: Callable[[str], None] = lambda message: None) -> np.ndarray:
    """Counts ``[len(spans), vocab_size]`` of the training spans: from the cache, or counted and cached.

    Under ``torch.distributed`` this is collective: the ranks count disjoint blocks and sum them,
    and rank 0 writes the cache.
    """
    import torch.distributed as dist

    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if distributed and dist.get_backend() == "nccl" \
        else torch.device("cpu")
    keys = [frequency.cache_key(span, vocab_size, tokenizer_digest) for span in spans]
    paths = [frequency.cache_path(span, key, cache_dir) for span, key in zip(spans, keys)]
    counts = [frequency.load_cached_counts(path, key) for path, key in zip(paths, keys)]
    # Ranks agree on what to count, even if one of them could not read a cache file.
    missing = torch.tensor([c is None for c in counts], dtype=torch.int32, device=device)
    if distributed:
        dist.all_reduce(missing, op=dist.ReduceOp.MAX)
    todo = [i for i, flag in enumerate(missing.tolist()) if flag]
    for i, path in enumerate(paths):
        if i not in todo:
            log(f"token counts of {spans[i].prefix}: cached in {path}")
    if not todo:
        return np.stack(counts)
    log(f"counting {sum(spans[i].tokens for i in todo):,} training tokens in {len(todo)} dataset(s) "
        f"on {world} rank(s) x {workers} process(es)")
    summed = torch.from_numpy(frequency.count_tokens([spans[i] for i in todo], vocab_size, workers, (rank, world),
                                                     log)).to(device)
    if distributed:
        dist.all_reduce(summed)
    summed = summed.cpu().numpy()
    for row, i in enumerate(todo):
        frequency.check_in_vocabulary(spans[i], summed[row], vocab_size)
        counts[i] = summed[row, :vocab_size]
        if rank == 0:
            frequency.save_counts(paths[i], keys[i], counts[i])
    if distributed:
        dist.barrier()
    return np.stack(counts)


# --------------------------------------------------------------------------- the analysis


def _validation_sizes(blend, split: str, shared: bool, seq_length: int, max_tokens: int) -> tuple[int, int]:
    """Samples to score on the blended validation set and on each domain's (see the module docstring)."""
    valid = frequency.split_bounds(split, 1)

    def samples(prefix: str, held_out: bool) -> int:
        if held_out and valid is None:
            return 0
        span = frequency.dataset_span(prefix, valid if held_out else (0.0, 1.0))
        return max(span.tokens - 1, 0) // seq_length  # a sample holds seq_length + 1 tokens

    cap = max_tokens // seq_length
    overall = min(cap, sum(samples(p, shared) for p in blend.eval_prefixes))
    if overall == 0:
        raise BucketsError(f"--data-path: the validation split holds fewer than {seq_length + 1} tokens")
    train_set = set(blend.train_prefixes)
    per_domain = {d: samples(p, p in train_set) for d, p in blend.domains.items()}
    for domain, n in per_domain.items():
        if n == 0:
            raise BucketsError(f"--data-path: domain {domain}'s validation split holds fewer than "
                               f"{seq_length + 1} tokens")
    return overall, min([cap, *per_domain.values()]) if per_domain else 0


def _log_on_last_rank(rank: int, world_size: int) -> Callable[[str], None]:
    if rank != world_size - 1:
        return lambda message: None
    return lambda message: print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class _Plan:
    """Everything the analysis needs, checked."""

    models: list[_Model]
    tokenizer: Any
    blend: Any
    split: str
    seed: int
    seq_length: int
    train_spans: list[frequency.Span]
    valid_samples: int  # on the blended validation set
    domain_valid_samples: int  # on each domain's


def _plan(models: Sequence[str], data_path: str | Sequence[str], tokenizer_model: str,
          labels: Optional[Sequence[str]], iteration: Optional[int], tokenizer_type: Optional[str],
          split: Optional[str], max_tokens: int, seq_length: Optional[int], seed: Optional[int], tp: int,
          pp: int) -> _Plan:
    """Check every input (raising ``BucketsError``) and settle the defaults; reads only headers."""
    from megatron_mile.data import build_tokenizer, load_blend

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % (tp * pp):
        raise BucketsError(f"{world_size} processes do not divide into --tensor-model-parallel-size {tp} x "
                           f"--pipeline-model-parallel-size {pp}")
    try:
        sources = resolve_sources(models, labels, iteration)
        tokenizer = build_tokenizer(tokenizer_model, tokenizer_type)
        blend = load_blend(data_path)
    except (SourceError, ValueError) as err:
        raise BucketsError(str(err)) from None
    inspected = [_inspect_run(s, tokenizer.vocab_size, tp, pp) if s.kind == RUN else _inspect_hf(s, tokenizer)
                 for s in sources]
    split = _agreed_split(inspected, split)
    first_run = next((m for m in inspected if m.run_args is not None), None)
    seed = seed if seed is not None else (first_run.run_args["seed"] if first_run else _trainer_default("seed"))
    seq_length = seq_length or (first_run or inspected[0]).max_seq_length
    for model in inspected:
        if seq_length > model.max_seq_length:
            raise BucketsError(f"--seq-length {seq_length}: {model.source.path} handles at most "
                               f"{model.max_seq_length} positions")
    if max_tokens < seq_length:
        raise BucketsError(f"--max-tokens {max_tokens} is less than one sequence of {seq_length} tokens")
    shared = blend.eval_prefixes == blend.train_prefixes  # as build_pretraining_datasets decides
    for part, name in ((0, "training"), (1, "validation")):
        if shared and frequency.split_bounds(split, part) is None:
            raise BucketsError(f"--split {split} leaves no {name} data")
    train_spans = [frequency.dataset_span(p, frequency.split_bounds(split, 0) if shared else (0.0, 1.0))
                   for p in blend.train_prefixes]
    for span in train_spans:
        if span.tokens == 0:
            raise BucketsError(f"{span.prefix}: the training split of --split {split} holds no tokens")
    _check_data_matches_tokenizer(dict.fromkeys(blend.train_prefixes + blend.eval_prefixes +
                                                list(blend.domains.values())), tokenizer.vocab_size)
    valid, domain_valid = _validation_sizes(blend, split, shared, seq_length, max_tokens)
    return _Plan(inspected, tokenizer, blend, split, seed, seq_length, train_spans, valid, domain_valid)


def analyze_buckets(models: Sequence[str], data_path: str | Sequence[str], tokenizer_model: str, *,
                    labels: Optional[Sequence[str]] = None, iteration: Optional[int] = None,
                    tokenizer_type: Optional[str] = None, split: Optional[str] = None,
                    cutoffs: Sequence[float] = DEFAULT_CUTOFFS, max_tokens: int = DEFAULT_MAX_TOKENS,
                    seq_length: Optional[int] = None, seed: Optional[int] = None,
                    micro_batch_size: int = DEFAULT_MICRO_BATCH_SIZE, tensor_model_parallel_size: int = 1,
                    pipeline_model_parallel_size: int = 1, counts_cache_dir: Optional[str] = None,
                    count_workers: int = 1, data_cache_path: Optional[str] = None) -> dict:
    """Per-bucket perplexity, token count and mean entropy of each model (the ``buckets.json`` dict).

    ``models``: megatron-mile run directories (or ``iter_N`` checkpoints) and Hugging Face model
    directories. Call it in a process without ``torch.distributed``, or on every rank of a
    torchrun job whose size divides by TP × PP (the rest is data parallel); every rank gets the
    result. Raises ``BucketsError`` (one line) for bad input, before any work. Progress goes to
    stderr from the last rank. The keywords are the CLI's flags (``megatron-mile-buckets --help``);
    ``data_cache_path`` is where megatron-core keeps the validation sample indices (None: its
    default, beside the data).
    """
    from megatron_mile.data import build_pretraining_datasets

    cutoffs = check_cutoffs(cutoffs)
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    _check_positive(max_tokens=max_tokens, micro_batch_size=micro_batch_size, tensor_model_parallel_size=tp,
                    pipeline_model_parallel_size=pp, count_workers=count_workers, seq_length=seq_length)
    plan = _plan(models, data_path, tokenizer_model, labels, iteration, tokenizer_type, split, max_tokens,
                 seq_length, seed, tp, pp)
    vocab_size = plan.tokenizer.vocab_size

    rt, stop_runtime = _start_runtime(tp, pp, plan.seed)
    log = _log_on_last_rank(rt.rank, rt.world_size)
    try:
        counts = training_counts(plan.train_spans, vocab_size, frequency.file_digest(tokenizer_model),
                                 counts_cache_dir, count_workers, log)
        frequencies = frequency.blend_frequencies(counts, plan.blend.train_weights)
        buckets = frequency.assign_buckets(frequencies, cutoffs)
        bucket_of = torch.from_numpy(buckets.astype(np.int64))
        datasets = build_pretraining_datasets(
            plan.blend, plan.tokenizer, plan.seq_length, plan.seed, train_samples=0,
            valid_samples=plan.valid_samples, test_samples=0, split=plan.split, path_to_cache=data_cache_path,
            domain_valid_samples=plan.domain_valid_samples)
        runs = {model.source.label: _score_model(model, vocab_size, datasets, plan, bucket_of, micro_batch_size, rt,
                                                 log)
                for model in plan.models}
    finally:
        stop_runtime()
    return {"buckets": frequency.bucket_table(frequencies, buckets), "runs": runs}


def _score_model(model: _Model, vocab_size: int, datasets, plan: _Plan, bucket_of: torch.Tensor,
                 micro_batch_size: int, rt, log: Callable[[str], None]) -> dict:
    from megatron_mile.arguments import checkpoint_shape
    from megatron_mile.evaluation.token_scoring import HFScorer, RunScorer, summarize

    source = model.source
    if source.kind == RUN:
        log(f"{source.label}: loading {source.checkpoint} at TP {rt.tp} PP {rt.pp}")
        scorer = RunScorer(source.checkpoint, checkpoint_shape(model.run_args), vocab_size,
                           rt.device)
    else:
        log(f"{source.label}: loading the Hugging Face model {source.path}")
        scorer = HFScorer(source.path, vocab_size, rt.device)

    def score(dataset, samples: int, what: str) -> dict:
        return summarize(scorer.score(dataset, samples, bucket_of, micro_batch_size, log, f"{source.label} {what}"))

    result = score(datasets.valid, plan.valid_samples, "validation blend")
    result["domains"] = {domain: score(dataset, plan.domain_valid_samples, domain)
                         for domain, dataset in sorted(datasets.domain_valid.items())}
    log(f"{source.label}: overall ppl {result['overall']['ppl']:.4f} over {result['overall']['tokens']:,} tokens")
    del scorer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result
