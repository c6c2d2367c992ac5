"""megatron-core GPTModel (LLaMA-style, TP=1 PP=1 state dict) ↔ Hugging Face ``LlamaForCausalLM``.

Tensor and config bookkeeping, no process groups: the callers hand over full (unsharded)
tensors. Both directions come from one table, ``tensor_map``: each entry names a megatron
tensor, the HF tensors it holds, and how they split and fuse. Two layouts differ from
Hugging Face's:

* ``linear_qkv`` stacks, per query group, that group's query heads, then its key head,
  then its value head; HF keeps separate q/k/v matrices in head order (query head ``i``
  belongs to group ``i // (heads / groups)``, as in HF's ``repeat_kv``).
* SwiGLU ``linear_fc1`` is ``[gate; up]``; HF has ``gate_proj`` and ``up_proj``.

RoPE needs no permutation: megatron's non-interleaved rotary rotates the two halves of
each head (``rotate_half``), exactly as HF Llama does. megatron pads the vocabulary rows
of the embedding and output layer; HF holds the true vocabulary only.

``hf_config`` and ``shape_from_hf_config`` are the config's two directions; the latter
refuses, in one line naming the field, any Llama variant this model would compute
differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Container, Iterable

import torch

from megatron_mile.model import ModelShape


@dataclass(frozen=True)
class LlamaShape:
    """A megatron-mile ``ModelShape`` with the true vocabulary size: what both formats need."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    seq_length: int
    vocab_size: int  # the tokenizer's true vocabulary; padded rows are dropped
    rotary_base: int
    norm_epsilon: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def of(cls, shape: ModelShape, vocab_size: int) -> LlamaShape:
        return cls(num_layers=shape.num_layers, hidden_size=shape.hidden_size,
                   num_attention_heads=shape.num_attention_heads, num_query_groups=shape.query_groups,
                   ffn_hidden_size=shape.ffn_hidden_size, seq_length=shape.seq_length, vocab_size=vocab_size,
                   rotary_base=shape.rotary_base, norm_epsilon=shape.norm_epsilon)

    def model_shape(self) -> ModelShape:
        return ModelShape(num_layers=self.num_layers, hidden_size=self.hidden_size,
                          num_attention_heads=self.num_attention_heads, ffn_hidden_size=self.ffn_hidden_size,
                          seq_length=self.seq_length, num_query_groups=self.num_query_groups,
                          rotary_base=self.rotary_base, norm_epsilon=self.norm_epsilon)


class UnsupportedLlama(ValueError):
    """A Hugging Face checkpoint this model cannot reproduce; the message is one line naming the field or tensor."""


# ------------------------------------------------------------------------- tensors


def split_qkv(qkv: torch.Tensor, shape: LlamaShape) -> list[torch.Tensor]:
    """Fused ``linear_qkv`` → [q, k, v] in HF's head order."""
    per_group = shape.num_attention_heads // shape.num_query_groups
    grouped = qkv.reshape(shape.num_query_groups, per_group + 2, shape.head_dim, shape.hidden_size)
    return [part.reshape(-1, shape.hidden_size) for part in grouped.split([per_group, 1, 1], dim=1)]


def fuse_qkv(parts: list[torch.Tensor], shape: LlamaShape) -> torch.Tensor:
    """[q, k, v] in HF's head order → fused ``linear_qkv`` (the inverse of ``split_qkv``)."""
    grouped = [part.reshape(shape.num_query_groups, -1, shape.head_dim, shape.hidden_size) for part in parts]
    return torch.cat(grouped, dim=1).reshape(-1, shape.hidden_size)


@dataclass(frozen=True)
class TensorPair:
    megatron: tuple[str, ...]  # names the model may use: the local spec's first (TE fuses norms into the next linear)
    hf: tuple[str, ...]  # the HF tensors it holds, in fused order
    split: Callable[[torch.Tensor], list[torch.Tensor]] = lambda tensor: [tensor]
    fuse: Callable[[list[torch.Tensor]], torch.Tensor] = lambda parts: parts[0]
    vocab_rows: bool = False  # megatron's rows past the true vocabulary are padding


