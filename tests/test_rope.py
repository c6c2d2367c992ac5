"""megatron-mile's RoPE: the rotation in float64, and stock megatron-core's unfused RoPE in a GPTModel.

MEGATRON_MILE_TEST_DEVICE=cuda runs the float64 check's RoPE on a GPU (benchmarks/gpu_smoke.sh).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dist_utils import run_ranks
from test_attention import assert_matches_stock, default_against_stock

from megatron_mile.rope import apply_rotary_pos_emb

DEVICE = torch.device(os.environ.get("MEGATRON_MILE_TEST_DEVICE", "cpu"))


def _reference(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Each pair (x_i, x_{i+d/2}) rotated: by angle f1_i in the first output half, f2_i in the second."""
    h = x.shape[-1] // 2
    x1, x2, f1, f2 = x[..., :h], x[..., h:], freqs[..., :h], freqs[..., h:]
    return torch.cat((x1 * torch.cos(f1) - x2 * torch.sin(f1), x2 * torch.cos(f2) + x1 * torch.sin(f2)), dim=-1)


def test_rope_matches_the_float64_rotation_and_its_transpose():
    s, b, heads, d = 12, 3, 2, 16
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(s, b, heads, 3 * d, generator=g).to(DEVICE).requires_grad_()
    positions = torch.arange(s, dtype=torch.float64)
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(positions, theta)
    cases = {"LLaMA angles": torch.cat((angles, angles), dim=-1),
             # Halves with their own angles: the transpose must take each sine from the right half.
             "independent halves": torch.rand(s, d, generator=g, dtype=torch.float64) * 6}
    upstream = torch.randn(s, b, heads, d, generator=g)
    for name, freqs in cases.items():
        freqs = freqs[:, None, None, :]
        fused.grad = None
        x = fused[..., d:2 * d]  # a query-like view into a fused QKV output: not contiguous
        y = apply_rotary_pos_emb(x, freqs.float().to(DEVICE))
        y.backward(upstream.to(DEVICE))
        y, grad = y.detach().cpu().double(), fused.grad.cpu().double()

        x64 = x.detach().cpu().double().requires_grad_()
        expected = _reference(x64, freqs)
        expected.backward(upstream.double())
        np.testing.assert_allclose(y, expected.detach(), rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(grad[..., d:2 * d], x64.grad, rtol=1e-5, atol=1e-6, err_msg=name)
        assert not grad[..., :d].any() and not grad[..., 2 * d:].any()


def _rope_against_stock(rank: int, world: int) -> dict:
    """megatron-mile's RoPE (the default config) against megatron-core's unfused one."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_mile import rope

    def check_default(config) -> None:
        assert config.apply_rope_fusion and rope_utils.fused_apply_rotary_pos_emb is rope.apply_rotary_pos_emb

    return default_against_stock(world, "decoder.layers.0.self_attention.linear_qkv.weight", check_default,
                                 apply_rope_fusion=False)


def test_rope_matches_megatron_core_unfused_rope_at_tp2():
    # fp32 rounding (addcmul_ rounds once where the unfused ops round twice), amplified by
    # _loss_and_grads' sharp attention: about 2e-5 of each gradient's max.
    assert_matches_stock(run_ranks(_rope_against_stock, 2), grad_tolerance=1e-4)
