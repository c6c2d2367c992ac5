"""Core attention for megatron-core's local layer spec, on torch's fused SDPA kernels.

megatron-core 0.16.1's local ``DotProductAttention`` forms the ``[b, heads, s, s]`` score
matrix, softmaxes it (unfused unless apex/Megatron kernels are importable) and keeps the
probabilities for the backward. ``SDPAttention`` computes the same

    out = softmax(scale * q k^T + causal mask) v

with ``torch.nn.functional.scaled_dot_product_attention``: causal by ``is_causal=True``
(no mask tensor), through the flash or memory-efficient kernels on CUDA and the fused
flash kernel on CPU, none of which keep an ``s x s`` matrix for the backward.

It is a drop-in for ``DotProductAttention`` in ``SelfAttentionSubmodules.core_attention``:
the same constructor and forward signature, the ``[s, b, heads, head_dim]`` inputs and
``[s, b, heads * head_dim]`` output of this tensor-parallel rank's heads, grouped-query
attention (``num_query_groups`` < heads: each group's K/V head serves
``heads / groups`` consecutive query heads, as megatron's ``repeat_interleave`` does),
and ``attention_dropout`` in training mode, drawn under the model-parallel RNG tracker
unless sequence parallelism is on, as megatron-core does.

Scale: ``softmax_scale``, by default ``1/sqrt(head_dim)``. ``apply_query_key_layer_scaling``
does not change it: megatron divides the scores by the layer number and multiplies them back
inside the fp32 softmax, which only keeps a materialised fp16 score matrix in range; the
fused kernels never form one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    """``DotProductAttention``'s interface on ``F.scaled_dot_product_attention``."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: ProcessGroupCollection | None = None):
        super().__init__(config=config)
        unsupported = {"context parallelism": config.context_parallel_size > 1,
                       "sliding-window attention": config.window_size is not None,
                       f"softmax_type {config.softmax_type!r}": config.softmax_type != "vanilla"}
        for feature, used in unsupported.items():
            if used:
                raise ValueError(f"SDPAttention does not support {feature}; use Transformer Engine's spec")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
        """``query`` ``[sq, b, heads, d]``, ``key``/``value`` ``[sk, b, groups, d]`` →
        ``[sq, b, heads * d]``. ``attention_mask`` (bool, True = masked out, as in
        megatron-core) replaces the causal mask when given."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention_bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        is_causal = attention_mask is None and mask_type == AttnMaskType.causal and query.size(0) > 1
        sq, b = query.shape[:2]
        # [s, b, h, d] -> [b, h, s, d]: strided views, which the kernels accept.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0

        def attend() -> torch.Tensor:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if attention_mask is None else ~attention_mask, dropout_p=dropout_p,
                is_causal=is_causal, scale=self.softmax_scale, enable_gqa=k.size(1) != q.size(1))

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # Each TP rank holds different heads: draw their dropout from the model-parallel stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        # [b, h, sq, d] -> [sq, b, h * d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)
