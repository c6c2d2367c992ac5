"""Activation memory: what one transformer layer keeps for its backward pass, and how many
micro-batches' worth a pipeline stage holds at its peak.

Notation (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models"): sequence length s, micro-batch b, hidden h, heads a, query groups g, FFN width f,
tensor-parallel size t; n = s·b·h. Activations are bf16 (2 bytes an element). A tensor that
every TP rank holds in full is divided by r = t under sequence parallelism (SP shards it
along the sequence) and by r = 1 without; a tensor produced inside a TP-split GEMM is
divided by t either way.

**The paper's GPT block** (LayerNorm, GeLU MLP with f = 4h, dropout, attention softmax
through megatron's fused kernel), per layer, in bytes:

    attention: LayerNorm input 2n/r, QKV GEMM input 2n/r, Q and K 4n/t, V 2n/t,
               softmax output 2as²b/t, its dropout mask as²b/t and output 2as²b/t,
               projection input 2n/t, dropout mask n/r                 → 11n + 5as²b at t = r = 1
    MLP:       LayerNorm input 2n/r, fc1 input 2n/r, GeLU input 8n/t (= 2sbf/t),
               GeLU output 8n/t, dropout mask n/r                      → 19n
    total:     sbh(34 + 5as/h) at t = 1; sbh(10 + 24/t + 5as/(ht)) with TP;
               sbh/t (34 + 5as/h) with SP; 34sbh/t with SP and selective recomputation
               (the s² terms are recomputed); 2sbh with full recomputation (only the
               layer input is kept; 2sbh/t under SP, where the kept input is the shard).

**This project's LLaMA block** (megatron-core GPTModel: RMSNorm, SwiGLU, RoPE, no dropout)
maps onto the same terms:

- no dropout: the three dropout terms vanish (hidden_dropout = attention_dropout = 0, and
  torch's dropout at p = 0 returns its input without a mask);
- RMSNorm keeps its input like LayerNorm (2n/r; its per-token fp32 statistic, 4sb/r bytes,
  is left out as the paper leaves LayerNorm's out: 2/h of one term);
- RoPE keeps nothing: its backward multiplies by the fixed cos/sin tables;
- SwiGLU: fc1 produces gate and up, ``[s, b, 2f/t]``; megatron's fused SwiGLU (used on GPU,
  ``bias_activation_fusion``) keeps that input, 4sbf/t, and fc2 keeps the product,
  2sbf/t: 6sbf/t where GeLU keeps 4sbf/t;
- grouped-query attention: K and V have g heads, 2n(g/a)/t each, with flash attention;
  megatron-core's local attention repeats them to a heads first and keeps the copies (2n/t);
- the s² terms depend on the attention kernel:
    ``flash`` (Transformer Engine's flash / cuDNN attention, the default on GPU with TE):
      no s² tensor; the kernel keeps Q, K, V, its output (the projection input, counted
      there) and a fp32 log-sum-exp per row and head: 4asb/t;
    ``local`` (megatron-core's DotProductAttention without the fused-softmax kernels, i.e.
      without TE and apex): softmax in fp32 keeps its fp32 output (4as²b/t) and the probs·V
      GEMM keeps the bf16 copy (2as²b/t): 6as²b/t;
    ``fused-softmax`` (the paper's kernel): one bf16 softmax output shared by the softmax
      backward and the GEMM: 2as²b/t, plus the dropout terms above when there is dropout.

So, without recomputation, the LLaMA layer keeps

    n(8/r + (4 + 4g/a)/t) + 6sbf/t + 4asb/t       (flash)
    n(8/r + 8/t) + 6sbf/t + 6as²b/t                (local)

Selective recomputation (megatron-core's ``core_attn``) recomputes the attention kernel,
keeping Q, K, V: it drops exactly the s² terms (flash: the log-sum-exp). Full
recomputation keeps the layer input, 2n/r, and while one layer is recomputed during the
backward its full activations are alive again: one layer's worth per stage on top.

**Pipeline stages.** With PP = p, m micro-batches and vp model chunks per rank, pipeline
rank k holds at its peak, in chunk-forwards of L/(p·vp) layers each (megatron-core
``get_pp_rank_microbatches``: warm-up forwards plus the one in the steady state):

    no pipelining:   1 (each micro-batch's backward follows its forward)
    1F1B:            min(p − k, m)                        (first stage: p micro-batches)
    interleaved:     min(2(p − k − 1) + (vp − 1)·p + 1, m·vp)

so the first stage holds L(1 + (p − 1)/(p·vp)) layers' activations with interleaving,
the paper's figure. The last stage adds, for its one in-flight micro-batch, the final
norm's input and the output layer's input (2n/r each) and the logits: the loss works in
place on them (``megatron_mile.loss``, ``inplace=True``), so one bf16 buffer
``[s, b, V_padded/t]`` is the whole loss footprint. The first stage keeps only the token
ids for the embedding (8sb bytes, left out).
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIVATION_BYTES = 2  # bf16
ATTENTIONS = ("flash", "local", "fused-softmax")


@dataclass(frozen=True)
class Block:
    """Which variant of the transformer block: the kernels that decide what is kept."""

    attention: str = "flash"  # one of ATTENTIONS
    mlp: str = "swiglu"  # "swiglu" (LLaMA) or "gelu" (the paper's GPT)
    dropout: bool = False


LLAMA = Block()
PAPER_GPT = Block(attention="fused-softmax", mlp="gelu", dropout=True)


def layer_activation_terms(s: int, b: int, h: int, a: int, g: int, f: int, t: int, *, sequence_parallel: bool,
                           recompute: str, block: Block = LLAMA) -> dict[str, float]:
    """Bytes one layer keeps for its backward, per term of the module docstring."""
    n = s * b * h
    r = t if sequence_parallel else 1
    if recompute == "full":
        return {"layer_input": 2 * n / r}
    kv_fraction = g / a if block.attention == "flash" else 1.0  # local attention keeps repeated K, V
    terms = {
        "attention_norm_input": 2 * n / r,
        "qkv_input": 2 * n / r,
        "query": 2 * n / t,
        "key": 2 * n * kv_fraction / t,
        "value": 2 * n * kv_fraction / t,
        "attention_output": 2 * n / t,
        "mlp_norm_input": 2 * n / r,
        "fc1_input": 2 * n / r,
    }
    if block.mlp == "swiglu":
        terms["activation_input"] = 2 * (2 * s * b * f) / t
    else:
        terms["activation_input"] = 2 * s * b * f / t
    terms["fc2_input"] = 2 * s * b * f / t
    if block.dropout:
        terms["attention_dropout_mask"] = n / r
        terms["mlp_dropout_mask"] = n / r
    if recompute == "none":
        scores = a * s * s * b / t
        if block.attention == "flash":
            terms["softmax_statistics"] = 4 * a * s * b / t
        elif block.attention == "local":
            terms["attention_scores"] = (4 + (3 if block.dropout else 2)) * scores
        else:
            terms["attention_scores"] = (2 + (3 if block.dropout else 0)) * scores
    return terms


def in_flight_chunk_forwards(pp: int, vp: int, num_microbatches: int, pp_rank: int) -> int:
    """Chunk-forwards whose activations pipeline rank ``pp_rank`` holds at its peak."""
    if pp == 1:
        return 1
    if vp == 1:
        return min(pp - pp_rank, num_microbatches)
    return min(2 * (pp - pp_rank - 1) + (vp - 1) * pp + 1, num_microbatches * vp)
