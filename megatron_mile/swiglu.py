"""SwiGLU on the fused FC1 output, with a backward that writes one gradient tensor.

megatron-core's MLP projects to ``[..., 2f]`` with one GEMM (gate and up halves side by side)
and, unfused, computes

    y = silu(a) * b,    (a, b) = chunk(x, 2, dim=-1),    silu(a) = a * sigmoid(a)

with ``torch.chunk``; autograd's backward of that chunk concatenates the two half-gradients
into a new ``[..., 2f]`` tensor, an extra copy of the largest activation in the layer.
``SwiGLU`` computes the same ``y`` and writes

    dL/da = g * b * silu'(a),    silu'(a) = sigmoid(a) * (1 + a * (1 - sigmoid(a)))
    dL/db = g * silu(a)

straight into the two halves of one ``[..., 2f]`` gradient. It saves ``x`` and ``silu(a)`` for
the backward, as the unfused ``chunk`` -> ``silu`` -> ``mul`` chain does.

It plugs into megatron-core through ``MLPSubmodules.activation_func``, which the MLP applies to
the whole FC1 output when ``TransformerConfig.use_te_activation_func`` is set (megatron-core's
hook for Transformer Engine's activations, which take the fused tensor the same way). It stands
in only where megatron-core's fused SwiGLU (``bias_activation_fusion``, compiled) is off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        silu_a = F.silu(a)
        ctx.save_for_backward(x, silu_a)
        return silu_a * b

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, silu_a = ctx.saved_tensors
        a, b = x.chunk(2, dim=-1)
        grad_x = torch.empty_like(x)
        grad_a, grad_b = grad_x.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * b, a, grad_input=grad_a)
        torch.mul(grad, silu_a, out=grad_b)
        return grad_x


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` for ``x = [a, b]`` along the last dimension."""
    return _SwiGLUFunction.apply(x)


class SwiGLU(MegatronModule):
    """``swiglu`` as megatron-core's MLP activation module (``MLPSubmodules.activation_func``); a
    ``MegatronModule``, so that the MLP's distributed-checkpoint state dict (empty here) walks it."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        if not config.gated_linear_unit or config.activation_func is not F.silu:
            raise ValueError("SwiGLU needs gated_linear_unit=True and activation_func=F.silu")
        if config.activation_func_clamp_value is not None or config.glu_linear_offset != 0.0:
            raise ValueError("SwiGLU supports neither activation_func_clamp_value nor glu_linear_offset")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)
