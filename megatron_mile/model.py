"""Model presets and the megatron-core GPTModel builder (LLaMA-style).

Every preset is a LLaMA: RMSNorm (eps 1e-5), SwiGLU MLP, RoPE (base 10000), multi-head
attention, untied input and output embeddings, no biases, and N(0, 0.01) initialisation
of every matrix, the paper's Hugging Face ``initializer_range`` (so no depth-scaled init on
the output projections). Grouped-query attention, another RoPE base or RMSNorm epsilon
(as in published Llama checkpoints) are overrides on top of a preset.

Initialisation is *layout invariant*: every logical weight element gets its value from a
generator keyed by (seed, global parameter name), and each rank copies out its own
TP/PP shard. The same seed therefore gives the same model at TP=1, TP=2, PP=2, …,
which is what lets runs at different layouts be compared step for step.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import time
import zlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_mile import rope
from megatron_mile.attention import SDPAttention
from megatron_mile.swiglu import SwiGLU

INIT_STD = 0.01
NORM_EPSILON = 1e-5
ROTARY_BASE = 10000
VOCAB_PAD_MULTIPLE = 128  # --make-vocab-size-divisible-by's default (Megatron-LM's)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """The architecture: sizes, plus the attention grouping, RoPE base and norm epsilon."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    seq_length: int
    num_query_groups: int | None = None  # key/value heads; None: one per query head
    rotary_base: int = ROTARY_BASE
    norm_epsilon: float = NORM_EPSILON

    @property
    def query_groups(self) -> int:
        """Key/value heads, each shared by ``num_attention_heads / query_groups`` query heads."""
        return self.num_query_groups or self.num_attention_heads


# The paper's architectures (reference model_config_*.json), plus a few-MB CPU model.
PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=176, seq_length=128),
    "468M": ModelShape(num_layers=24, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=4096, seq_length=1024),
    "1.2B": ModelShape(num_layers=16, hidden_size=2048, num_attention_heads=8, ffn_hidden_size=8192, seq_length=1024),
    "6.7B": ModelShape(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008, seq_length=2048),
}


