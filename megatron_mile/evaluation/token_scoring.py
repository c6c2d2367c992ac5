"""Per-token cross-entropy and predicted entropy of a model, summed per frequency bucket of the target.

For every scored position ``i`` with target ``t_i`` and predicted distribution ``p_i``::

    ce_i = -log p_i(t_i)        H_i = -Σ_v p_i(v) log p_i(v)

and, per bucket ``b`` (the bucket of the *target* token), the float64 sums ``Σ ce_i``, ``Σ H_i`` and
the token count ``n_b``, from which ``ppl_b = exp(Σ ce_i / n_b)`` and the mean entropy ``Σ H_i / n_b``
(what MiLe's weight ``(sigma + H)^gamma`` is made of).

Two scorers share the batching and the sums:

- ``RunScorer``: a megatron-mile checkpoint, built at this job's TP/PP layout with
  ``build_model_chunks`` and loaded weights-only (``dist_checkpointing`` reshards from the saved
  layout). Micro-batches go forward-only through megatron-core's pipeline schedule, data-parallel
  ranks take disjoint samples, and CE and entropy come from ``vocab_parallel_ce_and_entropy`` on
  the vocab-sharded logits of the last stage: the full logits are never gathered.
- ``HFScorer``: a Hugging Face causal LM in float32, CE and entropy from its full logits
  (columns past the tokenizer's vocabulary are dropped, as the run's padding is); every rank of
  the job takes a disjoint share of the samples.

Both return the same sums on every rank.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_mile.evaluation.frequency import BUCKETS
from megatron_mile.evaluation.progress import Progress

STATS = ("ce", "entropy", "tokens")  # rows of a sums tensor


def bucket_sums(ce: torch.Tensor, entropy: torch.Tensor, buckets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[3, len(BUCKETS)]`` float64: Σ ce, Σ entropy and the token count per bucket, over ``mask``."""
    weight = mask.reshape(-1).double()
    index = buckets.reshape(-1).long()
    sums = torch.zeros(len(STATS), len(BUCKETS), dtype=torch.float64, device=ce.device)
    for row, values in enumerate((ce.reshape(-1).double() * weight, entropy.reshape(-1).double() * weight, weight)):
        sums[row].index_add_(0, index, values)
    return sums


def summarize(sums: torch.Tensor) -> dict[str, dict]:
    """``{"overall": {"ppl", "tokens"}, bucket: {"ppl", "tokens", "entropy"}}``; empty buckets get None."""
    ce, entropy, tokens = sums.double().cpu().tolist()

    def stats(ce_sum: float, entropy_sum: Optional[float], n: float) -> dict:
        out: dict = {"ppl": math.exp(ce_sum / n) if n else None, "tokens": int(n)}
        if entropy_sum is not None:
            out["entropy"] = entropy_sum / n if n else None
        return out

    report = {"overall": stats(sum(ce), None, sum(tokens))}
    report.update({name: stats(ce[b], entropy[b], tokens[b]) for b, name in enumerate(BUCKETS)})
    return report


def micro_batches(dataset, num_samples: int, micro_batch_size: int, rank: int, world: int
                  ) -> list[Callable[[], dict[str, torch.Tensor]]]:
    """This rank's micro-batches of samples ``0 .. num_samples-1``, built lazily.

    Samples are padded up to a multiple of ``micro_batch_size * world`` with copies of sample 0
    whose loss mask is 0, so every rank runs the same number of full micro-batches.
    """
    per_step = micro_batch_size * world
    padded = -(-num_samples // per_step) * per_step
    per_rank = padded // world
    mine = range(rank * per_rank, (rank + 1) * per_rank)

    def build(indices: Sequence[int]) -> dict[str, torch.Tensor]:
        samples = [dataset[i if i < num_samples else 0] for i in indices]
        batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
                 for key in ("tokens", "labels", "loss_mask", "position_ids")}
        batch["loss_mask"] = batch["loss_mask"] * torch.tensor([float(i < num_samples) for i in indices])[:, None]
        return batch

    return [partial(build, mine[k:k + micro_batch_size]) for k in range(0, per_rank, micro_batch_size)]


