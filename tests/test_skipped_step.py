"""A skipped step leaves the parameters and the optimizer state exactly as they were.

Two data-parallel ranks, megatron-core's distributed and regular optimizers. One normal step
fills Adam's moments; then one gradient element becomes 1e20: finite, but its square
overflows fp32, so the grad norm is inf while every gradient is finite. That step must be
skipped without touching a single bit of any parameter or optimizer-state tensor. A later
normal step must then update them again.

The regular optimizer takes its grad norm over the model-parallel group only, since after
the data-parallel all-reduce every replica holds the same grads (and the trainer's loss
statistics are averaged over data-parallel ranks too); so its overflow and loss flag are
set on both ranks. The distributed optimizer's shards differ per rank: there rank 0 alone
sees them, and rank 1 must skip as well.
"""

import numpy as np
import pytest

from dist_utils import run_ranks

VOCAB, SEQ, MBS = 300, 16, 2


def _snapshot(chunks, optimizer) -> dict[str, np.ndarray]:
    import torch

    out = {f"param/{name}": p.detach().float().numpy().copy() for name, p in chunks[0].named_parameters()}
    for part_index, part in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        for param_index, (param, state) in enumerate(part.optimizer.state.items()):
            out[f"main/{part_index}/{param_index}"] = param.detach().float().numpy().copy()
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    out[f"state/{part_index}/{param_index}/{key}"] = value.detach().float().numpy().copy()
    return out


def _run(rank: int, world: int) -> dict[str, dict]:
    """For each optimizer: a normal step, an overflowing step, a step with a non-finite loss
    and a normal step again; the snapshots around the two skipped ones, and what moved after."""
    import math

    import torch
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_mile import model as mm
    from megatron_mile import optim, runtime

    rt = runtime.initialize(1, 1, seed=3)
    cfg = mm.build_transformer_config(mm.PRESETS["tiny"])
    g = torch.Generator().manual_seed(rank)
    positions = torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)

    def forward_step(data_iterator, m):
        tokens, labels = next(data_iterator)

        def loss_func(output):
            loss = tensor_parallel.vocab_parallel_cross_entropy(output.transpose(0, 1).contiguous(),
                                                                 labels.t().contiguous()).mean()
            return loss, {"loss": loss.detach()}

        return m(tokens, positions, None), loss_func

    results = {}
    for name, distributed in (("distributed", True), ("regular", False)):
        chunks = mm.build_model_chunks(cfg, VOCAB, SEQ, seed=3, device=rt.device)
        settings = optim.OptimSettings(lr=1e-2, min_lr=1e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                                       adam_eps=1e-8, clip_grad=1.0, lr_warmup_iters=0, lr_decay_iters=10,
                                       lr_decay_style="cosine", use_distributed_optimizer=distributed)
        model = optim.wrap_data_parallel(cfg, chunks, settings)
        optimizer = optim.build_optimizer(model, settings, bf16=False)
        # Rank 1 of the distributed optimizer must learn of rank 0's finding from the norm's all-reduce.
        sees_it = rank == 0 or not distributed

        def step(overflow: bool = False, loss_is_finite: bool = True):
            for m in model:
                m.zero_grad_buffer()
            optimizer.zero_grad()
            batch = (torch.randint(0, VOCAB, (MBS, SEQ), generator=g),
                     torch.randint(0, VOCAB, (MBS, SEQ), generator=g))
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=model,
                                        num_microbatches=1, seq_length=SEQ, micro_batch_size=MBS)
            if overflow and sees_it:
                model[0].buffers[0].grad_data[0] = 1e20  # after the grad reduction; in rank 0's shard
            stats = torch.tensor([0.0 if loss_is_finite or not sees_it else math.nan], dtype=torch.float64)
            return optim.step_if_finite(optimizer, stats)

        out = {"norms": [step()]}
        before = _snapshot(chunks, optimizer)
        out["norms"].append(step(overflow=True))
        overflowed = _snapshot(chunks, optimizer)
        out["norms"].append(step(loss_is_finite=False))
        nan_loss = _snapshot(chunks, optimizer)
        out["norms"].append(step())
        after = _snapshot(chunks, optimizer)
        out["keys"] = sorted(before)
        out["changed"] = {label: sorted(k for k in before if not np.array_equal(before[k], snap[k]))
                          for label, snap in (("overflow", overflowed), ("nan loss", nan_loss), ("next", after))}
        results[name] = out
    runtime.shutdown()
    return results


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_run, 2)


@pytest.mark.parametrize("optimizer", ["distributed", "regular"])
def test_skipped_steps_leave_parameters_and_optimizer_state_bit_for_bit(runs, optimizer):
    for rank, result in enumerate(r[optimizer] for r in runs):
        first, overflowed, nan_loss, last = result["norms"]
        assert first is not None and np.isfinite(first) and last is not None, result["norms"]
        assert overflowed is None and nan_loss is None, f"rank {rank}: a step was taken: {result['norms']}"
        assert result["changed"]["overflow"] == [], f"rank {rank}: overflow changed {result['changed']}"
        assert result["changed"]["nan loss"] == [], f"rank {rank}: non-finite loss changed {result['changed']}"
        keys = result["keys"]
        assert any(k.startswith("state/") for k in keys) and any(k.startswith("param/") for k in keys)
        # The next finite step moves every parameter and every optimizer-state tensor again.
        assert result["changed"]["next"] == keys