def resolve_shape(preset: str, **overrides: int | None) -> ModelShape:
    """A preset with explicit ``--num-layers``-style values (not None) on top."""
    if preset not in PRESETS:
        raise ValueError(f"--model-preset: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int, divisible_by: int = VOCAB_PAD_MULTIPLE,
                      ) -> int:
    """The embedding rows: the vocabulary padded to a multiple of ``divisible_by`` × TP
    (``--make-vocab-size-divisible-by``, as Megatron-LM), so every TP shard is aligned."""
    multiple = divisible_by * tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def fused_softmax_kernels_available() -> bool:
    return all(importlib.util.find_spec(name) is not None
               for name in ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda"))


def fused_swiglu_compiles(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether megatron-core's fused SwiGLU (``bias_activation_fusion``) compiles and runs here.

    megatron-core builds it with ``torch.compile`` (Inductor, with Triton kernels on CUDA), which
    compiles at the first call. Running it once, forward and backward, on a small tensor moves that
    compilation before training (out of the first timed step) and turns a compiler failure into
    the unfused activation and one warning, instead of a crash at the first step. Logs which path
    is used.
    """
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    start = time.perf_counter()
    try:
        x = torch.randn(16, 256, device=device, dtype=dtype, requires_grad=True)
        bias_swiglu_impl(x, None).sum().backward()
    except Exception as exc:  # Dynamo, Inductor and Triton raise many types; any of them means: don't fuse
        exc = getattr(exc, "inner_exception", None) or exc  # Dynamo wraps the compiler's own error
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        log.warning("SwiGLU: unfused (torch.compile failed: %s: %s)", type(exc).__name__, reason)
        return False
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        log.info("SwiGLU: fused with torch.compile (compiled and ran in %.1f s)", time.perf_counter() - start)
    return True


def optional_kernels(config: TransformerConfig) -> dict[str, str]:
    """The optional fused kernels this model uses, or what stands in for them (the trainer logs it)."""
    te = transformer_engine_available()
    return {
        "layers": "Transformer Engine" if te else "megatron-core local (no Transformer Engine)",
        "attention": "Transformer Engine DotProductAttention" if te else "torch scaled_dot_product_attention",
        # Without TE the softmax runs inside SDPA's kernel; TE's own attention fuses it too.
        "softmax": "fused into the attention kernel",
        "SwiGLU": ("fused (torch.compile)" if config.bias_activation_fusion
                   else "megatron-mile's, one-copy backward" if config.use_te_activation_func else "unfused"),
        "RoPE": "megatron-mile's, in place" if config.apply_rope_fusion and not te else "megatron-core's unfused",
    }


def build_transformer_config(shape: ModelShape, *, tp: int = 1, pp: int = 1, vp: int | None = None,
                             sequence_parallel: bool = False, bf16: bool = False,
                             recompute_activations: bool = False, bias_swiglu_fusion: bool = True,
                             rope_fusion: bool = True) -> TransformerConfig:
    """megatron-core's config for ``shape``; the RoPE base goes to the model (``build_model_chunks``)."""
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if bf16 else torch.float32
    init = torch.nn.init.normal_
    fused_swiglu = bias_swiglu_fusion and on_gpu and fused_swiglu_compiles(torch.device("cuda"), dtype)
    te = transformer_engine_available()
    # Transformer Engine's layers keep megatron-core's RoPE; without TE, megatron_mile/rope.py's
    # version fills megatron-core's fused-RoPE slot, before the config's validation checks it.
    local_rope_fusion = rope_fusion and not te
    if local_rope_fusion:
        rope.fill_megatron_core_rope_slot()
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.query_groups,
        ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_epsilon,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method=lambda w: init(w, mean=0.0, std=INIT_STD),
        output_layer_init_method=lambda w: init(w, mean=0.0, std=INIT_STD),
        init_method_std=INIT_STD,
        # megatron's own init also tags the TP attributes (partition_dim, …) that grad-norm
        # and the optimizer rely on; `initialize_weights` then redraws layout-invariantly.
        perform_initialization=True,
        use_cpu_initialization=not on_gpu,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        sequence_parallel=sequence_parallel and tp > 1,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        # Fused kernels exist only on CUDA; the softmax one is a compiled extension (apex or
        # Megatron-LM's kernels) that megatron-core imports only when a bf16 shape qualifies.
        bias_activation_fusion=fused_swiglu,
        # megatron-core's hook for an activation module on the whole FC1 output: ``block_spec``
        # puts megatron-mile's SwiGLU (one-copy backward, megatron_mile/swiglu.py) there when
        # the fused one is off.
        use_te_activation_func=not fused_swiglu and not te,
        masked_softmax_fusion=on_gpu and fused_softmax_kernels_available(),
        apply_rope_fusion=local_rope_fusion,
        gradient_accumulation_fusion=False,
        persist_layer_norm=on_gpu,
        # `batch_p2p_sync` wraps p2p in torch.cuda.synchronize(); gloo has nothing to sync.
        batch_p2p_sync=on_gpu,
        deallocate_pipeline_outputs=True,
        recompute_granularity="full" if recompute_activations else None,
        recompute_method="uniform" if recompute_activations else None,
        recompute_num_layers=1 if recompute_activations else None,
    )


class LocalRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm behind megatron-core's norm interface, usable with sequence parallelism.

    megatron-core's own torch-norm wrapper refuses sequence parallelism because nothing
    marks its weight: under SP each TP rank sees a different slice of the sequence, so the
    norm weights' grads are partial sums. Tagging ``weight.sequence_parallel`` makes
    ``finalize_model_grads`` all-reduce them over the TP group (as apex's and TE's norms do).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = NORM_EPSILON, **_unused_fused_options):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def block_spec(config: TransformerConfig, vp_stage: int | None, core_attention: type = SDPAttention):
    """The decoder spec: Transformer Engine's layers (fused kernels, flash attention) on CUDA
    when installed, otherwise megatron-core's local layers with ``LocalRMSNorm`` and
    ``core_attention``: ``SDPAttention`` (torch's fused attention kernels), or for comparisons
    megatron-core's ``DotProductAttention``."""
    from megatron.core.models.gpt import gpt_layer_specs

    if transformer_engine_available():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    layer = gpt_layer_specs.get_gpt_layer_local_spec(normalization=config.normalization)
    attention = layer.submodules.self_attention
    attention = replace(attention, submodules=replace(attention.submodules, core_attention=core_attention))
    mlp = layer.submodules.mlp
    if config.use_te_activation_func:
        mlp = replace(mlp, submodules=replace(mlp.submodules, activation_func=SwiGLU))
    layer = replace(layer, submodules=replace(layer.submodules, input_layernorm=LocalRMSNorm,
                                              self_attention=attention, pre_mlp_layernorm=LocalRMSNorm, mlp=mlp))
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=LocalRMSNorm)


