"""Export megatron-mile checkpoints to other formats (Hugging Face Llama for lm-eval)."""
