"""SDPAttention against megatron-core's own DotProductAttention, inside megatron-core's GPTModel.

Both models are built from the same seed (layout-invariant init) with only the core attention
swapped, their attention made sharp (query/key weights scaled up) so the causal mask and the
scale decide the result; losses and every gradient must agree to fp32 rounding at TP=1 and
TP=2, with and without grouped-query attention.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

from dist_utils import run_ranks

VOCAB, SEQ, MBS = 256, 32, 2
# (num_query_groups, extra config): 4 query heads in the tiny preset.
CASES = {
    "mha": (4, {}),
    "gqa": (2, {}),
    # Fewer K/V heads than TP ranks: megatron-core replicates the one group on both ranks.
    "mqa": (1, {}),
    "scaled": (4, {"softmax_scale": 0.3, "apply_query_key_layer_scaling": True}),
}


def _loss_and_grads(config, core_attention, tokens, labels) -> tuple[float, dict[str, np.ndarray]]:
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel

    from megatron_mile import model as mm

    model = GPTModel(config=config, transformer_layer_spec=mm.block_spec(config, None, core_attention),
                     vocab_size=VOCAB, max_sequence_length=SEQ, parallel_output=True,
                     share_embeddings_and_output_weights=False, position_embedding_type="rope")
    mm.initialize_weights(model, seed=3, vocab_size=VOCAB)
    with torch.no_grad():
        for layer_module in model.decoder.layers:
            # Sharp attention: scores of order 10, not the near-uniform 1e-3 of N(0, 0.01) weights.
            layer_module.self_attention.linear_qkv.weight.mul_(40.0)
    positions = torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)
    logits = model(tokens, positions, None)
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(), labels.t().contiguous())
    loss = loss.mean()
    loss.backward()
    return float(loss), {name: p.grad.numpy().copy() for name, p in model.named_parameters()}


def default_against_stock(world: int, watched: str, check_default: Callable | None = None,
                          **stock: object) -> dict:
    """Inside a rank: loss and gradients of the tiny preset's default GPTModel (megatron-mile's
    kernels) and of the same weights with ``stock`` config fields (megatron-core's own path).
    ``check_default(config)`` asserts what the default config uses; ``watched`` names a parameter
    whose gradient must be non-trivial."""
    from dataclasses import replace

    import torch

    from megatron_mile import model as mm
    from megatron_mile import runtime
    from megatron_mile.attention import SDPAttention

    runtime.initialize(world, 1, seed=5)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
    config = mm.build_transformer_config(mm.PRESETS["tiny"], tp=world)
    if check_default:
        check_default(config)
    loss, grads = _loss_and_grads(config, SDPAttention, tokens, labels)
    stock_loss, stock_grads = _loss_and_grads(replace(config, **stock), SDPAttention, tokens, labels)
    runtime.shutdown()
    return {"loss": loss, "stock_loss": stock_loss, "watched_grad": float(np.abs(stock_grads[watched]).max()),
            "grad_diff": {name: float(np.abs(grads[name] - ref).max() / np.abs(ref).max())
                          for name, ref in stock_grads.items()}}


def assert_matches_stock(results: list[dict], grad_tolerance: float) -> None:
    """Same loss to fp32 rounding; every gradient within ``grad_tolerance`` of its max."""
    for result in results:
        np.testing.assert_allclose(result["loss"], result["stock_loss"], rtol=1e-6)
        worst = max(result["grad_diff"].items(), key=lambda item: item[1])
        assert worst[1] < grad_tolerance, f"gradient of {worst[0]} differs by {worst[1]:.2e} of its max"
        assert result["watched_grad"] > 1e-4


def _compare(rank: int, world: int, cases: list[str]) -> dict:
    """Per case: (SDPA loss, DotProductAttention loss, max |grad diff| / max |grad|, entropy of
    the first layer's attention); and, at TP=1, the dropout statistics."""
    from dataclasses import replace

    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_mile import model as mm
    from megatron_mile import runtime
    from megatron_mile.attention import SDPAttention

    runtime.initialize(world, 1, seed=5)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
    out = {}
    for case in cases:
        groups, extra = CASES[case]
        config = replace(mm.build_transformer_config(mm.PRESETS["tiny"], tp=world), num_query_groups=groups, **extra)
        sdpa_loss, sdpa_grads = _loss_and_grads(config, SDPAttention, tokens, labels)
        ref_loss, ref_grads = _loss_and_grads(config, DotProductAttention, tokens, labels)
        assert sdpa_grads.keys() == ref_grads.keys()
        rel = {name: float(np.abs(sdpa_grads[name] - ref).max() / np.abs(ref).max()) for name, ref in ref_grads.items()}
        qkv_grad = float(np.abs(ref_grads["decoder.layers.0.self_attention.linear_qkv.weight"]).max())
        out[case] = {"sdpa_loss": sdpa_loss, "ref_loss": ref_loss, "grad_rel": rel, "qkv_grad": qkv_grad}
    if world == 1:
        out["dropout"] = _dropout_statistics()
    runtime.shutdown()
    return out


def _dropout_statistics() -> dict:
    """SDPAttention alone with attention_dropout 0.5 on sharp random inputs."""
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_mile import model as mm
    from megatron_mile.attention import SDPAttention

    config = mm.build_transformer_config(mm.PRESETS["tiny"])
    attention = SDPAttention(config, 1, AttnMaskType.causal, "self", attention_dropout=0.5)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(8, 1, 4, 16, generator=g) * s for s in (3.0, 3.0, 1.0))
    attention.eval()
    reference = attention(q, k, v, None)
    attention.train()
    cpu_state = torch.get_rng_state()
    samples = torch.stack([attention(q, k, v, None) for _ in range(2000)])
    default_rng_untouched = torch.equal(torch.get_rng_state(), cpu_state)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker_state = tracker.get_states()
    first = attention(q, k, v, None)
    tracker.set_states(tracker_state)
    replay = attention(q, k, v, None)
    return {
        "reference": reference.numpy(), "mean": samples.mean(0).numpy(),
        "sem": (samples.std(0) / np.sqrt(len(samples))).numpy(),
        "draws_differ": not torch.equal(samples[0], samples[1]),
        "default_rng_untouched": default_rng_untouched, "replay_equal": torch.equal(first, replay),
    }


@pytest.fixture(scope="module")
def tp1():
    return run_ranks(_compare, 1, ["mha", "gqa", "mqa", "scaled"])[0]


def _check(result: dict) -> None:
    np.testing.assert_allclose(result["sdpa_loss"], result["ref_loss"], rtol=1e-6)
    worst = max(result["grad_rel"].items(), key=lambda item: item[1])
    assert worst[1] < 5e-4, f"gradient of {worst[0]} differs by {worst[1]:.2e} of its max"
    # The attention weights matter: their gradients are far from zero.
    assert result["qkv_grad"] > 1e-3


@pytest.mark.parametrize("case", ["mha", "gqa", "mqa", "scaled"])
def test_sdpa_matches_dot_product_attention_tp1(tp1, case):
    _check(tp1[case])


def test_sdpa_matches_dot_product_attention_tp2():
    for rank_result in run_ranks(_compare, 2, ["mha", "gqa", "mqa"]):
        for case in ("mha", "gqa", "mqa"):
            _check(rank_result[case])


def test_attention_dropout_is_unbiased_and_drawn_from_the_model_parallel_stream(tp1):
    stats = tp1["dropout"]
    # Inverted dropout keeps the expectation: the mean of 2000 draws is the no-dropout output.
    assert np.all(np.abs(stats["mean"] - stats["reference"]) < 6 * stats["sem"] + 1e-6)
    assert np.abs(stats["reference"]).max() > 0.1 and stats["sem"].max() > 1e-3
    assert stats["draws_differ"]
    # The draws come from the tracker's stream (replayable from its state), not the default generator.
    assert stats["default_rng_untouched"] and stats["replay_equal"]
