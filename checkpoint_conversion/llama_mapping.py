"""megatron-core GPTModel (LLaMA-style, TP=1 PP=1 state dict) → Hugging Face ``LlamaForCausalLM`` tensors.

Pure tensor bookkeeping, no process groups: the caller hands over a full (unsharded)
state dict. Two layouts differ from Hugging Face's:

* ``linear_qkv`` stacks, per query group, that group's query heads, then its key head,
  then its value head; HF keeps separate q/k/v matrices in head order.
* SwiGLU ``linear_fc1`` is ``[gate; up]``; HF has ``gate_proj`` and ``up_proj``.

RoPE needs no permutation: megatron's non-interleaved rotary rotates the two halves of
each head (``rotate_half``), exactly as HF Llama does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LlamaShape:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    seq_length: int
    vocab_size: int  # the tokenizer's true vocabulary; padded rows are dropped

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _norm_weight(state: dict[str, torch.Tensor], *names: str) -> torch.Tensor:
    """The local spec names norms ``input_layernorm``; TE fuses them into the next linear."""
    for name in names:
        if name in state:
            return state[name]
    raise KeyError(f"none of {', '.join(names)} in the checkpoint's model state")


def split_qkv(qkv: torch.Tensor, shape: LlamaShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, hd = shape.num_query_groups, shape.head_dim
    per_group = shape.num_attention_heads // groups
    grouped = qkv.reshape(groups, per_group + 2, hd, shape.hidden_size)
    q = grouped[:, :per_group].reshape(groups * per_group * hd, shape.hidden_size)
    k = grouped[:, per_group].reshape(groups * hd, shape.hidden_size)
    v = grouped[:, per_group + 1].reshape(groups * hd, shape.hidden_size)
    return q, k, v


def to_hf_state_dict(state: dict[str, torch.Tensor], shape: LlamaShape) -> dict[str, torch.Tensor]:
    """HF Llama tensor names → tensors (contiguous, so safetensors can write them)."""
    out = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"][: shape.vocab_size],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
        "lm_head.weight": state["output_layer.weight"][: shape.vocab_size],
    }
    for i in range(shape.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(state[src + "self_attention.linear_qkv.weight"], shape)
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({
            dst + "input_layernorm.weight": _norm_weight(
                state, src + "input_layernorm.weight", src + "self_attention.linear_qkv.layer_norm_weight"),
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": state[src + "self_attention.linear_proj.weight"],
            dst + "post_attention_layernorm.weight": _norm_weight(
                state, src + "pre_mlp_layernorm.weight", src + "mlp.linear_fc1.layer_norm_weight"),
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": state[src + "mlp.linear_fc2.weight"],
        })
    return {name: tensor.contiguous() for name, tensor in out.items()}


def hf_config(shape: LlamaShape, dtype: torch.dtype, bos_token_id: int | None,
              eos_token_id: int | None) -> dict:
    """config.json for ``LlamaForCausalLM``; the recipe's fixed choices (eps, RoPE base) are written out."""
    rope_theta = 10000.0
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.ffn_hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_query_groups,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.seq_length,
        "rms_norm_eps": 1e-5,
        # transformers < 5 reads rope_theta, >= 5 rope_parameters; both say the same.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.01,
        "vocab_size": shape.vocab_size,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
