"""megatron-mile: MiLe-loss pretraining of LLaMA-style GPT models on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron-mile",
    version="0.1.0",
    description="Megatron-core pretraining with the MiLe, focal and cross-entropy losses",
    python_requires=">=3.11",
    # tools/ installs as megatron_mile.tools, so an installed package runs them as
    # `python -m megatron_mile.tools.preprocess_data ...` (a checkout also as `python tools/...`);
    # checkpoint_conversion: megatron-mile-eval converts checkpoints with it.
    packages=[*find_packages(include=["megatron_mile", "megatron_mile.*", "checkpoint_conversion"]),
              "megatron_mile.tools"],
    package_dir={"megatron_mile.tools": "tools"},
    package_data={"megatron_mile": ["configs/*.json"]},
    install_requires=[
        # 0.16.1 is the newest megatron-core that installs on Python 3.11.
        "megatron-core==0.16.1",
        "torch",
        "numpy",
        "sentencepiece",
        "tokenizers",  # Hugging Face tokenizer directories
        "zstandard",  # The Pile ships .jsonl.zst
        "tensorboard",
        "psutil",  # dist_checkpointing's writer measures its memory with it
    ],
    extras_require={
        # Apex (fused Adam / layer norm) is a source build; megatron-core uses it when importable.
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        # accelerate: lm-eval's hf backend imports it (lm-eval[hf] would add peft, which is not used).
        "eval": ["lm-eval", "accelerate", "transformers", "safetensors", "matplotlib"],
        "test": ["pytest", "pytest-xdist", "transformers", "safetensors", "matplotlib", "lm-eval", "accelerate"],
    },
    entry_points={"console_scripts": [
        "megatron-mile-train=megatron_mile.train:main",
        "megatron-mile-eval=megatron_mile.eval:main",
        "megatron-mile-buckets=megatron_mile.buckets:main",
        "megatron-mile-plan=megatron_mile.plan:main",
        "megatron-mile-compare=megatron_mile.compare:main",
    ]},
)
