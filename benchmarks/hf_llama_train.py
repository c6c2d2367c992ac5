"""The Hugging Face baseline of ``train_bench.py --against-hf``: ``LlamaForCausalLM`` trained
with ``torch.optim.AdamW`` at megatron-mile's shape, in one process.

    python benchmarks/hf_llama_train.py --loss ce --num-layers 4 --hidden-size 256 \\
        --num-attention-heads 4 --ffn-hidden-size 704 --vocab-size 4096 --seq-length 256 \\
        --micro-batch-size 4 --iters 20 --log-interval 5

The model is the LLaMA that megatron-mile trains (RMSNorm eps 1e-5, SwiGLU, RoPE, untied
embeddings, no biases) with ``attn_implementation="sdpa"``, fed random tokens. Each
iteration is one micro-batch: forward, loss, backward, gradient clipping at 1.0, AdamW
(betas 0.9/0.95, weight decay 0.1; fused on CUDA, as the Hugging Face Trainer's default
optimizer). ``--loss ce`` is the model's own loss (``labels=``); ``--loss mile`` is the
original MiLe trainer's computation on the model's logits (``loss_bench.original_mile``).
With ``--bf16`` the fp32 weights run under bf16 autocast (the Trainer's ``--bf16``).

The last line of the output is ``RESULT`` and a JSON object: the median tokens/s over the
logging windows after the first, and on a GPU the model TFLOP/s and MFU by megatron-mile's
own formula (``megatron_mile.metrics``), so both sides are counted alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.loss_bench import original_mile  # noqa: E402
from megatron_mile.metrics import flops_per_token, peak_flops  # noqa: E402
from megatron_mile.model import ModelShape  # noqa: E402


def build_step(loss: str, shape: ModelShape, vocab_size: int, micro_batch_size: int, bf16: bool,
               device: torch.device) -> Callable[[], None]:
    """One training iteration of Hugging Face's LlamaForCausalLM at ``shape``, as a function."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=shape.hidden_size,
                         intermediate_size=shape.ffn_hidden_size, num_hidden_layers=shape.num_layers,
                         num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_attention_heads,
                         max_position_embeddings=shape.seq_length, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         initializer_range=0.01, attn_implementation="sdpa")
    torch.manual_seed(0)
    with device:  # initialised where it trains
        model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                  fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(micro_batch_size * shape.seq_length, device=device)

    def step() -> None:
        tokens = torch.randint(0, vocab_size, (micro_batch_size, shape.seq_length + 1), generator=generator)
        inputs, labels = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            if loss == "ce":
                # The model shifts labels itself: give it the inputs as labels.
                value = model(input_ids=inputs, labels=inputs).loss
            else:
                logits = model(input_ids=inputs).logits
                value = original_mile(logits.reshape(-1, vocab_size), labels.reshape(-1), mask)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", choices=["ce", "mile"], required=True)
    for name in ("num-layers", "hidden-size", "num-attention-heads", "ffn-hidden-size", "vocab-size", "seq-length",
                 "micro-batch-size", "iters", "log-interval"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = ModelShape(num_layers=args.num_layers, hidden_size=args.hidden_size,
                       num_attention_heads=args.num_attention_heads, ffn_hidden_size=args.ffn_hidden_size,
                       seq_length=args.seq_length)
    step = build_step(args.loss, shape, args.vocab_size, args.micro_batch_size, args.bf16, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    tokens_per_window = args.log_interval * args.micro_batch_size * args.seq_length
    windows = []
    sync()
    start = time.perf_counter()
    for iteration in range(1, args.iters + 1):
        step()
        if iteration % args.log_interval == 0:
            sync()
            now = time.perf_counter()
            windows.append(tokens_per_window / (now - start))
            print(f"iteration {iteration}: {windows[-1]:,.0f} tokens/s", flush=True)
            start = now
    if len(windows) < 2:
        sys.exit("hf_llama_train: --iters must cover at least two --log-interval windows")
    tokens_per_sec = statistics.median(windows[1:])
    result = {"tokens_per_sec": tokens_per_sec}
    peak = peak_flops()
    if peak:
        tflops = tokens_per_sec * flops_per_token(shape, args.vocab_size) / 1e12
        result.update(tflops_per_gpu=tflops, mfu=tflops * 1e12 / peak)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
