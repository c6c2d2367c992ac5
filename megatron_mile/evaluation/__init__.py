"""Evaluation of trained models: lm-eval benchmarks and the token-frequency-bucket analysis."""
