"""Rotary position embedding written in place, for megatron-core's fused-RoPE slot.

RoPE (non-interleaved, as in LLaMA) pairs dimension ``i`` of each head with ``i + d/2`` and
rotates the pair by the angle ``theta_{p,i}`` of position ``p``. With ``x = [x1, x2]`` split at
``d/2`` and ``freqs = [f1, f2]`` the angles (megatron-core's ``RotaryEmbedding`` gives
``f1 = f2``),

    y1 = x1 * cos(f1) - x2 * sin(f1)
    y2 = x2 * cos(f2) + x1 * sin(f2)

and, the map being linear in ``x``, the backward applies its transpose to the gradient ``g``:

    dL/dx1 = g1 * cos(f1) + g2 * sin(f2)
    dL/dx2 = g2 * cos(f2) - g1 * sin(f1)

megatron-core's unfused RoPE computes ``x * cos + rotate_half(x) * sin`` and concatenates
the result with an empty "pass-through" slice of ``x``. Autograd then adds a full-size copy
for each ``torch.cat`` (forward) and each ``chunk``/slice (backward), and the slices' backward
allocates zero-filled gradients. ``apply_rotary_pos_emb`` writes each half of the output (and
of the gradient) in place with one ``mul`` and one ``addcmul_``, and saves only ``cos`` and
``sin`` (its halves swapped; ``[s, 1, 1, d]`` each) for the backward.

megatron-core calls a fused RoPE through ``rope_utils.fused_apply_rotary_pos_emb`` when
``TransformerConfig.apply_rope_fusion`` is set; Transformer Engine fills that slot when it is
installed. ``fill_megatron_core_rope_slot`` puts ``apply_rotary_pos_emb`` there when it is
empty, so the local spec gets it through megatron-core's own dispatch.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> None:
    """``out1 = x1 cos1 - sign x2 sin1``, ``out2 = x2 cos2 + sign x1 sin2`` (sign -1: the transpose)."""
    h = x.shape[-1] // 2
    x1, x2, out1, out2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, cos[..., :h], out=out1).addcmul_(x2, sin[..., :h], value=-sign)
    torch.mul(x2, cos[..., h:], out=out2).addcmul_(x1, sin[..., h:], value=sign)


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        cos, sin = torch.cos(freqs).to(x.dtype), torch.sin(freqs).to(x.dtype)
        # The transpose takes each half's sine from the other half: [sin2, sin1].
        ctx.save_for_backward(cos, sin.roll(sin.shape[-1] // 2, dims=-1))
        # Contiguous, whatever the strides of x (a view into the fused QKV output).
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _rotate_into(out, x, cos, sin, sign=1.0)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        cos, swapped_sin = ctx.saved_tensors
        grad_x = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        _rotate_into(grad_x, grad, cos, swapped_sin, sign=-1.0)
        return grad_x, None


def apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """RoPE on ``t`` ``[s, b, heads, d]`` with angles ``freqs`` ``[s, 1, 1, d]``: the signature of
    megatron-core's fused-RoPE slot. Rotates every head dimension (``--rotary-percent 1.0``)."""
    if interleaved:
        raise ValueError("megatron-mile's RoPE supports only non-interleaved pairs (rotary_interleaved=False)")
    if freqs.shape[-1] != t.shape[-1] or t.shape[-1] % 2:
        raise ValueError(f"megatron-mile's RoPE rotates whole heads of even size: head dim {t.shape[-1]}, "
                         f"rotary dim {freqs.shape[-1]}")
    return _RotaryFunction.apply(t, freqs)


def fill_megatron_core_rope_slot() -> None:
    """Make ``apply_rotary_pos_emb`` megatron-core's fused RoPE, unless Transformer Engine's is there."""
    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = apply_rotary_pos_emb