def tensor_map(shape: LlamaShape) -> list[TensorPair]:
    """Every weight: the embedding, each layer's norms, attention and MLP, the final norm, the output layer."""
    pairs = [TensorPair(("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",), vocab_rows=True)]
    for i in range(shape.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        pairs += [
            TensorPair((src + "input_layernorm.weight", src + "self_attention.linear_qkv.layer_norm_weight"),
                       (dst + "input_layernorm.weight",)),
            TensorPair((src + "self_attention.linear_qkv.weight",),
                       tuple(dst + f"self_attn.{p}_proj.weight" for p in "qkv"),
                       split=lambda qkv: split_qkv(qkv, shape), fuse=lambda parts: fuse_qkv(parts, shape)),
            TensorPair((src + "self_attention.linear_proj.weight",), (dst + "self_attn.o_proj.weight",)),
            TensorPair((src + "pre_mlp_layernorm.weight", src + "mlp.linear_fc1.layer_norm_weight"),
                       (dst + "post_attention_layernorm.weight",)),
            TensorPair((src + "mlp.linear_fc1.weight",), (dst + "mlp.gate_proj.weight", dst + "mlp.up_proj.weight"),
                       split=lambda fc1: list(fc1.chunk(2, dim=0)), fuse=torch.cat),
            TensorPair((src + "mlp.linear_fc2.weight",), (dst + "mlp.down_proj.weight",)),
        ]
    pairs += [TensorPair(("decoder.final_layernorm.weight",), ("model.norm.weight",)),
              TensorPair(("output_layer.weight",), ("lm_head.weight",), vocab_rows=True)]
    return pairs


def _present(names: tuple[str, ...], available: Container[str]) -> str:
    for name in names:
        if name in available:
            return name
    raise KeyError(f"none of {', '.join(names)} in the model's state")


def to_hf_state_dict(state: dict[str, torch.Tensor], shape: LlamaShape) -> dict[str, torch.Tensor]:
    """HF Llama tensor names → tensors (contiguous, so safetensors can write them)."""
    out: dict[str, torch.Tensor] = {}
    for pair in tensor_map(shape):
        tensor = state[_present(pair.megatron, state)]
        if pair.vocab_rows:
            tensor = tensor[: shape.vocab_size]
        out.update(zip(pair.hf, pair.split(tensor)))
    return {name: tensor.contiguous() for name, tensor in out.items()}


@torch.no_grad()
def load_hf_tensors(read: Callable[[str], torch.Tensor], shape: LlamaShape, params: dict[str, torch.Tensor],
                    pairs: Iterable[TensorPair] | None = None) -> None:
    """Fill a TP=1 model's parameters (``params``, by name) from HF tensors, ``read(name)``.

    Padded vocabulary rows become 0, as they start in training. ``pairs`` defaults to the
    whole ``tensor_map`` (pass it wrapped in a progress bar to show progress).
    """
    for pair in tensor_map(shape) if pairs is None else pairs:
        target = params[_present(pair.megatron, params)]
        rows = shape.vocab_size if pair.vocab_rows else target.shape[0]
        parts = [read(name) for name in pair.hf]
        for name, part, expected in zip(pair.hf, parts, pair.split(target[:rows])):
            if part.shape != expected.shape:
                raise UnsupportedLlama(f"{name}: shape {tuple(part.shape)}, but config.json implies "
                                       f"{tuple(expected.shape)}")
        target[:rows].copy_(pair.fuse(parts))
        target[rows:].zero_()


# ------------------------------------------------------------------------- config


def hf_config(shape: LlamaShape, dtype: torch.dtype, bos_token_id: int | None,
              eos_token_id: int | None) -> dict:
    """config.json for ``LlamaForCausalLM``."""
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
        "rms_norm_eps": shape.norm_epsilon,
        # transformers < 5 reads rope_theta, >= 5 rope_parameters; both say the same.
        "rope_theta": float(shape.rotary_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(shape.rotary_base)},
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


def shape_from_hf_config(raw: dict[str, Any], source: str) -> tuple[LlamaShape, bool]:
    """The model a Hugging Face ``config.json`` describes, and whether its embeddings are tied.

    Fields the file leaves out take transformers' ``LlamaConfig`` defaults. Refused, naming
    the field: another architecture, biases, RoPE scaling or partial rotary, a head
    dimension other than hidden / heads, an activation other than SiLU.
    """
    def refuse(field: str, value: Any, why: str) -> UnsupportedLlama:
        return UnsupportedLlama(f"{source}: {field} = {value!r}: {why}")

    if raw.get("model_type") != "llama":
        raise refuse("model_type", raw.get("model_type"), "only Llama (model_type llama) can be imported")
    if raw.get("architectures") not in (None, ["LlamaForCausalLM"]):
        raise refuse("architectures", raw["architectures"], "only LlamaForCausalLM can be imported")
    from transformers import LlamaConfig

    config = LlamaConfig.from_dict(raw).to_dict()
    for field in ("attention_bias", "mlp_bias"):
        if config.get(field):
            raise refuse(field, config[field], "megatron-mile's Llama has no biases")
    if config["hidden_act"] != "silu":
        raise refuse("hidden_act", config["hidden_act"], "megatron-mile's MLP is SwiGLU (silu)")
    # transformers >= 5 gathers the RoPE settings in rope_parameters; older versions keep
    # rope_theta and rope_scaling apart.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise refuse("rope_parameters.rope_type (rope_scaling)", rope_type, "only plain RoPE is implemented")
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise refuse("partial_rotary_factor", partial, "megatron-mile rotates the whole head")
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta != int(theta):
        raise refuse("rope_theta", theta, "--rotary-base takes an integer (as in Megatron-LM)")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if hidden % heads:
        raise refuse("num_attention_heads", heads, f"does not divide hidden_size {hidden}")
    if config.get("head_dim") not in (None, hidden // heads):
        raise refuse("head_dim", config["head_dim"], f"megatron-mile uses hidden_size / num_attention_heads = "
                                                     f"{hidden // heads}")
    groups = config.get("num_key_value_heads") or heads
    if heads % groups:
        raise refuse("num_key_value_heads", groups, f"does not divide num_attention_heads {heads}")
    shape = LlamaShape(num_layers=config["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
                       num_query_groups=groups, ffn_hidden_size=config["intermediate_size"],
                       seq_length=config["max_position_embeddings"], vocab_size=config["vocab_size"],
                       rotary_base=int(theta), norm_epsilon=config["rms_norm_eps"])
    return shape, bool(config.get("tie_word_embeddings"))
