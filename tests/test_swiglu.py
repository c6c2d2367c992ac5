"""megatron-mile's SwiGLU: the formula in float64, and stock megatron-core's MLP in a GPTModel.

MEGATRON_MILE_TEST_DEVICE=cuda runs the float64 check's SwiGLU on a GPU (benchmarks/gpu_smoke.sh).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dist_utils import run_ranks
from test_attention import _loss_and_grads

from megatron_mile.swiglu import swiglu

DEVICE = torch.device(os.environ.get("MEGATRON_MILE_TEST_DEVICE", "cpu"))


def test_swiglu_matches_the_float64_formula_and_its_derivative():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 3, 2 * 24, generator=g) * 3).to(DEVICE).requires_grad_()
    upstream = torch.randn(16, 3, 24, generator=g)
    y = swiglu(x)
    y.backward(upstream.to(DEVICE))
    y, x_grad = y.detach().cpu(), x.grad.cpu()

    a, b = (t.double() for t in x.detach().cpu().chunk(2, dim=-1))
    grad = upstream.double()
    sig = 1 / (1 + torch.exp(-a))
    expected_y = a * sig * b
    expected_grad_a = grad * b * sig * (1 + a * (1 - sig))
    expected_grad_b = grad * a * sig
    np.testing.assert_allclose(y.double(), expected_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x_grad[..., :24].double(), expected_grad_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x_grad[..., 24:].double(), expected_grad_b, rtol=1e-5, atol=1e-6)


def _against_stock_mlp(rank: int, world: int) -> dict:
    """Loss and gradients of a GPTModel with megatron-mile's SwiGLU (the default config) and with
    megatron-core's own unfused GLU (``use_te_activation_func`` off), from the same weights."""
    from dataclasses import replace

    from megatron_mile import model as mm
    from megatron_mile import runtime
    from megatron_mile.attention import SDPAttention
    from megatron_mile.swiglu import SwiGLU
    from test_attention import MBS, SEQ, VOCAB

    runtime.initialize(world, 1, seed=5)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
    config = mm.build_transformer_config(mm.PRESETS["tiny"], tp=world)
    assert config.use_te_activation_func
    mlp_spec = mm.block_spec(config, None).layer_specs[0].submodules.mlp.submodules
    assert mlp_spec.activation_func is SwiGLU
    loss, grads = _loss_and_grads(config, SDPAttention, tokens, labels)
    stock_loss, stock_grads = _loss_and_grads(replace(config, use_te_activation_func=False), SDPAttention,
                                              tokens, labels)
    runtime.shutdown()
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"
    return {"loss": loss, "stock_loss": stock_loss, "fc1_grad": float(np.abs(stock_grads[fc1]).max()),
            "grad_diff": {name: float(np.abs(grads[name] - ref).max() / np.abs(ref).max())
                          for name, ref in stock_grads.items()}}


def test_swiglu_matches_megatron_core_mlp_at_tp2():
    # TP=2 shards FC1 with stride 2: each rank's output is its own [gate, up] pair.
    for result in run_ranks(_against_stock_mlp, 2):
        np.testing.assert_allclose(result["loss"], result["stock_loss"], rtol=1e-6)
        worst = max(result["grad_diff"].items(), key=lambda item: item[1])
        assert worst[1] < 1e-5, f"gradient of {worst[0]} differs by {worst[1]:.2e} of its max"
        assert result["fc1_grad"] > 1e-4