class LoopLossGPTModel(GPTModel):
    """megatron-core's GPTModel for a loss computed in the training loop: given ``labels``, the
    last stage returns its logits as the output layer made them, ``[s, b, V/tp]``.

    Without labels GPTModel transposes the logits to ``[b, s, V/tp]`` with a copy, and that
    transpose's backward costs two more in the output layer (its input-gradient matmul and its
    weight gradient each want a contiguous ``[s, b, V/tp]`` gradient): three logits-sized
    copies per micro-batch. With labels it hands the logits to ``compute_language_model_loss``,
    which here passes them on; the loop's loss takes labels and mask as ``[s, b]``. Called
    without labels the model behaves exactly as GPTModel (``[b, s, V/tp]``).
    """

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits


def build_model_chunks(config: TransformerConfig, vocab_size: int, seq_length: int, seed: int,
                       device: torch.device, vocab_divisible_by: int = VOCAB_PAD_MULTIPLE,
                       rotary_base: int = ROTARY_BASE) -> list[GPTModel]:
    """This rank's GPTModel chunks (one, or one per virtual stage with interleaving), with the
    vocabulary padded as ``padded_vocab_size`` says."""
    tp = config.tensor_model_parallel_size
    vp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp or 1):
        stage = vp_stage if vp else None
        model = LoopLossGPTModel(
            config=config,
            transformer_layer_spec=block_spec(config, stage),
            vocab_size=padded_vocab_size(vocab_size, tp, vocab_divisible_by),
            max_sequence_length=seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=vp is None, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=vp is None, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=rotary_base,
            vp_stage=stage,
        )
        model.to(device)
        initialize_weights(model, seed, vocab_size)
        chunks.append(model)
    return chunks


# ----------------------------------------------------------------- layout-invariant init

_LAYER_PREFIX = re.compile(r"^decoder\.layers\.(\d+)\.")


def _global_names(model: GPTModel) -> dict[str, torch.nn.Parameter]:
    """Parameters keyed by a name that is the same at every TP/PP/VP layout."""
    layer_numbers = {}
    for name, module in model.named_modules():
        if isinstance(module, TransformerLayer):
            layer_numbers[name] = module.layer_number - 1
    named = {}
    for name, param in model.named_parameters():
        match = _LAYER_PREFIX.match(name)
        if match:
            global_layer = layer_numbers[f"decoder.layers.{match.group(1)}"]
            name = f"decoder.layers.{global_layer}.{name[match.end():]}"
        named[name] = param
    return named


def _local_rows(full: torch.Tensor, dim: int, rank: int, world: int, gated: bool) -> torch.Tensor:
    """This TP rank's slice of a full weight; SwiGLU fc1 holds [gate_r; up_r] per rank.

    The fused QKV weight lists, per query group, its query heads, key and value, so a
    contiguous row slice is whole groups: the same layout at every TP that divides them.
    """
    if not gated:
        return full.chunk(world, dim=dim)[rank]
    gate, up = full.chunk(2, dim=dim)
    return torch.cat([gate.chunk(world, dim=dim)[rank], up.chunk(world, dim=dim)[rank]], dim=dim)


@torch.no_grad()
def initialize_weights(model: GPTModel, seed: int, vocab_size: int) -> None:
    """Draw every matrix from N(0, INIT_STD) keyed by (seed, global name); norms start at 1.

    Embedding and output rows past the true vocabulary are padding and start at 0.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in _global_names(model).items():
        if param.dim() == 1:  # RMSNorm scales
            param.fill_(1.0)
            continue
        sharded = getattr(param, "tensor_model_parallel", False)
        dim = param.partition_dim if sharded else 0
        full_shape = list(param.shape)
        if sharded:
            full_shape[dim] *= tp
        is_vocab = name in ("embedding.word_embeddings.weight", "output_layer.weight")
        drawn_shape = list(full_shape)
        if is_vocab:
            drawn_shape[0] = vocab_size
        device = param.device
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = torch.zeros(full_shape, dtype=torch.float32, device=device)
        full[: drawn_shape[0]] = torch.randn(drawn_shape, generator=generator, device=device) * INIT_STD
        local = _local_rows(full, dim, tp_rank, tp, gated=name.endswith("mlp.linear_fc1.weight")) if sharded else full
        param.copy_(local.to(param.dtype))


def attention_weights(shape: ModelShape) -> int:
    """One layer's attention projections: Q and O are h x h, K and V are h x g*d (g groups of d = h/heads)."""
    h = shape.hidden_size
    kv_width = shape.query_groups * (h // shape.num_attention_heads)
    return 2 * h * h + 2 * h * kv_width


def count_parameters(shape: ModelShape, vocab_size: int) -> int:
    """Total parameters (untied embeddings, SwiGLU, RMSNorm, no biases)."""
    h, f, layers = shape.hidden_size, shape.ffn_hidden_size, shape.num_layers
    per_layer = attention_weights(shape) + 3 * h * f + 2 * h
    return layers * per_layer + h + 2 * vocab_size * h