class RunScorer:
    """A megatron-mile checkpoint at this job's layout (``runtime.initialize`` must have run)."""

    def __init__(self, checkpoint: str, shape, vocab_size: int, device: torch.device) -> None:
        from megatron.core import parallel_state

        from megatron_mile.checkpointing import load_model_weights
        from megatron_mile.model import build_model_chunks, build_transformer_config

        self.vocab_size = vocab_size
        self.device = device
        config = build_transformer_config(shape, tp=parallel_state.get_tensor_model_parallel_world_size(),
                                          pp=parallel_state.get_pipeline_model_parallel_world_size())
        self.chunks = build_model_chunks(config, vocab_size, shape.seq_length, seed=0, device=device,
                                         rotary_base=shape.rotary_base)
        load_model_weights(checkpoint, self.chunks, vocab_size)
        for chunk in self.chunks:
            chunk.eval()

    def _loss(self, batch: dict[str, torch.Tensor], bucket_of: torch.Tensor, progress: Progress,
              logits: torch.Tensor):
        from megatron_mile.loss import vocab_parallel_ce_and_entropy

        labels = batch["labels"].to(self.device)
        # The logits are not read again: let the CE reuse their buffer.
        terms = vocab_parallel_ce_and_entropy(logits, labels, vocab_size=self.vocab_size, inplace=True)
        ce, entropy = terms.nll, terms.entropy
        progress.add(labels.numel())
        sums = bucket_sums(ce, entropy, bucket_of[labels], batch["loss_mask"].to(self.device))
        return ce.new_zeros(()), {"sums": sums}

    def _forward_step(self, bucket_of: torch.Tensor, progress: Progress, data_iterator: Iterator, model):
        batch = next(data_iterator)()
        logits = model(batch["tokens"].to(self.device), batch["position_ids"].to(self.device), None)
        return logits, partial(self._loss, batch, bucket_of, progress)

    @torch.no_grad()
    def score(self, dataset, num_samples: int, bucket_of: torch.Tensor, micro_batch_size: int,
              log: Callable[[str], None], what: str) -> torch.Tensor:
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batches = micro_batches(dataset, num_samples, micro_batch_size,
                                parallel_state.get_data_parallel_rank(),
                                parallel_state.get_data_parallel_world_size())
        seq_length = len(dataset[0]["tokens"])
        progress = Progress(what, len(batches) * micro_batch_size * seq_length, log, interval=30.0)
        outputs = get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, bucket_of.to(self.device), progress),
            data_iterator=iter(batches), model=self.chunks, num_microbatches=len(batches),
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True)
        sums = torch.zeros(len(STATS), len(BUCKETS), dtype=torch.float64, device=self.device)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            for out in outputs:
                sums += out["sums"]
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        # The last rank is on the last stage; its totals go to every rank.
        dist.broadcast(sums, src=dist.get_world_size() - 1)
        return sums


def full_logits_ce_and_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CE and entropy (fp32) of full ``[..., V]`` logits."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    ce = -log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return ce, entropy


class HFScorer:
    """A Hugging Face causal LM directory, in float32."""

    def __init__(self, path: str, vocab_size: int, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM

        self.vocab_size = vocab_size
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()

    @torch.no_grad()
    def score(self, dataset, num_samples: int, bucket_of: torch.Tensor, micro_batch_size: int,
              log: Callable[[str], None], what: str) -> torch.Tensor:
        batches = micro_batches(dataset, num_samples, micro_batch_size, dist.get_rank(), dist.get_world_size())
        progress = Progress(what, len(batches) * micro_batch_size * len(dataset[0]["tokens"]), log, interval=30.0)
        bucket_of = bucket_of.to(self.device)
        sums = torch.zeros(len(STATS), len(BUCKETS), dtype=torch.float64, device=self.device)
        for build in batches:
            batch = {k: v.to(self.device) for k, v in build().items()}
            logits = self.model(input_ids=batch["tokens"], position_ids=batch["position_ids"]).logits
            ce, entropy = full_logits_ce_and_entropy(logits[..., : self.vocab_size], batch["labels"])
            sums += bucket_sums(ce, entropy, bucket_of[batch["labels"]], batch["loss_mask"])
            progress.add(batch["labels"].numel())
        dist.all_reduce(sums)
        return sums
