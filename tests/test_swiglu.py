"""megatron-mile's SwiGLU: the formula in float64, and stock megatron-core's MLP in a GPTModel.

MEGATRON_MILE_TEST_DEVICE=cuda runs the float64 check's SwiGLU on a GPU (benchmarks/gpu_smoke.sh).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dist_utils import run_ranks
from test_attention import assert_matches_stock, default_against_stock

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


def _swiglu_against_stock(rank: int, world: int) -> dict:
    """megatron-mile's SwiGLU (the default config) against megatron-core's own unfused GLU
    (``use_te_activation_func`` off)."""
    from megatron_mile import model as mm
    from megatron_mile.swiglu import SwiGLU

    def check_default(config) -> None:
        assert config.use_te_activation_func
        assert mm.block_spec(config, None).layer_specs[0].submodules.mlp.submodules.activation_func is SwiGLU

    return default_against_stock(world, "decoder.layers.0.mlp.linear_fc1.weight", check_default,
                                 use_te_activation_func=False)


def test_swiglu_matches_megatron_core_mlp_at_tp2():
    # TP=2 shards FC1 with stride 2: each rank's output is its own [gate, up] pair.
    assert_matches_stock(run_ranks(_swiglu_against_stock, 2), grad_tolerance=1e-5)
