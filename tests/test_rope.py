"""megatron-mile's RoPE: the rotation in float64, and stock megatron-core's unfused RoPE in a GPTModel.

MEGATRON_MILE_TEST_DEVICE=cuda runs the float64 check's RoPE on a GPU (benchmarks/gpu_smoke.sh).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dist_utils import run_ranks
from test_attention import _loss_and_grads

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


def _against_stock_rope(rank: int, world: int) -> dict:
    """Loss and gradients of a GPTModel with megatron-mile's RoPE (the default config) and with
    megatron-core's unfused one (``apply_rope_fusion`` off), from the same weights."""
    from dataclasses import replace

    from megatron.core.models.common.embeddings import rope_utils

    from megatron_mile import model as mm
    from megatron_mile import rope
    from megatron_mile import runtime
    from megatron_mile.attention import SDPAttention
    from test_attention import MBS, SEQ, VOCAB

    runtime.initialize(world, 1, seed=5)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
    config = mm.build_transformer_config(mm.PRESETS["tiny"], tp=world)
    assert config.apply_rope_fusion and rope_utils.fused_apply_rotary_pos_emb is rope.apply_rotary_pos_emb
    loss, grads = _loss_and_grads(config, SDPAttention, tokens, labels)
    stock_loss, stock_grads = _loss_and_grads(replace(config, apply_rope_fusion=False), SDPAttention, tokens, labels)
    runtime.shutdown()
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    return {"loss": loss, "stock_loss": stock_loss, "qkv_grad": float(np.abs(stock_grads[qkv]).max()),
            "grad_diff": {name: float(np.abs(grads[name] - ref).max() / np.abs(ref).max())
                          for name, ref in stock_grads.items()}}


def test_rope_matches_megatron_core_unfused_rope_at_tp2():
    for result in run_ranks(_against_stock_rope, 2):
        np.testing.assert_allclose(result["loss"], result["stock_loss"], rtol=1e-6)
        worst = max(result["grad_diff"].items(), key=lambda item: item[1])
        # fp32 rounding (addcmul_ rounds once where the unfused ops round twice), amplified by
        # _loss_and_grads' sharp attention: about 2e-5 of each gradient's max.
        assert worst[1] < 1e-4, f"gradient of {worst[0]} differs by {worst[1]:.2e} of its max"
        assert result["qkv_grad"] > 1e-4
